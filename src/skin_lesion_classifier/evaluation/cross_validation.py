"""K-fold cross-validation over lesion-grouped folds: fold splits, out-of-fold (OOF)
predictions, per-fold metrics and their mean and standard deviation.

The folds are the ``fold`` column of the split assignment (``data.splitting.group_kfold``:
0..K-1 on train+val rows, -1 on test). For fold ``k`` the model trains on the other folds
and predicts fold ``k``; collected over all ``k`` that gives exactly one OOF prediction per
train+val image. The test split takes no part.

Spread over folds is reported as ``mean +- sd`` with the sample standard deviation
``sd = sqrt(sum_k (m_k - mean)^2 / (K - 1))`` of the per-fold figures ``m_k``. The folds
share training data, so ``sd`` describes fold-to-fold variability, not the standard error
of the mean (Bengio & Grandvalet 2004: no unbiased estimator of that variance exists).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from skin_lesion_classifier.constants import CLASSES, MELANOMA_INDEX
from skin_lesion_classifier.evaluation.evaluate import probabilities_of
from skin_lesion_classifier.evaluation.metrics import classification_metrics

#: Figures computed per fold (keys of :func:`fold_metrics` rows besides ``fold`` / ``n``).
FOLD_METRICS: tuple[str, ...] = (
    "balanced_accuracy",
    "macro_auc",
    "accuracy",
    "log_loss",
    "mel_auc",
    "mel_sensitivity",
)


def check_folds(
    split_assignment: pd.DataFrame, group_col: str = "group_id"
) -> list[int]:
    """The fold numbers of ``split_assignment``; raises ``ValueError`` naming the culprits
    when a group (lesion) sits in two folds, a train/val row has no fold, a test row has
    one, or there are fewer than two folds."""
    for col in ("image_id", "split", "fold", group_col):
        if col not in split_assignment.columns:
            raise ValueError(f"split assignment lacks column {col!r}")
    dev = split_assignment[split_assignment["split"] != "test"]
    no_fold = dev["fold"] < 0
    if no_fold.any():
        raise ValueError(
            f"{int(no_fold.sum())} train/val image(s) have no fold (fold = -1), e.g. "
            f"{dev.loc[no_fold, 'image_id'].tolist()[:5]}; run the splitting pipeline with "
            "splitting.n_folds >= 2"
        )
    test_fold = (split_assignment["split"] == "test") & (split_assignment["fold"] >= 0)
    if test_fold.any():
        raise ValueError(
            f"{int(test_fold.sum())} test image(s) carry a fold; the test split takes no "
            "part in cross-validation"
        )
    spread = dev.groupby(group_col)["fold"].nunique()
    shared = spread[spread > 1]
    if len(shared):
        raise ValueError(
            f"{len(shared)} {group_col}(s) appear in more than one fold, e.g. "
            f"{shared.index.tolist()[:5]}: folds must never share a lesion"
        )
    folds = sorted(int(f) for f in dev["fold"].unique())
    if len(folds) < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, found {folds}")
    return folds


def fold_split(split_assignment: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The split assignment of fold ``fold``: its images become ``val`` (the held-out
    fold), the other train+val images ``train``; test rows keep ``test``."""
    folds = check_folds(split_assignment)
    if int(fold) not in folds:
        raise ValueError(f"fold {fold} does not exist; folds are {folds}")
    out = split_assignment.copy()
    dev = out["split"] != "test"
    out.loc[dev, "split"] = np.where(out.loc[dev, "fold"] == int(fold), "val", "train")
    return out


def collect_oof(
    fold_predictions: Mapping[int, pd.DataFrame], split_assignment: pd.DataFrame
) -> pd.DataFrame:
    """Out-of-fold predictions: the held-out predictions of every fold, stacked, with a
    ``fold`` column. Raises unless every train+val image has exactly one prediction, made
    by the model that did not train on it."""
    check_folds(split_assignment)
    dev = split_assignment[split_assignment["split"] != "test"]
    fold_of = dev.set_index("image_id")["fold"]
    parts = []
    for k, frame in sorted(fold_predictions.items()):
        wrong = frame.loc[frame["image_id"].map(fold_of) != int(k), "image_id"]
        if len(wrong):
            raise ValueError(
                f"fold {k}'s predictions include {len(wrong)} image(s) not held out in fold "
                f"{k} (e.g. {wrong.tolist()[:5]}); OOF predictions must be held-out only"
            )
        parts.append(frame.assign(fold=int(k)))
    oof = pd.concat(parts, ignore_index=True)
    dup = oof["image_id"].duplicated()
    if dup.any():
        raise ValueError(
            f"images predicted twice: {oof.loc[dup, 'image_id'].tolist()[:5]}"
        )
    missing = sorted(set(dev["image_id"]) - set(oof["image_id"]))
    if missing:
        raise ValueError(
            f"{len(missing)} train/val image(s) have no out-of-fold prediction, e.g. "
            f"{missing[:5]}"
        )
    return oof


def fold_metrics(oof: pd.DataFrame) -> pd.DataFrame:
    """One row per fold with ``fold``, ``n`` and :data:`FOLD_METRICS` (arg-max decisions;
    ``mel_auc`` is melanoma-vs-rest AUC, ``mel_sensitivity`` the melanoma recall)."""
    rows = []
    for k, frame in oof.groupby("fold", sort=True):
        m = classification_metrics(frame["label"].to_numpy(), probabilities_of(frame))
        mel = m["per_class"][MELANOMA_INDEX]
        rows.append(
            {
                "fold": int(k),
                "n": m["n"],
                "balanced_accuracy": m["balanced_accuracy"],
                "macro_auc": m["macro_auc"],
                "accuracy": m["accuracy"],
                "log_loss": m["log_loss"],
                "mel_auc": float(mel.get("auc", np.nan)),
                "mel_sensitivity": float(mel.get("recall", np.nan)),
            }
        )
    return pd.DataFrame(rows, columns=["fold", "n", *FOLD_METRICS])


def summarize_folds(per_fold: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``{metric: {mean, sd, min, max, k}}`` over folds (``sd`` with ``K - 1`` in the
    denominator; NaN folds are left out and ``k`` counts the rest)."""
    out = {}
    for name in FOLD_METRICS:
        v = per_fold[name].to_numpy(dtype=np.float64)
        v = v[np.isfinite(v)]
        out[name] = {
            "mean": float(v.mean()) if v.size else float("nan"),
            "sd": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
            "min": float(v.min()) if v.size else float("nan"),
            "max": float(v.max()) if v.size else float("nan"),
            "k": int(v.size),
        }
    return out


def pooled_oof_metrics(oof: pd.DataFrame) -> dict[str, Any]:
    """:func:`~skin_lesion_classifier.evaluation.metrics.classification_metrics` of all OOF
    predictions pooled (one figure over every train+val image)."""
    return classification_metrics(oof["label"].to_numpy(), probabilities_of(oof))


def mlflow_fold_metrics(
    per_fold: pd.DataFrame, summary: Mapping[str, Mapping[str, float]]
) -> dict[str, list[dict[str, float]] | dict[str, float]]:
    """Per-fold figures as MLflow metric histories (``step`` = fold) plus ``_mean`` and
    ``_sd`` for each, in the ``MlflowMetricsHistoryDataset`` format."""
    out: dict[str, Any] = {}
    for name in FOLD_METRICS:
        hist = [
            {"value": float(v), "step": int(k)}
            for k, v in zip(per_fold["fold"], per_fold[name])
            if np.isfinite(v)
        ]
        if hist:
            out[f"cv_{name}"] = hist
        for stat in ("mean", "sd"):
            v = summary[name][stat]
            if np.isfinite(v):
                out[f"cv_{name}_{stat}"] = {"value": float(v), "step": 0}
    return out


def _f(v: Any, digits: int = 3) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not np.isfinite(v) else f"{v:.{digits}f}"


def report_section(
    per_fold: pd.DataFrame,
    summary: Mapping[str, Mapping[str, float]],
    pooled: Mapping[str, Any] | None = None,
    title: str = "Cross-validation (lesion-grouped folds)",
    config: Mapping[str, Any] | None = None,
) -> str:
    """A Markdown section: per-fold table, ``mean +- sd`` row, pooled OOF figures."""
    cols = ["fold", "n", *FOLD_METRICS]
    lines = [f"## {title}", ""]
    k = len(per_fold)
    lines.append(
        f"{k} folds over train+val; folds never share a lesion (or a duplicate-linked "
        "group). Each fold's model trains on the other folds and predicts the held-out one, "
        "so every train+val image has exactly one out-of-fold prediction. Figures use the "
        "arg-max; sd is the sample standard deviation over folds (fold-to-fold "
        "variability, not a confidence interval)."
    )
    if config:
        lines.append("")
        lines.append(
            "Settings: "
            + ", ".join(f"{k2} = `{v}`" for k2, v in sorted(config.items()))
        )
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in per_fold.itertuples(index=False):
        d = r._asdict()
        lines.append(
            "| "
            + " | ".join(
                [str(d["fold"]), str(d["n"])] + [_f(d[c]) for c in FOLD_METRICS]
            )
            + " |"
        )
    lines.append(
        "| **mean ± sd** | "
        + str(int(per_fold["n"].sum()))
        + " | "
        + " | ".join(
            f"{_f(summary[c]['mean'])} ± {_f(summary[c]['sd'])}" for c in FOLD_METRICS
        )
        + " |"
    )
    if pooled is not None:
        lines += [
            "",
            f"Pooled out-of-fold ({pooled['n']} images): balanced accuracy "
            f"{_f(pooled['balanced_accuracy'])}, macro AUC {_f(pooled['macro_auc'])}, "
            f"accuracy {_f(pooled['accuracy'])}, log loss {_f(pooled['log_loss'])}.",
        ]
    lines.append("")
    return "\n".join(lines)


def class_counts_per_fold(split_assignment: pd.DataFrame) -> pd.DataFrame:
    """Images per class (rows, :data:`CLASSES` order) and fold (columns)."""
    dev = split_assignment[split_assignment["split"] != "test"]
    return (
        pd.crosstab(dev["dx"], dev["fold"])
        .reindex(index=list(CLASSES), fill_value=0)
        .rename_axis(index="dx", columns="fold")
    )


__all__: Sequence[str] = (
    "FOLD_METRICS",
    "check_folds",
    "class_counts_per_fold",
    "collect_oof",
    "fold_metrics",
    "fold_split",
    "mlflow_fold_metrics",
    "pooled_oof_metrics",
    "report_section",
    "summarize_folds",
)
