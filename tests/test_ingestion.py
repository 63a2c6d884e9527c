"""Ingestion on real HAM10000 files, both folder layouts, and on broken files made here."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skin_lesion_classifier.data.discovery import check_image, find_image_files
from skin_lesion_classifier.data.images import ImageDecodeError, load_rgb, resize_rgb
from skin_lesion_classifier.data.metadata import MetadataSchemaError, validate_metadata
from skin_lesion_classifier.pipelines.ingestion.nodes import (
    build_image_index,
    check_image_files,
    summarize_data_quality,
    validate_metadata_node,
)
from tests.conftest import project_params

PARAMS = {**project_params()["ingestion"], "workers": 2}


def test_real_metadata_is_clean(metadata_df):
    clean, issues = validate_metadata(metadata_df)
    assert len(clean) == 10015 and clean["image_id"].is_unique
    assert issues.empty
    assert clean["lesion_id"].nunique() == 7470
    assert clean["dx"].value_counts().to_dict() == {
        "nv": 6705,
        "mel": 1113,
        "bkl": 1099,
        "bcc": 514,
        "akiec": 327,
        "vasc": 142,
        "df": 115,
    }
    assert clean["age"].isna().sum() == 57
    assert set(clean["sex"]) == {"male", "female", "unknown"}


def test_missing_column_is_named(metadata_df):
    with pytest.raises(
        MetadataSchemaError, match=r"lacks required column\(s\) \['dx'\]"
    ):
        validate_metadata(metadata_df.rename(columns={"dx": "diagnosis"}))


def test_misspelt_or_missing_optional_column_stops_with_its_close_match(metadata_df):
    raw = metadata_df.head(20)
    with pytest.raises(MetadataSchemaError, match=r"'age' \(close match: 'Age'\)"):
        validate_metadata(raw.rename(columns={"age": "Age"}))
    with pytest.raises(
        MetadataSchemaError, match=r"'localization' \(close match: 'locaton'\)"
    ):
        validate_metadata(raw.rename(columns={"localization": "locaton"}))
    with pytest.raises(
        MetadataSchemaError, match=r"lacks column\(s\) 'dx_type'; .*absent_columns"
    ):
        validate_metadata(raw.drop(columns=["dx_type"]))
    with pytest.raises(MetadataSchemaError, match="not optional columns"):
        validate_metadata(raw, absent_columns=["dx"])
    # absent on purpose: accepted, filled as unknown, listed once and in the report
    no_type = raw.drop(columns=["dx_type"])
    clean, issues = validate_metadata(no_type, absent_columns=["dx_type"])
    assert len(clean) == 20 and set(clean.dx_type) == {"unknown"}
    assert len(issues) == 1 and issues.field.iloc[0] == "dx_type"
    assert "absent on purpose" in issues.reason.iloc[0]
    index = clean.assign(lesion_id=clean.lesion_id, group_id=clean.lesion_id,
                         width=600, height=450)  # fmt: skip
    report, _, _ = summarize_data_quality(
        no_type, issues, issues.iloc[:0], index, pd.DataFrame(
            columns=["image_a", "image_b", "lesion_a", "lesion_b", "kind"]),
    )  # fmt: skip
    assert report["absent_columns"] == ["dx_type"]
    assert any("dx_type absent on purpose" in k for k in report["issues_by_reason"])


def test_bad_rows_are_listed_not_lost(metadata_df):
    raw = metadata_df.head(8).copy()
    raw.loc[0, "dx"] = "melanoma"  # unknown code -> rejected
    raw.loc[1, "age"] = 250  # out of range -> blank, kept
    raw.loc[2, "sex"] = "X"  # unknown sex -> 'unknown', kept
    raw.loc[3, "image_id"] = None  # no id -> rejected
    raw = pd.concat([raw, raw.iloc[[4]]])  # exact duplicate -> kept once
    conflict = raw.iloc[[5]].copy()
    conflict["dx"] = "mel" if raw.iloc[5]["dx"] != "mel" else "nv"
    raw = pd.concat([raw, conflict])  # conflicting duplicate -> both rejected
    clean, issues = validate_metadata(raw)
    errors = issues[issues.severity == "error"]
    assert "unknown class code 'melanoma'" in " ".join(errors.reason)
    assert (
        errors.field.tolist().count("image_id") == 3
    )  # missing id + 2 conflicting rows
    assert (
        len(clean) == 8 - 3
    )  # rows 0 (code), 3 (no id), 5 (conflict) out; 4 kept once
    row1 = clean.set_index("image_id").loc[metadata_df.image_id[1]]
    assert np.isnan(row1.age)
    assert clean.set_index("image_id").loc[metadata_df.image_id[2], "sex"] == "unknown"
    # every input row is either in clean or named in issues
    named = set(issues.image_id.dropna()) | set(clean.image_id)
    assert set(raw.image_id.dropna()) <= named


def _broken_files(folder: Path, good: Path) -> dict[str, str]:
    """Write broken and odd images; returns id -> expected outcome."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ISIC_9000001.jpg").write_bytes(b"")
    data = good.read_bytes()
    (folder / "ISIC_9000002.jpg").write_bytes(data[: len(data) // 3])
    (folder / "ISIC_9000003.jpg").write_text("this is not an image")
    img = Image.open(good)
    img.convert("L").save(folder / "ISIC_9000004.png")
    img.convert("RGBA").save(folder / "ISIC_9000005.png")
    img.convert("CMYK").save(folder / "ISIC_9000006.jpg")
    Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257).save(
        folder / "ISIC_9000007.png"
    )
    return {
        "ISIC_9000001": "empty",
        "ISIC_9000002": "truncated",
        "ISIC_9000003": "not a readable",
        "ISIC_9000004": "ok",
        "ISIC_9000005": "ok",
        "ISIC_9000006": "ok",
        "ISIC_9000007": "ok",
    }


def test_decode_checks_on_broken_and_odd_files(tmp_path, samples_dir):
    good = next((samples_dir / "images").glob("*.jpg"))
    expected = _broken_files(tmp_path, good)
    for image_id, outcome in expected.items():
        path = next(tmp_path.glob(f"{image_id}.*"))
        row = check_image(path)
        if outcome == "ok":
            assert row["ok"], row["reason"]
            assert (row["width"], row["height"]) == (600, 450)
            assert load_rgb(path).mode == "RGB"
        else:
            assert not row["ok"] and outcome in row["reason"], row["reason"]
            with pytest.raises(ImageDecodeError, match=image_id):
                load_rgb(path)


def test_resize_any_size(samples_dir, ham10000_dir):
    big = load_rgb(next((samples_dir / "images").glob("*.jpg")))
    small = load_rgb(next((ham10000_dir / "images").glob("*.jpg")))
    assert big.size == (600, 450) and small.size == (200, 150)
    for img in (big, small):
        for size in ((192, 256), (224, 224), (64, 64)):
            arr = resize_rgb(img, size)
            assert arr.shape == (*size, 3) and arr.dtype == np.uint8
    with pytest.raises(ValueError, match="positive"):
        resize_rgb(big, (0, 10))


@pytest.fixture()
def raw_two_parts(tmp_path, samples_dir, metadata_df) -> Path:
    """The 21 full-size samples split over the two release folders, plus broken files, a
    metadata row without image and an image without metadata row."""
    raw = tmp_path / "01_raw"
    images = sorted((samples_dir / "images").glob("*.jpg"))
    for k, img in enumerate(images):
        part = raw / ("HAM10000_images_part_1" if k % 2 else "HAM10000_images_part_2")
        part.mkdir(parents=True, exist_ok=True)
        shutil.copy(img, part / img.name)
    shutil.copy(
        images[0], raw / "HAM10000_images_part_1" / images[0].name
    )  # same id in both parts
    expected = _broken_files(raw / "HAM10000_images_part_2", images[0])
    meta = pd.read_csv(samples_dir / "HAM10000_metadata_samples.csv")
    extra = []
    for n, image_id in enumerate(expected):
        extra.append(
            {
                "lesion_id": f"HAM_90000{n}",
                "image_id": image_id,
                "dx": "nv",
                "dx_type": "histo",
                "age": 40.0,
                "sex": "female",
                "localization": "back",
            }
        )
    extra.append(
        {
            "lesion_id": "HAM_9999999",
            "image_id": "ISIC_9999999",
            "dx": "mel",
            "dx_type": "histo",
            "age": 60.0,
            "sex": "male",
            "localization": "back",
        }
    )
    meta = pd.concat([meta, pd.DataFrame(extra)], ignore_index=True)
    meta = meta[meta.image_id != images[-1].stem]  # this image has no metadata row
    meta.to_csv(raw / "HAM10000_metadata.csv", index=False)
    return raw


def test_ingestion_nodes_on_both_release_parts(raw_two_parts):
    raw_meta = pd.read_csv(raw_two_parts / "HAM10000_metadata.csv")
    files = find_image_files(raw_two_parts)
    assert set(files.folder) == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    assert files.duplicate_of.notna().sum() == 1

    metadata, meta_issues = validate_metadata_node(raw_meta, PARAMS)
    checks = check_image_files(files, PARAMS)
    index, issues, dups = build_image_index(metadata, meta_issues, checks, PARAMS)
    report, all_issues, metrics = summarize_data_quality(
        raw_meta, meta_issues, issues, index, dups
    )

    # 20 samples with metadata + 4 readable odd files (gray, RGBA, CMYK, 16-bit)
    assert len(index) == 24
    assert index.image_id.is_unique and set(index.width) == {600}
    reasons = dict(zip(issues.image_id, issues.reason, strict=False))
    assert "empty" in reasons["ISIC_9000001"]
    assert "truncated" in reasons["ISIC_9000002"]
    assert "not a readable image" in reasons["ISIC_9000003"]
    assert "image file not found" in reasons["ISIC_9999999"]
    orphan = sorted(raw_two_parts.rglob("*.jpg"))[-1].stem
    assert any(
        "no metadata row" in r
        for i, r in zip(issues.image_id, issues.reason, strict=False)
    )
    assert report["usable_images"] == 24 and report["rejected_rows"] == 4
    # the CMYK copy and the grey copy of the same picture are found as near-duplicates
    assert len(dups) >= 1 and (dups.kind == "near-identical picture").any()
    assert set(index.columns) >= {
        "path",
        "label",
        "lesion_id",
        "sha256",
        "duplicate_group",
        "group_id",
    }
    assert metrics["usable_images"]["value"] == 24.0
    assert orphan  # the orphan image exists on disk


def test_image_of_a_rejected_row_is_listed_once_with_the_rows_reason(raw_two_parts):
    raw_meta = pd.read_csv(raw_two_parts / "HAM10000_metadata.csv")
    victim = raw_meta.image_id.iloc[0]
    raw_meta.loc[0, "dx"] = "melanoma"  # the row is rejected; its image file exists
    metadata, meta_issues = validate_metadata_node(raw_meta, PARAMS)
    checks = check_image_files(find_image_files(raw_two_parts), PARAMS)
    index, image_issues, dups = build_image_index(metadata, meta_issues, checks, PARAMS)
    _, all_issues, _ = summarize_data_quality(
        raw_meta, meta_issues, image_issues, index, dups
    )
    listed = all_issues[all_issues.image_id == victim]
    assert len(listed) == 1, listed.reason.tolist()
    assert "unknown class code 'melanoma'" in listed.reason.iloc[0]
    assert victim not in set(index.image_id)
    # the image that truly has no row is still listed as such
    assert (all_issues.reason.str.contains("no metadata row")).sum() == 1


def test_a_dangling_link_among_the_images_is_listed_with_its_reason(
    tmp_path, samples_dir
):
    folder = tmp_path / "images"
    folder.mkdir()
    good = next((samples_dir / "images").glob("*.jpg"))
    shutil.copy(good, folder / good.name)
    (folder / "ISIC_9100001.jpg").symlink_to(tmp_path / "moved_away.jpg")
    files = find_image_files(folder)  # a dangling link no longer crashes the listing
    assert sorted(files.image_id) == sorted([good.stem, "ISIC_9100001"])
    checks = check_image_files(files, PARAMS)
    reason = checks.set_index("image_id").loc["ISIC_9100001", "reason"]
    assert "dangling symbolic link" in reason and "moved_away.jpg" in reason
    assert checks.set_index("image_id").loc[good.stem, "ok"]


def test_an_image_above_the_configured_pixel_limit_is_reported_not_decoded(
    tmp_path, samples_dir
):
    folder = tmp_path / "images"
    folder.mkdir()
    images = sorted((samples_dir / "images").glob("*.jpg"))[:3]  # 600x450 = 270000
    for img in images:
        shutil.copy(img, folder / img.name)
    meta = pd.read_csv(samples_dir / "HAM10000_metadata_samples.csv")
    meta = meta[meta.image_id.isin([p.stem for p in images])]

    def ingest(max_pixels: int):
        params = {**PARAMS, "max_pixels": max_pixels}
        metadata, meta_issues = validate_metadata_node(meta, params)
        checks = check_image_files(find_image_files(folder), params)
        index, issues, dups = build_image_index(metadata, meta_issues, checks, params)
        return index, summarize_data_quality(meta, meta_issues, issues, index, dups)

    index, (report, issues, _) = ingest(max_pixels=200_000)
    assert len(index) == 0 and report["usable_images"] == 0
    refused = issues[issues.image_id.isin([p.stem for p in images])]
    assert len(refused) == 3
    assert refused.reason.str.contains(
        "600x450 = 270000 pixels exceeds the limit of 200000 pixels"
    ).all()
    index, (report, issues, _) = ingest(max_pixels=270_000)
    assert sorted(index.image_id) == sorted(p.stem for p in images)
    assert not issues.reason.str.contains("limit").any()
