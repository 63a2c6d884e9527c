# ruff: noqa: T201  (a comparison prints its figures)
"""Paired lesion-bootstrap comparison of saved prediction frames (CPU, seconds).

    python scripts/accuracy/compare_predictions.py --reference quick \\
        quick=data/07_model_output/val_predictions.parquet/<version>/val_predictions.parquet \\
        partial=path/to/other/val_predictions.parquet

Each ``name=path`` is a ``val_predictions`` or ``test_predictions`` frame written by the
evaluation pipeline (a versioned folder may be given: its latest version is read). All
frames must hold the same images. Prints, per model and metric, the estimate with its
lesion-bootstrap interval and the paired difference from ``--reference``
(:func:`skin_lesion_classifier.evaluation.ensemble.compare_models`): compare validation
frames to choose, test frames only to report a choice already made. Balanced accuracy is
that of the argmax; ``name=frame@evaluation_metrics.json`` scores that frame with the
decision rule its run chose on validation (``decision_rule`` of the evaluation metrics;
a versioned folder may be given as well), and then only balanced accuracy is printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from skin_lesion_classifier.evaluation.decision import DecisionRule
from skin_lesion_classifier.evaluation.ensemble import compare_models


def read_frame(path: str) -> pd.DataFrame:
    """A parquet file, or the latest version inside a Kedro versioned folder."""
    p = Path(path)
    if p.is_dir():
        versions = sorted(v for v in p.iterdir() if (v / p.name).is_file())
        if not versions:
            raise SystemExit(f"{p} holds no version of {p.name}")
        p = versions[-1] / p.name
    return pd.read_parquet(p)


def with_rule(frame: pd.DataFrame, metrics_path: str) -> pd.DataFrame:
    """The frame with its probabilities replaced by the one-hot decisions of the rule in
    ``metrics_path``, so that the argmax balanced accuracy is that of the rule."""
    p = Path(metrics_path)
    if p.is_dir():
        p = sorted(v for v in p.iterdir() if (v / p.name).is_file())[-1] / p.name
    rule = DecisionRule.from_dict(json.loads(p.read_text())["decision_rule"])
    cols = [f"prob_{c}" for c in rule.classes]
    out = frame.copy()
    out[cols] = np.eye(len(cols))[rule.predict(frame[cols].to_numpy())]
    return out


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("frames", nargs="+", help="name=path of a predictions frame")
    ap.add_argument("--reference", required=True, help="name of the reference model")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=42)

    args = ap.parse_args(argv)
    frames = {}
    for item in args.frames:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"expected name=path, got {item!r}")
        path, _, metrics = path.partition("@")
        frame = read_frame(path)
        frames[name] = with_rule(frame, metrics) if metrics else frame
    table = compare_models(frames, args.reference, n_boot=args.n_boot, seed=args.seed)
    if any("@" in item for item in args.frames):
        table = table[table.metric == "balanced_accuracy"]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
