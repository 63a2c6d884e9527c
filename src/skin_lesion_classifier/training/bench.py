"""Training benchmark on the full HAM10000, without Kedro or MLflow.

    python -m skin_lesion_classifier.training.bench \\
        --config conf/quick/parameters_training.yml --data-dir ../shared/data/ham10000

Reads the metadata CSV, finds the images (one folder or the two 600x450 release parts),
makes the lesion-grouped, class-stratified 70/15/15 split with the project's
``stratified_group_split``, builds the uint8 cache at the training resolution, trains with
the given config and prints: cache seconds, train images/s, inference images/s, wall time,
and validation and test balanced accuracy and macro AUC. Runs on CPU and CUDA.
``--set 'distributed={nproc_per_node: 2}'`` trains with 2 DDP processes instead
(``make bench-ddp`` compares 1 and N processes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from skin_lesion_classifier.config_defaults import resolved_parameters
from skin_lesion_classifier.constants import CLASS_TO_INDEX, CLASSES
from skin_lesion_classifier.data.cache import build_image_cache
from skin_lesion_classifier.data.images import IMAGE_SUFFIXES
from skin_lesion_classifier.data.splitting import stratified_group_split
from skin_lesion_classifier.device import detect_device
from skin_lesion_classifier.inference.predict import predict_proba
from skin_lesion_classifier.training.config import TrainConfig, base_train_params
from skin_lesion_classifier.training.engine import train_model
from skin_lesion_classifier.training.launch import launch_training, resolve_nproc
from skin_lesion_classifier.training.loop import validation_scores


def load_train_config(path: str | Path) -> dict[str, Any]:
    """The ``train`` options as ``kedro run`` resolves them: for a parameters file of a
    Kedro environment (``conf/<env>/parameters_training.yml``) ``training.train`` of that
    environment on top of ``conf/base`` (with its ``globals.yml``); for any other file its
    ``training.train`` or plain mapping of :class:`TrainConfig` fields on top of
    ``conf/base``'s."""
    path = Path(path).resolve()
    if (path.parent.parent / "base").is_dir() and path.name.startswith("parameters"):
        return resolved_parameters("training", path.parent.name, path.parent.parent)[
            "train"
        ]
    data = yaml.safe_load(path.read_text()) or {}
    if "training" in data:
        data = data["training"]
    return base_train_params(data.get("train", data))


def find_images(data_dir: Path) -> dict[str, Path]:
    """``image_id -> path`` for every image file under ``data_dir`` (recursively)."""
    found = {}
    for p in data_dir.rglob("*"):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            found.setdefault(p.stem, p)
    return found


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--config",
        required=True,
        help="parameters YAML (training.train) or TrainConfig YAML",
    )
    ap.add_argument("--data-dir", default="../shared/data/ham10000")
    ap.add_argument(
        "--device", default=None, help="auto, cuda, mps or cpu (default: the config's)"
    )
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only N random lesions (smoke runs)",
    )
    ap.add_argument(
        "--checkpoint-dir", default=None, help="keep checkpoints (default: none)"
    )
    ap.add_argument("--seed", type=int, default=42, help="split seed")
    ap.add_argument(
        "--workers", type=int, default=2, help="threads for the image cache"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=YAML",
        help="override a train option, e.g. --set lr=0.001",
    )
    ap.add_argument(
        "--json", default=None, help="also write the figures to this JSON file"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    t_wall = time.perf_counter()
    params = load_train_config(args.config)
    for item in args.set:
        key, _, value = item.partition("=")
        params[key] = yaml.safe_load(value)
    if args.epochs is not None:
        params["epochs"] = args.epochs
    if args.device is not None:
        params["device"] = args.device
    cfg = TrainConfig.from_dict(params)
    device = detect_device(cfg.device)

    data_dir = Path(args.data_dir)
    meta = pd.read_csv(next(data_dir.glob("*metadata*.csv")))
    paths = find_images(data_dir)
    missing = sorted(set(meta.image_id) - set(paths))
    if missing:
        raise SystemExit(
            f"{len(missing)} images listed in the metadata are missing: {missing[:5]}"
        )
    if args.limit:
        lesions = meta.lesion_id.drop_duplicates()
        keep = lesions.sample(min(args.limit, len(lesions)), random_state=args.seed)
        meta = meta[meta.lesion_id.isin(keep)]
    meta = meta.reset_index(drop=True)
    meta["path"] = [str(paths[i]) for i in meta.image_id]
    meta["label"] = meta.dx.map(CLASS_TO_INDEX)
    meta["split"] = stratified_group_split(meta.label, meta.lesion_id, seed=args.seed)

    t0 = time.perf_counter()
    cache = build_image_cache(
        meta, cfg.input_size, num_workers=args.workers, progress=cfg.progress
    )
    cache_s = time.perf_counter() - t0
    parts = {s: meta[meta.split == s] for s in ("train", "val", "test")}
    imgs = {s: cache.take(df.image_id) for s, df in parts.items()}

    t0 = time.perf_counter()
    if (
        cfg.distributed
    ):  # DDP workers on this machine (startup included in train_seconds)
        result = launch_training(
            cache.images,
            cache.rows(parts["train"].image_id),
            parts["train"].label.values,
            cache.rows(parts["val"].image_id),
            parts["val"].label.values,
            cfg,
            args.checkpoint_dir,
            CLASSES,
        )
    else:
        result = train_model(
            imgs["train"],
            parts["train"].label.values,
            imgs["val"],
            parts["val"].label.values,
            cfg,
            checkpoint_dir=args.checkpoint_dir,
            device=device,
        )
    train_s = time.perf_counter() - t0
    hist = result.history
    # images through the training steps per second (the median epoch; for frozen_features
    # this is the head only, the one-off feature extraction is in train_seconds)
    train_ips = float(hist.images_per_second.median()) if len(hist) else float("nan")

    model = result.model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    m, s = result.checkpoint["meta"]["mean"], result.checkpoint["meta"]["std"]
    scores = {}
    infer_ips = float("nan")
    for split in ("val", "test"):
        t0 = time.perf_counter()
        with torch.autocast(
            device.type,
            dtype=torch.bfloat16,
            enabled=device.type == "cuda" and cfg.amp != "off",
        ):
            proba = predict_proba(model, imgs[split], m, s, device, cfg.eval_batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if split == "test":
            infer_ips = len(imgs[split]) / dt
        scores[split] = validation_scores(parts[split].label.values, proba)

    figures = {
        "device": str(device),
        "arch": cfg.arch,
        "train_mode": cfg.train_mode,
        "processes": resolve_nproc(cfg.distributed["nproc_per_node"])
        if cfg.distributed
        else 1,
        "input_size": list(cfg.input_size),
        "n_train": len(parts["train"]),
        "n_val": len(parts["val"]),
        "n_test": len(parts["test"]),
        "epochs_run": len(hist),
        "best_epoch": result.best_epoch,
        "cache_seconds": round(cache_s, 1),
        "train_seconds": round(train_s, 1),
        "train_images_per_second": round(train_ips, 1),
        "inference_images_per_second": round(infer_ips, 1),
        "wall_seconds": round(time.perf_counter() - t_wall, 1),
        "val_balanced_accuracy": round(scores["val"]["val_balanced_accuracy"], 4),
        "val_macro_auc": round(scores["val"]["val_macro_auc"], 4),
        "test_balanced_accuracy": round(scores["test"]["val_balanced_accuracy"], 4),
        "test_macro_auc": round(scores["test"]["val_macro_auc"], 4),
    }
    width = max(len(k) for k in figures)
    for k, v in figures.items():
        print(f"{k:<{width}}  {v}")  # noqa: T201
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
