# ruff: noqa: T201  (an experiment prints its figures)
"""How the quick head is started, averaged and selected, over several seeds (CPU, minutes).

    python scripts/accuracy/head_selection.py zero,zero+monitor=val_loss 42,1,2

Trains the quick default's head (``kedro run --env quick``'s training parameters, the
training engine's own ``train_model``) on the frozen-backbone features that a quick run
cached in ``data/06_models/checkpoints_quick/features.pt``, once per variant and seed, and
prints one JSON line per run: the epoch kept, its validation balanced accuracy, and the
plain test balanced accuracy and macro AUC of that epoch (for explaining a change, not for
choosing: choose on validation). A variant is a base and ``+key=value`` overrides of
``training.train``; bases:

* ``zero``: the code as it is (new head started at zero, EMA warm-up follows the steps),
* ``timm``: the new head keeps timm's initialisation,
* ``...-oldema``: the EMA gets no step (decay ``ema_decay`` from the first step).

The features are reused for every seed (only the head's seed changes).
"""

from __future__ import annotations

import json
import os
import sys
import time

import pandas as pd
import torch
from timm.utils import ModelEmaV3

from skin_lesion_classifier.config_defaults import resolved_parameters
from skin_lesion_classifier.datasets.image_cache import ImageCacheDataset
from skin_lesion_classifier.evaluation.metrics import balanced_accuracy, macro_roc_auc
from skin_lesion_classifier.models import factory
from skin_lesion_classifier.training import engine

INIT_NEW_CLASSIFIER = factory.init_new_classifier
EMA_UPDATE = ModelEmaV3.update


def configure(variant: str, seed: int) -> dict:
    """Patch the two behaviours a base names and return its ``training.train`` dict."""
    base, *overrides = variant.split("+")
    factory.init_new_classifier = (
        (lambda model, std=0.0: None)
        if base.startswith("timm")
        else INIT_NEW_CLASSIFIER
    )
    ModelEmaV3.update = (
        (lambda self, model, step=None: EMA_UPDATE(self, model))
        if base.endswith("-oldema")
        else EMA_UPDATE
    )
    train = dict(resolved_parameters("training", "quick")["train"], seed=seed)
    train["progress"] = False
    for kv in overrides:
        key, value = kv.split("=", 1)
        old = train[key]
        train[key] = value == "true" if isinstance(old, bool) else type(old)(value)
    return train


def main() -> None:
    variants, seeds = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")]
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    split = pd.read_parquet("data/03_primary/split_assignment.parquet")
    cache = ImageCacheDataset("data/05_model_input/image_cache_150x200").load()
    tr, va, te = (split[split.split == s] for s in ("train", "val", "test"))
    cached = torch.load(
        "data/06_models/checkpoints_quick/features.pt", weights_only=True
    )
    engine._frozen_features = lambda *a, **k: (cached["train"], cached["val"])
    test_feats = None
    for variant in variants:
        for seed in seeds:
            t0 = time.perf_counter()
            res = engine.train_model(
                cache.take(tr.image_id),
                tr.label.to_numpy(),
                cache.take(va.image_id),
                va.label.to_numpy(),
                configure(variant, seed),
                device="cpu",
            )
            meta = res.checkpoint["meta"]
            model = factory.create_model(
                meta["arch"], pretrained=False, num_classes=7, **meta["model_kwargs"]
            )
            model.load_state_dict(res.checkpoint["state_dict"])
            model.eval()
            if test_feats is None:
                test_feats = engine.extract_features(
                    model,
                    cache.take(te.image_id),
                    meta["mean"],
                    meta["std"],
                    torch.device("cpu"),
                    64,
                )
            with torch.no_grad():
                proba = torch.softmax(engine._head_module(model)(test_feats), 1).numpy()
            y = te.label.to_numpy()
            kept = res.history[res.history.epoch == meta["training"]["epoch"]].iloc[0]
            print(
                json.dumps(
                    {
                        "variant": variant,
                        "seed": seed,
                        "epoch_kept": int(kept.epoch),
                        "val_ba": round(float(kept.val_balanced_accuracy), 4),
                        "test_ba": round(balanced_accuracy(y, proba.argmax(1)), 4),
                        "test_auc": round(macro_roc_auc(y, proba), 4),
                        "seconds": round(time.perf_counter() - t0),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
