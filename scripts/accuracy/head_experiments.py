# ruff: noqa: T201  (an experiment prints its figures)
"""Head levers on cached frozen features: validation chooses, the test split is scored.

    python scripts/accuracy/head_experiments.py --features efficientnet_lite0_150x200 \\
        --json .cache/accuracy/levers.json

Reads the features of ``extract_features.py`` and trains heads with the project's own
recipe (``training.fusion.train_fusion_head``: class-balanced sampling, label smoothing,
AdamW + cosine, best epoch on validation balanced accuracy), on the same features and seed
for every lever:

* ``image``: the image-only head (the quick default's recipe on its features),
* ``+tta``: probabilities averaged over the plain and mirrored test-time views,
* ``+seeds``: the mean of several heads trained with other seeds,
* ``+meta``: age, sex and site fused (``field_dropout`` = training-time field masking),
  each scored with the metadata and with the metadata withheld (every field unknown),
* ``+rule``: the decision rule chosen on validation (``evaluation.decision``).

Every figure comes with its lesion-bootstrap interval, every gain with the paired interval
against ``image`` (``evaluation.ensemble.compare_models``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from skin_lesion_classifier.config_defaults import resolved_parameters
from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.metadata_features import MetadataEncoder, with_metadata
from skin_lesion_classifier.evaluation.bootstrap import (
    lesion_bootstrap_weights,
    weighted_metrics,
)
from skin_lesion_classifier.evaluation.decision import choose_decision_rule
from skin_lesion_classifier.evaluation.metrics import (
    balanced_accuracy,
    confusion_matrix,
    recall_per_class,
)
from skin_lesion_classifier.evaluation.metrics import macro_roc_auc as macro_auc
from skin_lesion_classifier.models.factory import create_model
from skin_lesion_classifier.training.fusion import train_fusion_head

ROOT = Path(__file__).resolve().parents[2]


def load(feature_dir: Path, split: str, view: str) -> torch.Tensor:
    return torch.from_numpy(
        np.load(feature_dir / f"{split}_{view}.npy").astype(np.float32)
    )


def rows_of(split: str, frame: pd.DataFrame, index: pd.DataFrame) -> pd.DataFrame:
    return with_metadata(frame[frame.split == split].reset_index(drop=True), index)


def head_probs(fused, feats: torch.Tensor, meta: torch.Tensor | None) -> np.ndarray:
    fused.eval()
    with torch.no_grad():
        if meta is None:
            logits = fused.image_head_module()(feats)
        else:
            logits = fused.forward_from_features(feats, meta)
    return torch.softmax(logits.float(), 1).numpy()


def scores(y, p, pred=None) -> dict[str, float]:
    pred = p.argmax(1) if pred is None else pred
    return {"ba": balanced_accuracy(y, pred, len(CLASSES)), "auc": macro_auc(y, p)}


def paired(y, groups, p_new, p_ref, pred_new=None, pred_ref=None, n_boot=1000):
    """Gain of ``new`` over ``ref`` in balanced accuracy and macro AUC with the paired
    lesion-bootstrap 95% interval (both scored on the same resampled lesions)."""
    w = np.vstack([np.ones((1, len(y))), lesion_bootstrap_weights(groups, n_boot, 42)])
    a = weighted_metrics(y, p_new, w, y_pred=pred_new, sensitivity_targets=())
    b = weighted_metrics(y, p_ref, w, y_pred=pred_ref, sensitivity_targets=())
    out = {}
    for m in ("balanced_accuracy", "macro_auc"):
        d = a[m] - b[m]
        lo, hi = np.nanpercentile(d[1:], [2.5, 97.5])
        out[m] = [float(d[0]), float(lo), float(hi)]
    return out


def run_engine(feats, rows, minutes) -> dict[str, np.ndarray]:
    """The quick default itself: ``train_model`` with conf/quick's recipe on these features
    (the engine's feature extraction is replaced by the cached views)."""
    from skin_lesion_classifier.data.cache import ImageCache
    from skin_lesion_classifier.datasets.image_cache import ImageCacheDataset
    from skin_lesion_classifier.training import engine

    t0 = time.perf_counter()
    params = resolved_parameters("training", "quick")["train"]
    params.update(progress=False, feature_views=feats["train"].shape[0])
    cache: ImageCache = ImageCacheDataset(
        str(ROOT / "data/05_model_input/image_cache_150x200")
    ).load()
    engine._frozen_features = lambda *a, **k: (feats["train"], feats["val"]["plain"])
    res = engine.train_model(
        cache.take(rows["train"].image_id),
        rows["train"].label.to_numpy(),
        cache.take(rows["val"].image_id),
        rows["val"].label.to_numpy(),
        params,
    )
    head = res.model.head.eval()
    out = {}
    with torch.no_grad():
        for s in ("val", "test"):
            out[s] = torch.softmax(head(feats[s]["plain"]), 1).numpy()
    minutes["quick default (engine)"] = (time.perf_counter() - t0) / 60
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", nargs="+", default=["efficientnet_lite0_150x200"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--field-dropout", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--engine", action="store_true", help="also train the quick default"
    )
    ap.add_argument(
        "--skip-image", action="store_true", help="no image-only reference head"
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    split = pd.read_parquet(ROOT / "data/03_primary/split_assignment.parquet")
    index = pd.read_parquet(ROOT / "data/02_intermediate/image_index.parquet")
    rows = {s: rows_of(s, split, index) for s in ("train", "val", "test")}
    fusion_cfg = resolved_parameters("ensemble", "quick")["fusion"]
    members = {}
    for name in args.features:
        d = ROOT / ".cache/accuracy" / name
        for s in ("train", "val", "test"):
            ids = pd.read_csv(d / f"{s}_ids.csv")
            assert ids.image_id.tolist() == rows[s].image_id.tolist(), (name, s)
        train_views = [
            v for v in ("plain", "aug1", "aug2") if (d / f"train_{v}.npy").exists()
        ]
        members[name] = {
            "train": torch.stack([load(d, "train", v) for v in train_views]),
            "val": {
                v: load(d, "val", v)
                for v in ("plain", "hflip")
                if (d / f"val_{v}.npy").exists()
            },
            "test": {
                v: load(d, "test", v)
                for v in ("plain", "hflip")
                if (d / f"test_{v}.npy").exists()
            },
        }
        print(
            name, "train views", train_views, "eval views", list(members[name]["val"])
        )
    enc = MetadataEncoder.fit(
        rows["train"], min_site_count=fusion_cfg["min_site_count"]
    )
    m = {s: torch.as_tensor(enc.transform(rows[s])) for s in ("val", "test")}
    unknown = {
        s: torch.as_tensor(np.repeat(enc.unknown_vector()[None], len(rows[s]), 0))
        for s in m
    }
    y = {s: rows[s].label.to_numpy() for s in ("val", "test")}
    g = {s: rows[s].lesion_id.to_numpy() for s in ("val", "test")}

    probs: dict[str, dict[str, np.ndarray]] = {}  # lever -> split -> probabilities
    minutes: dict[str, float] = {}

    def run(tag, feats, use_meta, seed=42, field_dropout=0.0, tta=False):
        t0 = time.perf_counter()
        base = create_model(
            "efficientnet_lite0",
            pretrained=False,
            allow_random_init=True,
            head="multiscale",
            check_size=False,
            head_kwargs={
                "stages": [1, 2, 3, 4],
                "pool": "avgstd",
                "hidden": 256,
                "dropout": 0.5,
            },
        )
        if (
            base.num_features != feats["train"].shape[2]
        ):  # another backbone: a head of its width
            raise SystemExit(
                f"{tag}: feature width {feats['train'].shape[2]} is not lite0's"
            )
        meta = {
            "classes": list(CLASSES),
            "arch": "efficientnet_lite0",
            "input_size": [150, 200],
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
        }
        cfg = {
            **fusion_cfg,
            "seed": seed,
            "field_dropout": field_dropout,
            "feature_views": feats["train"].shape[0],
        }
        res = train_fusion_head(
            base,
            meta,
            None,
            rows["train"],
            None,
            rows["val"],
            cfg,
            use_metadata=use_meta,
            features=(feats["train"], feats["val"]["plain"]),
        )
        out = {}
        views = ["plain", "hflip"] if tta else ["plain"]
        for s in ("val", "test"):
            for cond, meta_in in (("", m[s]), ("_nometa", unknown[s])):
                if cond and not use_meta:
                    continue
                p = np.mean(
                    [
                        head_probs(
                            res.model, feats[s][v], meta_in if use_meta else None
                        )
                        for v in views
                    ],
                    0,
                )
                out[s + cond] = p
        minutes[tag] = (time.perf_counter() - t0) / 60
        return out

    def report(tag, p):
        probs[tag] = p
        line = f"{tag:40s}"
        for s in ("val", "test"):
            sc = scores(y[s], p[s])
            line += f"  {s} BA {sc['ba']:.3f} AUC {sc['auc']:.3f}"
            if s + "_nometa" in p:
                sc = scores(y[s], p[s + "_nometa"])
                line += f" (no meta BA {sc['ba']:.3f} AUC {sc['auc']:.3f})"
        print(line, f"{minutes.get(tag, 0):.1f} min", flush=True)

    name0 = args.features[0]
    f0 = members[name0]
    if args.engine:
        report("quick default (engine)", run_engine(f0, rows, minutes))
    if not args.skip_image:
        report("image", run("image", f0, False))
    if "hflip" in f0["val"]:
        report("image+tta", run("image+tta", f0, False, tta=True))
    for fd in args.field_dropout:
        report(
            f"image+meta(field_dropout={fd})",
            run(f"image+meta(field_dropout={fd})", f0, True, field_dropout=fd),
        )
    # seeds: mean of heads, image-only and the metadata head with the largest masking
    fd = max(args.field_dropout)
    for use_meta, tag in ((False, "image+seeds"), (True, f"image+meta({fd})+seeds")):
        if args.seeds < 2:
            break
        runs = [
            run(
                f"{tag}{k}",
                f0,
                use_meta,
                seed=42 + k,
                field_dropout=fd if use_meta else 0.0,
            )
            for k in range(args.seeds)
        ]
        minutes[tag] = sum(minutes.pop(f"{tag}{k}") for k in range(args.seeds))
        report(tag, {k: np.mean([r[k] for r in runs], 0) for k in runs[0]})
    for name in args.features[1:]:
        fm = members[name]
        report(f"{name} image", run(f"{name} image", fm, False))
        report(
            f"{name} meta({fd})", run(f"{name} meta({fd})", fm, True, field_dropout=fd)
        )

    json_out = {"levers": {}, "minutes": minutes}
    for tag, p in probs.items():
        entry = {}
        for s in p:
            base_s = s.split("_")[0]
            sc = scores(y[base_s], p[s])
            entry[s] = sc
            if tag != "image" and "image" in probs:
                entry[s + "_gain_vs_image"] = paired(
                    y[base_s], g[base_s], p[s], probs["image"][base_s]
                )
        json_out["levers"][tag] = entry
    # the decision rule chosen on validation, for each lever
    counts = np.bincount(rows["train"].label, minlength=len(CLASSES))
    for tag, p in probs.items():
        rule = choose_decision_rule(y["val"], p["val"], counts, g["val"])
        entry = json_out["levers"][tag]
        entry["rule"] = rule.name
        for s in [k for k in p if k.startswith("test")]:
            pred = rule.predict(p[s])
            entry[s + "_rule"] = {
                "ba": balanced_accuracy(y["test"], pred, len(CLASSES)),
                "recall": dict(
                    zip(
                        CLASSES,
                        recall_per_class(y["test"], pred).round(3).tolist(),
                        strict=True,
                    )
                ),
                "mel_threshold": rule.melanoma_threshold,
                "gain_vs_image_argmax": None
                if "image" not in probs
                else paired(
                    y["test"],
                    g["test"],
                    p[s],
                    probs["image"]["test"],
                    pred_new=pred,
                    pred_ref=probs["image"]["test"].argmax(1),
                ),
            }
            if rule.melanoma_threshold is not None:
                flag = p[s][:, CLASSES.index("mel")] >= rule.melanoma_threshold
                pos = y["test"] == CLASSES.index("mel")
                entry[s + "_rule"]["mel_sens_spec"] = [
                    float(flag[pos].mean()),
                    float((~flag[~pos]).mean()),
                ]
            cm = confusion_matrix(y["test"], pred)
            off = [
                (int(cm[i, j]), f"{CLASSES[i]}->{CLASSES[j]}")
                for i in range(7)
                for j in range(7)
                if i != j
            ]
            entry[s + "_rule"]["top_confusions"] = sorted(off, reverse=True)[:5]
        print(
            f"{tag:40s} rule {rule.name:16s} test BA {entry['test_rule']['ba']:.3f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(json_out, indent=1, default=float))
        flat = {f"{tag}|{s}": v for tag, p in probs.items() for s, v in p.items()}
        np.savez_compressed(Path(args.json).with_suffix(".npz"), **flat)


if __name__ == "__main__":
    main()
