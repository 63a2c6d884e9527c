"""Lesion-aware, stratified train/validation/test splits and cross-validation folds.

Every image of a group (a lesion, or several lesions linked by duplicate images) lands on the
same side, and each split's class proportions follow the whole set's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

SPLITS = ("train", "val", "test")


def group_labels(labels: pd.Series, groups: pd.Series) -> pd.Series:
    """The label of each group: the rarest class among its images (so that a group that
    mixes classes is stratified by its scarcer class)."""
    counts = labels.value_counts()
    rarity = labels.map(counts)
    frame = pd.DataFrame(
        {"label": labels.values, "group": groups.values, "rarity": rarity.values}
    )
    return (
        frame.sort_values("rarity").drop_duplicates("group").set_index("group")["label"]
    )


def stratified_group_split(
    labels: pd.Series | np.ndarray,
    groups: pd.Series | np.ndarray,
    sizes: dict[str, float] | None = None,
    seed: int = 42,
) -> np.ndarray:
    """Assign each item to a split so that no group crosses splits and per-class proportions
    match ``sizes`` (default ``{"train": 0.70, "val": 0.15, "test": 0.15}``).

    Greedy balanced assignment: groups are visited largest first (ties in random order from
    ``seed``) and each goes to the split with the largest remaining deficit for its class,
    ``deficit_s = target_share_s * n_class - assigned_s``, relative to that split's target.
    Returns an array of split names aligned with ``labels``.
    """
    sizes = dict(sizes or {"train": 0.70, "val": 0.15, "test": 0.15})
    total = sum(sizes.values())
    if total <= 0 or any(v < 0 for v in sizes.values()):
        raise ValueError(f"split sizes must be non-negative and sum > 0, got {sizes}")
    names = list(sizes)
    share = np.array([sizes[n] / total for n in names])
    labels = pd.Series(np.asarray(labels))
    groups = pd.Series(np.asarray(groups))
    glabel = group_labels(labels, groups)
    gsize = groups.value_counts()
    rng = np.random.default_rng(seed)
    order = (
        pd.DataFrame(
            {
                "size": gsize.reindex(glabel.index).values,
                "tie": rng.random(len(glabel)),
            },
            index=glabel.index,
        )
        .sort_values(["size", "tie"], ascending=[False, True])
        .index
    )

    class_totals = labels.value_counts().to_dict()
    assigned = {c: np.zeros(len(names)) for c in class_totals}
    all_assigned = np.zeros(len(names))
    n_total = len(labels)
    choice: dict = {}
    glabel, gsize = glabel.to_dict(), gsize.to_dict()  # plain lookups in the loop
    for g in order:
        c = glabel[g]
        size = gsize[g]
        target = share * class_totals[c]
        deficit = (target - assigned[c]) / np.maximum(target, 1e-9)
        # tie-break on the overall size deficit so small classes do not all go to one side
        overall = (share * n_total - all_assigned) / np.maximum(share * n_total, 1e-9)
        best = int(np.lexsort((-overall, -deficit))[0])
        choice[g] = names[best]
        assigned[c][best] += size
        all_assigned[best] += size
    return groups.map(choice).to_numpy()


def group_kfold(
    labels: pd.Series | np.ndarray,
    groups: pd.Series | np.ndarray,
    n_folds: int,
    seed: int = 42,
) -> np.ndarray:
    """Fold number (0..n_folds-1) per item from scikit-learn's ``StratifiedGroupKFold``:
    no group in two folds, class proportions kept per fold."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    folds = np.full(len(labels), -1, dtype=np.int64)
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, idx) in enumerate(cv.split(np.zeros(len(labels)), labels, groups)):
        folds[idx] = k
    return folds


def split_report(assignment: pd.DataFrame, label_col: str = "dx") -> pd.DataFrame:
    """Images per class and split, with each split's share of every class."""
    table = pd.crosstab(assignment[label_col], assignment["split"]).reindex(
        columns=list(SPLITS), fill_value=0
    )
    table["total"] = table.sum(axis=1)
    for s in SPLITS:
        table[f"{s}_share"] = (table[s] / table["total"]).round(4)
    return table
