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
from tests.conftest import CROSS_LESION_PAIR, IDENTICAL_PAIRS, project_params

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


#: Pictures decoded by the fast duplicate check besides those of the known pairs' lesions.
N_OTHER_IMAGES = 300


def _detect_duplicates(ham10000_dir, metadata):
    """Decode, hash and compare the images of ``metadata`` (validated, images found on disk):
    the ingestion nodes' ``(image_index, duplicates)``. ``known_duplicates`` is empty: the
    detector must find the cross-lesion pair itself."""
    from skin_lesion_classifier.data.metadata import validate_metadata

    metadata, meta_issues = validate_metadata(metadata)
    files = find_image_files(ham10000_dir / "images")
    files = files[files.image_id.isin(metadata.image_id)]
    checks = check_image_files(files, INGEST_PARAMS)
    index, issues, dups = build_image_index(
        metadata, meta_issues, checks, INGEST_PARAMS
    )
    assert issues.empty and len(index) == len(metadata)
    return index, dups


def _assert_known_duplicates_found(index, dups) -> None:
    identical = dups[dups.kind == "identical bytes"]
    assert {
        tuple(sorted(p)) for p in zip(identical.image_a, identical.image_b, strict=True)
    } == IDENTICAL_PAIRS
    cross = dups[dups.lesion_a != dups.lesion_b]
    assert {
        tuple(sorted(p)) for p in zip(cross.image_a, cross.image_b, strict=True)
    } == {CROSS_LESION_PAIR}
    g = index.set_index("image_id").group_id
    assert g[CROSS_LESION_PAIR[0]] == g[CROSS_LESION_PAIR[1]]
    assert index.group_id.nunique() == index.lesion_id.nunique() - 1


def test_duplicates_found_in_real_images(ham10000_dir, metadata_df):
    """Every image of the lesions behind the known pairs, among 300 other real images."""
    pairs = [*sum(map(list, IDENTICAL_PAIRS), []), *CROSS_LESION_PAIR]
    lesions = metadata_df.loc[metadata_df.image_id.isin(pairs), "lesion_id"]
    near = metadata_df.lesion_id.isin(lesions)
    others = metadata_df[~near].sample(N_OTHER_IMAGES, random_state=0)
    subset = pd.concat([metadata_df[near], others]).reset_index(drop=True)
    assert near.sum() >= len(pairs)
    _assert_known_duplicates_found(*_detect_duplicates(ham10000_dir, subset))


@pytest.mark.slow
def test_duplicates_found_in_all_10015_images(ham10000_dir, metadata_df):
    """The same check over the whole release: no other pair is found."""
    index, dups = _detect_duplicates(ham10000_dir, metadata_df)
    assert len(index) == 10015
    _assert_known_duplicates_found(index, dups)


def test_split_is_lesion_and_duplicate_safe_and_stratified(full_split_assignment):
    split = full_split_assignment
    assert len(split) == 10015 and split.image_id.is_unique
    # no lesion, no duplicate pair and no split group on two sides
    assert (split.groupby("orig_lesion").split.nunique() == 1).all()
    side = split.set_index("image_id").split
    for a, b in (*IDENTICAL_PAIRS, CROSS_LESION_PAIR):
        assert side[a] == side[b], (a, b)
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


def test_split_is_reproducible_and_seed_dependent(full_lesion_index):
    index = full_lesion_index
    a = stratified_group_split(index.dx, index.group_id, seed=1)
    b = stratified_group_split(index.dx, index.group_id, seed=1)
    c = stratified_group_split(index.dx, index.group_id, seed=2)
    assert (a == b).all() and (a != c).any()


def test_split_sizes_follow_parameters(full_lesion_index):
    index = full_lesion_index
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
