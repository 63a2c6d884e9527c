"""Lesion-aware stratified splitting on the real 10,015-image HAM10000."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.discovery import find_image_files
from skin_lesion_classifier.data.splitting import stratified_group_split
from skin_lesion_classifier.pipelines.ingestion.nodes import (
    build_image_index,
    check_image_files,
)
from skin_lesion_classifier.pipelines.splitting.nodes import (
    assign_splits,
    summarize_splits,
)
from tests.conftest import project_params

#: Largest allowed gap between a split's share of a class and its target share (absolute).
SHARE_TOLERANCE = 0.02
SPLIT_PARAMS = {
    "train_size": 0.70,
    "val_size": 0.15,
    "test_size": 0.15,
    "seed": 42,
    "n_folds": 5,
}
INGEST_PARAMS = {**project_params()["ingestion"], "workers": 2, "known_duplicates": []}


@pytest.fixture(scope="module")
def full_index(ham10000_dir, metadata_df):
    """The real image index of all 10,015 images (decoded, hashed, duplicates found).
    ``known_duplicates`` is left empty: the detector must find the cross-lesion pair itself."""
    from skin_lesion_classifier.data.metadata import validate_metadata

    metadata, meta_issues = validate_metadata(metadata_df)
    checks = check_image_files(find_image_files(ham10000_dir / "images"), INGEST_PARAMS)
    index, issues, dups = build_image_index(
        metadata, meta_issues, checks, INGEST_PARAMS
    )
    assert issues.empty and len(index) == 10015
    return index, dups


def test_duplicates_found_in_real_data(full_index):
    index, dups = full_index
    identical = dups[dups.kind == "identical bytes"]
    assert {
        tuple(sorted(p)) for p in zip(identical.image_a, identical.image_b, strict=True)
    } == {("ISIC_0024366", "ISIC_0029861"), ("ISIC_0024777", "ISIC_0029938")}
    cross = dups[dups.lesion_a != dups.lesion_b]
    assert {
        tuple(sorted(p)) for p in zip(cross.image_a, cross.image_b, strict=True)
    } == {("ISIC_0025226", "ISIC_0030074")}
    g = index.set_index("image_id").group_id
    assert g["ISIC_0025226"] == g["ISIC_0030074"]
    assert index.group_id.nunique() == index.lesion_id.nunique() - 1


def test_split_is_lesion_and_duplicate_safe_and_stratified(full_index):
    index, _ = full_index
    split = assign_splits(index, SPLIT_PARAMS)
    assert len(split) == 10015 and split.image_id.is_unique
    # no lesion, no duplicate group and no split group on two sides
    assert (split.groupby("lesion_id").split.nunique() == 1).all()
    merged = split.merge(index[["image_id", "duplicate_group"]], on="image_id")
    assert (merged.groupby("duplicate_group").split.nunique() == 1).all()
    assert (split.groupby("group_id").split.nunique() == 1).all()
    # class proportions per split within the stated tolerance of the targets
    counts = pd.crosstab(split.dx, split.split)
    shares = counts.div(counts.sum(axis=1), axis=0)
    for s, target in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        gap = (shares[s] - target).abs()
        assert gap.max() <= SHARE_TOLERANCE, f"{s}: {gap.to_dict()}"
    assert set(split.dx) == set(CLASSES)
    # folds: train+val only, 5 of them, no lesion in two folds, every class in every fold
    dev = split[split.split != "test"]
    assert (
        set(dev.fold) == {0, 1, 2, 3, 4}
        and (split[split.split == "test"].fold == -1).all()
    )
    assert (dev.groupby("group_id").fold.nunique() == 1).all()
    assert (pd.crosstab(dev.dx, dev.fold) > 0).all().all()
    table, metrics = summarize_splits(split)
    assert metrics["test_images"]["value"] == (split.split == "test").sum()
    assert table.set_index("dx").loc["mel", "total"] == 1113


def test_split_is_reproducible_and_seed_dependent(full_index):
    index, _ = full_index
    a = stratified_group_split(index.dx, index.group_id, seed=1)
    b = stratified_group_split(index.dx, index.group_id, seed=1)
    c = stratified_group_split(index.dx, index.group_id, seed=2)
    assert (a == b).all() and (a != c).any()


def test_split_sizes_follow_parameters(full_index):
    index, _ = full_index
    split = assign_splits(
        index,
        {
            **SPLIT_PARAMS,
            "train_size": 0.8,
            "val_size": 0.1,
            "test_size": 0.1,
            "n_folds": 0,
        },
    )
    frac = split.split.value_counts(normalize=True)
    assert np.isclose(frac["train"], 0.8, atol=0.01) and np.isclose(
        frac["test"], 0.1, atol=0.01
    )
    assert (split.fold == -1).all()
