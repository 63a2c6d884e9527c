# ruff: noqa: T201  (an extraction prints its progress)
"""Cache frozen-backbone features of the quick split for head experiments (CPU, minutes).

    python scripts/accuracy/extract_features.py --arch efficientnet_lite0 --size 150 200

Reads the Kedro outputs of `kedro run --env quick --pipelines ingestion,splitting,model_input`
(split assignment + the 150x200 uint8 image cache) and writes, under
``.cache/accuracy/<arch>_<H>x<W>/``, float16 ``(N, D)`` arrays of the multi-scale pooled
features (the quick head's input): ``train_plain``, ``train_aug1``.. (random augmentation of
the training recipe), and ``{val,test}_{plain,hflip,vflip}`` (test-time views). The images
are resized to ``--size`` on the fly (bilinear, antialiased), so upsampled inputs need no
new cache. Nothing here chooses anything: it only computes features.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from skin_lesion_classifier.config_defaults import resolved_parameters
from skin_lesion_classifier.data.augment import augment_batch
from skin_lesion_classifier.data.transforms import normalize
from skin_lesion_classifier.datasets.image_cache import ImageCacheDataset
from skin_lesion_classifier.models.factory import create_model, resolve_preprocessing
from skin_lesion_classifier.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def views_of(x: torch.Tensor, view: str, size, aug, gen) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, h, w) in [0, 1] for one named view."""
    if view.startswith("aug"):
        return augment_batch(x, aug, out_size=size, generator=gen)
    f = x.permute(0, 3, 1, 2).float().div_(255)
    if tuple(f.shape[2:]) != tuple(size):
        f = F.interpolate(
            f, size=tuple(size), mode="bilinear", align_corners=False, antialias=True
        )
    if view == "hflip":
        f = f.flip(3)
    elif view == "vflip":
        f = f.flip(2)
    return f


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, nargs=2, default=[150, 200])
    ap.add_argument("--train-aug-views", type=int, default=1)
    ap.add_argument("--eval-views", nargs="+", default=["plain", "hflip", "vflip"])
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = TrainConfig.from_dict(resolved_parameters("training", "quick")["train"])
    split = pd.read_parquet(ROOT / "data/03_primary/split_assignment.parquet")
    cache = ImageCacheDataset(
        str(ROOT / "data/05_model_input/image_cache_150x200")
    ).load()
    model = create_model(args.arch, pretrained=True, **cfg.model_kwargs).eval()
    prep = resolve_preprocessing(model)
    out = ROOT / ".cache/accuracy" / f"{args.arch}_{args.size[0]}x{args.size[1]}"
    out.mkdir(parents=True, exist_ok=True)
    # the plain views first, then the training augmentations, then the test-time views
    jobs = [(s, "plain") for s in ("val", "test", "train")]
    jobs += [("train", f"aug{k + 1}") for k in range(args.train_aug_views)]
    jobs += [(s, v) for v in args.eval_views if v != "plain" for s in ("val", "test")]
    for name, view in jobs:
        path = out / f"{name}_{view}.npy"
        if path.exists():
            continue
        rows = split[split.split == name]
        images = cache.take(rows.image_id)
        gen = torch.Generator().manual_seed(1000 + sum(map(ord, name + view)))
        t0, feats = time.perf_counter(), []
        for s in range(0, len(images), args.batch):
            x = torch.from_numpy(np.ascontiguousarray(images[s : s + args.batch]))
            x = normalize(
                views_of(x, view, args.size, cfg.augment_config, gen),
                prep["mean"],
                prep["std"],
            )
            feats.append(model.features(x).float().numpy().astype(np.float16))
        np.save(path, np.concatenate(feats))
        if not (out / f"{name}_ids.csv").exists():
            rows[["image_id", "lesion_id", "label"]].to_csv(
                out / f"{name}_ids.csv", index=False
            )
        dt = time.perf_counter() - t0
        print(
            f"{out.name} {name}_{view}: {len(images)} images in {dt:.0f} s ({len(images) / dt:.0f} img/s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
