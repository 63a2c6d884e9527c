# ruff: noqa: T201  (a benchmark prints its figures)
"""Benchmark: best single model vs metadata fusion vs ensembles, same split and seed.

    .venv/bin/python scripts/bench_ensemble.py --env quick \\
        --size 150 200 --json data/08_reporting/bench_ensemble.json

The members, their training recipes (``training.train`` with each member's ``train`` on
top, as the ensemble pipeline merges them) and the fusion-head recipe are the resolved
``ensemble`` parameters of the Kedro environment ``--env``.

CPU-budget design (no Kedro, no MLflow): for each member architecture the ImageNet
backbone (packaged offline weights) stays frozen and its pooled multi-scale features are
computed **once** for every image; then, on those same features, with the same recipe and
seed (``training.fusion.train_fusion_head``):

* ``<member>``: the image-only head (the single model),
* ``<member>_meta``: the head with age, sex and site fused before the classifier,

and the validation-weighted ensembles (``evaluation.ensemble.fit_weights``):
``ensemble_image`` (image-only members) and ``ensemble_meta`` (every head). The best single
model is the image-only member with the best **validation** balanced accuracy. Test
figures carry 95% lesion-bootstrap intervals, and each model's difference from the best
single model a paired interval (``evaluation.ensemble.compare_models``). The saved
ensemble checkpoint is checked against the feature-path probabilities on a few test images.

The split is the project's (``data/03_primary/split_assignment.parquet`` with
``data/02_intermediate/image_index.parquet`` when they exist, else the lesion-grouped
70/15/15 split of the metadata with seed 42).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from skin_lesion_classifier.config_defaults import resolved_parameters, soft_merge
from skin_lesion_classifier.constants import CLASS_TO_INDEX
from skin_lesion_classifier.data.cache import build_image_cache
from skin_lesion_classifier.data.metadata_features import with_metadata
from skin_lesion_classifier.data.splitting import stratified_group_split
from skin_lesion_classifier.evaluation.ensemble import (
    average_probabilities,
    compare_models,
    fit_weights,
)
from skin_lesion_classifier.evaluation.evaluate import predictions_frame
from skin_lesion_classifier.evaluation.metrics import balanced_accuracy
from skin_lesion_classifier.inference.predict import predict_proba
from skin_lesion_classifier.models.checkpoint import load_model, make_checkpoint
from skin_lesion_classifier.models.ensemble_checkpoint import build_ensemble_checkpoint
from skin_lesion_classifier.models.factory import create_model, resolve_preprocessing
from skin_lesion_classifier.models.fusion import proba_from_features
from skin_lesion_classifier.training.engine import extract_features
from skin_lesion_classifier.training.fusion import FusionHeadConfig, train_fusion_head

log = logging.getLogger("bench_ensemble")


def load_split(args) -> pd.DataFrame:
    """Rows with ``image_id, lesion_id, label, split, path, age, sex, localization``."""
    index_p, split_p = Path(args.image_index), Path(args.split)
    if index_p.is_file() and split_p.is_file():
        index = pd.read_parquet(index_p)
        split = pd.read_parquet(split_p)
        rows = split[["image_id", "lesion_id", "dx", "label", "split"]].merge(
            index[["image_id", "path", "age", "sex", "localization"]], on="image_id"
        )
        source = f"{split_p} + {index_p}"
    else:
        data_dir = Path(args.data_dir)
        meta = pd.read_csv(data_dir / "HAM10000_metadata.csv")
        meta["path"] = [str(data_dir / "images" / f"{i}.jpg") for i in meta.image_id]
        meta["label"] = meta.dx.map(CLASS_TO_INDEX)
        meta["split"] = stratified_group_split(meta.label, meta.lesion_id, seed=42)
        rows = meta
        source = f"{data_dir} (lesion-grouped split, seed 42)"
    missing = [p for p in rows.path.head(5) if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"image files not found, e.g. {missing}")
    log.info("split from %s: %s", source, rows.split.value_counts().to_dict())
    return rows.reset_index(drop=True), source


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--env", default="quick", help="Kedro environment of the recipes")
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    ap.add_argument("--image-index", default="data/02_intermediate/image_index.parquet")
    ap.add_argument("--split", default="data/03_primary/split_assignment.parquet")
    ap.add_argument("--data-dir", default="../shared/data/ham10000")
    ap.add_argument(
        "--limit", type=int, default=None, help="N images per split (smoke)"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_wall = time.perf_counter()
    conf = resolved_parameters("ensemble", args.env)
    training = resolved_parameters("training", args.env)
    fusion_cfg = FusionHeadConfig.from_dict({**conf["fusion"], "feature_views": 1})
    rows, source = load_split(args)
    if args.limit:
        rows = pd.concat(
            [
                g.sample(min(args.limit, len(g)), random_state=0)
                for _, g in rows.groupby("split")
            ],
            ignore_index=True,
        )
    parts = {
        s: rows[rows.split == s].reset_index(drop=True)
        for s in ("train", "val", "test")
    }
    device = torch.device("cpu")

    val_probs, test_probs, timings, members_meta, ckpts = {}, {}, {}, {}, {}
    for name, member in conf["members"].items():
        train_cfg = soft_merge(training["train"], member["train"])
        size = tuple(args.size or member["input_size"])
        t0 = time.perf_counter()
        model = create_model(
            train_cfg["arch"],
            pretrained=True,
            input_size=size,
            **(train_cfg.get("model_kwargs") or {}),
        )
        pre = resolve_preprocessing(model)
        meta = {
            "arch": train_cfg["arch"],
            "model_kwargs": dict(train_cfg.get("model_kwargs") or {}),
            "classes": list(CLASS_TO_INDEX),
            "input_size": list(size),
            "mean": pre["mean"],
            "std": pre["std"],
            "train_class_counts": np.bincount(
                parts["train"].label, minlength=7
            ).tolist(),
        }
        cache = build_image_cache(rows, size, num_workers=2, progress=False)
        t1 = time.perf_counter()
        feats = {
            s: extract_features(
                model, cache.take(df.image_id), pre["mean"], pre["std"], device, 64
            )
            for s, df in parts.items()
        }
        t2 = time.perf_counter()
        for tag, use_meta in ((name, False), (f"{name}_meta", True)):
            res = train_fusion_head(
                model,
                meta,
                None,
                parts["train"],
                None,
                parts["val"],
                fusion_cfg,
                device,
                use_metadata=use_meta,
                features=(feats["train"][None], feats["val"]),
            )
            enc_rows = {s: df for s, df in parts.items()}
            from skin_lesion_classifier.data.metadata_features import MetadataEncoder

            enc = MetadataEncoder.fit(parts["train"], fusion_cfg.min_site_count)
            for s, store in (("val", val_probs), ("test", test_probs)):
                m = enc.transform(enc_rows[s]) if use_meta else None
                store[tag] = proba_from_features(res.model, feats[s], m)
            members_meta[tag] = {
                "arch": train_cfg["arch"],
                "best_epoch": res.best_epoch,
            }
            if use_meta:
                ckpts[tag] = res.checkpoint
            else:  # the image-only model as an ordinary checkpoint of the image model
                image_model = res.model.backbone if res.model.own_head else None
                if image_model is not None:
                    ckpts[tag] = make_checkpoint(image_model, meta)
        timings[name] = {
            "cache_s": round(t1 - t0, 1),
            "features_s": round(t2 - t1, 1),
            "features_img_per_s": round(len(rows) / (t2 - t1), 1),
            "heads_s": round(time.perf_counter() - t2, 1),
        }
        log.info("member %s done: %s", name, timings[name])

    y_val = parts["val"].label.to_numpy()
    singles = [n for n in conf["members"]]
    best = max(singles, key=lambda n: balanced_accuracy(y_val, val_probs[n].argmax(1)))
    combos = {
        "ensemble_image": singles,
        "ensemble_meta": list(val_probs),
    }
    weights = {}
    for cname, names in combos.items():
        fit = fit_weights(
            y_val,
            [val_probs[n] for n in names],
            conf["weights"]["objective"],
            conf["weights"].get("grid_step", 0.05),
            names,
        )
        weights[cname] = dict(zip(names, fit["weights"]))
        val_probs[cname] = average_probabilities(
            [val_probs[n] for n in names], fit["weights"]
        )
        test_probs[cname] = average_probabilities(
            [test_probs[n] for n in names], fit["weights"]
        )

    frames = {n: predictions_frame(parts["test"], p) for n, p in test_probs.items()}
    table = compare_models(frames, best, n_boot=args.n_boot, seed=42)
    val_ba = {n: balanced_accuracy(y_val, p.argmax(1)) for n, p in val_probs.items()}

    # the one-file ensemble checkpoint reproduces the feature-path probabilities
    names = [n for n in combos["ensemble_meta"] if n in ckpts]
    ens = build_ensemble_checkpoint(
        [(n, ckpts[n]) for n in names], [weights["ensemble_meta"][n] for n in names]
    )
    ens_model, ens_meta = load_model(ens)
    few = parts["test"].head(16)
    from skin_lesion_classifier.data.images import load_resized
    from skin_lesion_classifier.data.metadata_features import metadata_inputs

    imgs = np.stack([load_resized(p, tuple(ens_meta["input_size"])) for p in few.path])
    p_ckpt = predict_proba(
        ens_model,
        imgs,
        ens_meta["mean"],
        ens_meta["std"],
        extra_inputs=metadata_inputs(ens_meta, with_metadata(few, rows)),
    )
    same_input = all(
        list(conf["members"][m]["input_size"]) == ens_meta["input_size"] or args.size
        for m in conf["members"]
    )
    ckpt_gap = float(np.abs(p_ckpt - test_probs["ensemble_meta"][:16]).max())

    print(f"\nsplit: {source}")
    print(
        f"train/val/test images: {len(parts['train'])}/{len(parts['val'])}/{len(parts['test'])}; "
        f"input {args.size or 'per config'}; device cpu; threads {torch.get_num_threads()}"
    )
    print(f"best single model (by val BA): {best}")
    print(
        f"ensemble weights (val {conf['weights']['objective']}): {json.dumps(weights)}"
    )
    print(
        "\nmodel             val_BA  | test BA [95% CI]        dBA vs best [paired CI]  | "
        "test macro AUC [95% CI]   dAUC [paired CI]"
    )
    for n in frames:
        ba = table[(table.model == n) & (table.metric == "balanced_accuracy")].iloc[0]
        au = table[(table.model == n) & (table.metric == "macro_auc")].iloc[0]
        print(
            f"{n:<17} {val_ba[n]:.4f}  | {ba.estimate:.4f} [{ba.low:.4f}, {ba.high:.4f}]  "
            f"{ba['diff']:+.4f} [{ba.diff_low:+.4f}, {ba.diff_high:+.4f}]  | "
            f"{au.estimate:.4f} [{au.low:.4f}, {au.high:.4f}]  "
            f"{au['diff']:+.4f} [{au.diff_low:+.4f}, {au.diff_high:+.4f}]"
        )
    print(f"\ntimings: {json.dumps(timings)}")
    print(
        f"ensemble checkpoint vs feature path, max |dp| on 16 test images: {ckpt_gap:.2e}"
        f"{'' if same_input else ' (members at other input sizes)'}"
    )
    wall = time.perf_counter() - t_wall
    print(f"wall seconds: {wall:.0f}")
    out = {
        "source": source,
        "size": args.size,
        "best_single": best,
        "weights": weights,
        "val_balanced_accuracy": val_ba,
        "members": members_meta,
        "test": table.to_dict(orient="records"),
        "timings": timings,
        "checkpoint_gap": ckpt_gap,
        "wall_seconds": round(wall, 1),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
