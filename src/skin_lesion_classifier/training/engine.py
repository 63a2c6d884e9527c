"""The training loop: plain PyTorch, no Kedro, no MLflow.

:func:`train_model` takes uint8 image arrays (the image cache rows of the train and val
splits), integer labels and a :class:`~skin_lesion_classifier.training.config.TrainConfig`,
and returns the best model with its contract checkpoint and the per-epoch history.

Fast path (``data_path: device``, the default on CUDA): the whole uint8 cache lives on the
device and each batch is augmented there (:func:`~skin_lesion_classifier.data.augment.augment_batch`),
in bf16 autocast with channels-last memory. ``data_path: dataloader`` feeds per-sample
torchvision v2 transforms through a ``DataLoader`` instead.

Checkpoints go to ``checkpoint_dir``: ``last.pt`` after every epoch (model, EMA, optimizer,
scheduler, scaler, history, RNG states) and ``best.pt`` (the checkpoint contract of
docs/architecture.md) whenever the monitored validation metric improves. With
``resume: true`` a killed run continues from ``last.pt`` at the next epoch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from timm.utils import ModelEmaV3

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.augment import augment_batch, torchvision_transform
from skin_lesion_classifier.data.transforms import normalize
from skin_lesion_classifier.device import detect_device
from skin_lesion_classifier.inference.predict import predict_proba
from skin_lesion_classifier.models.checkpoint import (
    atomic_torch_save,
    make_checkpoint,
    unwrap_model,
)
from skin_lesion_classifier.models.factory import create_model, resolve_preprocessing
from skin_lesion_classifier.training.config import MONITORS, TrainConfig
from skin_lesion_classifier.training.losses import build_loss
from skin_lesion_classifier.training.sampler import epoch_indices
from skin_lesion_classifier.training.schedulers import (
    build_scheduler,
    steps_per_epoch_scheduler,
)

logger = logging.getLogger(__name__)

HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_balanced_accuracy",
    "val_macro_auc",
    "lr",
    "images_per_second",
    "epoch_seconds",
)


@dataclass
class TrainResult:
    """What :func:`train_model` returns."""

    model: torch.nn.Module  # best weights, eval mode, on CPU
    checkpoint: dict[str, Any]  # {"state_dict", "meta"} per the contract
    history: pd.DataFrame
    best_epoch: int
    best_metrics: dict[str, float]
    stopped_early: bool


# ------------------------------------------------------------------------------ helpers
def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 or fp16 on CUDA only (``auto``: bf16 where supported), else None."""
    if amp == "off" or device.type != "cuda":
        if amp in ("bf16", "fp16") and device.type != "cuda":
            logger.info(
                "Mixed precision %s is CUDA-only; training in fp32 on %s", amp, device
            )
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def macro_auc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean one-vs-rest ROC AUC over the classes that have both positives and negatives
    in ``y_true`` (``sklearn.metrics.roc_auc_score`` per class); NaN when none has."""
    aucs = []
    for c in range(proba.shape[1]):
        pos = y_true == c
        if 0 < pos.sum() < len(y_true):
            aucs.append(roc_auc_score(pos, proba[:, c]))
    return float(np.mean(aucs)) if aucs else float("nan")


def classification_scores(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """``loss`` (mean negative log-likelihood), ``balanced_accuracy`` (mean per-class
    recall, sklearn) and ``macro_auc`` of probabilities ``proba`` against ``y_true``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    p = np.clip(proba[np.arange(len(y_true)), y_true], 1e-12, 1.0)
    return {
        "loss": float(-np.log(p).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, proba.argmax(1))),
        "macro_auc": macro_auc(y_true, proba),
    }


def _fingerprint(
    cfg: TrainConfig, *arrays: np.ndarray, extra: Sequence[str] = ()
) -> str:
    """Hash of the config parts that change the run (not epochs/patience/progress) + data."""
    ignore = {
        "epochs",
        "patience",
        "progress",
        "resume",
        "num_workers",
        "max_train_minutes",
        "eval_batch_size",
        "device",
        "min_delta",
    }
    d = {k: v for k, v in cfg.to_dict().items() if k not in ignore and k not in extra}
    h = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode())
    for arr in arrays:
        h.update(str(np.shape(arr)).encode())
        flat = np.asarray(arr).reshape(-1)
        h.update(np.ascontiguousarray(flat[:: max(1, flat.size // 100_000)]).tobytes())
    return h.hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            np.asarray(state["numpy"], dtype=np.uint32),
            state["numpy_pos"],
            0,
            0.0,
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _feature_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if hasattr(model, "features") and hasattr(model, "head"):
        return model.features
    return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)


def _head_module(model: torch.nn.Module) -> torch.nn.Module:
    if hasattr(model, "features") and hasattr(model, "head"):
        return model.head
    return model.get_classifier()


def _param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Backbone at ``lr * backbone_lr_mult``, head at ``lr``; no weight decay on norms/biases."""
    head_ids = {id(p) for p in _head_module(model).parameters()}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for _name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = id(p) in head_ids
        no_decay = p.ndim <= 1
        groups.setdefault((is_head, no_decay), []).append(p)
    out = []
    # head last, so param_groups[-1] is the head's learning rate
    for (is_head, no_decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": cfg.lr * (1.0 if is_head else cfg.backbone_lr_mult),
                "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            }
        )
    return out


def _build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr)


class _UInt8Dataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        return self.transform(x), int(self.labels[i])


# ------------------------------------------------------------------------------ features
@torch.inference_mode()
def extract_features(
    model: torch.nn.Module,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 128,
    augment=None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "features",
) -> torch.Tensor:
    """Pooled features ``(N, D)`` (float32, on ``device``) of uint8 ``images``; with an
    :class:`~skin_lesion_classifier.data.augment.AugmentConfig` each image is augmented."""
    model.eval()
    fn = _feature_fn(model)
    out = []
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for s in starts:
        x = torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size])).to(
            device
        )
        x = (
            augment_batch(x, augment)
            if augment is not None
            else x.permute(0, 3, 1, 2).float().div_(255)
        )
        x = normalize(x, mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
        ):
            out.append(fn(x).float())
    return torch.cat(out)


# ------------------------------------------------------------------------------ training
def train_model(
    train_images: np.ndarray,
    train_labels: Sequence[int],
    val_images: np.ndarray,
    val_labels: Sequence[int],
    config: TrainConfig | dict[str, Any],
    checkpoint_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    classes: Sequence[str] = CLASSES,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a classifier and return the best model (by ``config.monitor`` on val).

    ``train_images`` / ``val_images``: ``(N, H, W, 3)`` uint8 at ``config.input_size``
    (the image cache rows). ``train_labels`` / ``val_labels``: ints into ``classes``.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg.validate()
    n_classes = len(classes)
    y_train = np.array(train_labels, dtype=np.int64)
    y_val = np.array(val_labels, dtype=np.int64)
    for name, imgs, ys in (
        ("train", train_images, y_train),
        ("val", val_images, y_val),
    ):
        if imgs.ndim != 4 or imgs.shape[-1] != 3 or imgs.dtype != np.uint8:
            raise ValueError(
                f"{name} images must be (N, H, W, 3) uint8, got {imgs.shape} {imgs.dtype}"
            )
        if len(imgs) != len(ys):
            raise ValueError(f"{name}: {len(imgs)} images but {len(ys)} labels")
        if tuple(imgs.shape[1:3]) != tuple(cfg.input_size):
            raise ValueError(
                f"{name} images are {imgs.shape[1]}x{imgs.shape[2]} but input_size is "
                f"{cfg.input_size[0]}x{cfg.input_size[1]}: rebuild the image cache at the "
                "training resolution"
            )
        if len(ys) and (ys.min() < 0 or ys.max() >= n_classes):
            raise ValueError(
                f"{name} labels must be in 0..{n_classes - 1}, got {ys.min()}..{ys.max()}"
            )
    if len(y_train) == 0 or len(y_val) == 0:
        raise ValueError(
            f"need training and validation images, got {len(y_train)} and {len(y_val)}"
        )

    device = detect_device(cfg.device) if device is None else torch.device(device)
    seed_everything(cfg.seed, cfg.deterministic)
    amp_dtype = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    counts = np.bincount(y_train, minlength=n_classes)

    model = create_model(
        cfg.arch,
        num_classes=n_classes,
        pretrained=cfg.pretrained,
        allow_random_init=cfg.allow_random_init,
        input_size=cfg.input_size,
        **cfg.model_kwargs,
    )
    prep = resolve_preprocessing(model)
    mean, std = prep["mean"], prep["std"]
    meta_base = {
        "arch": cfg.arch,
        "model_kwargs": dict(cfg.model_kwargs),
        "classes": list(classes),
        "input_size": list(cfg.input_size),
        "mean": mean,
        "std": std,
        "interpolation": prep["interpolation"],
        "uses_metadata": False,
        "train_class_counts": counts.tolist(),
        "training": {"train_mode": cfg.train_mode, "pretrained": cfg.pretrained},
    }
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    aug = cfg.augment_config
    frozen = cfg.train_mode == "frozen_features"

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    fingerprint = _fingerprint(cfg, y_train, y_val, train_images, val_images)

    # ---- what is trained, and how a batch is formed
    if frozen:
        for p in model.parameters():
            p.requires_grad_(False)
        trainable = _head_module(model)
        for p in trainable.parameters():
            p.requires_grad_(True)
        train_feats, val_feats = _frozen_features(
            model, cfg, train_images, val_images, mean, std, device, amp_dtype, ckpt_dir
        )
        data_path = "features"
    else:
        trainable = model
        data_path = cfg.data_path
        if data_path == "auto":
            data_path = "device" if device.type == "cuda" else "dataloader"
    n_train = len(y_train)
    samples_per_epoch = int(cfg.samples_per_epoch or n_train)
    micro_batches = math.ceil(samples_per_epoch / cfg.batch_size)
    steps_per_epoch = max(1, math.ceil(micro_batches / cfg.grad_accum_steps))

    compiled = trainable
    if cfg.compile and device.type == "cuda" and not frozen:
        compiled = torch.compile(trainable)

    optimizer = _build_optimizer(
        _param_groups(model, cfg)
        if not frozen
        else [
            {
                "params": [p for p in trainable.parameters() if p.ndim > 1],
                "weight_decay": cfg.weight_decay,
            },
            {
                "params": [p for p in trainable.parameters() if p.ndim <= 1],
                "weight_decay": 0.0,
            },
        ],
        cfg,
    )
    scheduler = build_scheduler(
        optimizer,
        cfg.scheduler,
        total_steps=steps_per_epoch * cfg.epochs,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=cfg.warmup_epochs,
        min_lr_ratio=cfg.min_lr_ratio,
        restart_epochs=cfg.restart_epochs,
        restart_mult=cfg.restart_mult,
        plateau_factor=cfg.plateau_factor,
        plateau_patience=cfg.plateau_patience,
    )
    per_epoch_sched = steps_per_epoch_scheduler(cfg.scheduler)
    criterion = build_loss(
        cfg.loss, counts, cfg.class_weight_power, cfg.label_smoothing, cfg.focal_gamma
    ).to(device)
    # The warm-up needs the step: decay_t = min(ema_decay, 1 - (1 + t) ** -2/3), so the
    # average forgets the starting weights within the first epochs (without the step timm
    # applies ema_decay from step 1 and the new head's start lingers for many epochs).
    ema = (
        ModelEmaV3(trainable, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
    )

    # ---- resume
    start_epoch, history, best_score, best_epoch, bad_epochs = 1, [], None, 0, 0
    mode = MONITORS[cfg.monitor]
    last_path = ckpt_dir / "last.pt" if ckpt_dir else None
    best_path = ckpt_dir / "best.pt" if ckpt_dir else None
    if cfg.resume and last_path is not None and last_path.is_file():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != fingerprint:
            logger.warning(
                "%s was written by a different config or data; starting afresh",
                last_path,
            )
        else:
            trainable.load_state_dict(state["trainable"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            if ema is not None and state.get("ema") is not None:
                ema.module.load_state_dict(state["ema"])
            history = list(state["history"])
            best_score, best_epoch, bad_epochs = (
                state["best_score"],
                state["best_epoch"],
                state["bad_epochs"],
            )
            start_epoch = int(state["epoch"]) + 1
            _set_rng_state(state["rng"])
            logger.info("Resuming from %s at epoch %d", last_path, start_epoch)
    best_state = None
    if best_epoch and best_path is not None and best_path.is_file():
        best_state = torch.load(best_path, map_location="cpu", weights_only=True)

    # ---- the data feeders
    if data_path == "device":
        train_dev = torch.from_numpy(np.ascontiguousarray(train_images)).to(device)
    labels_dev = torch.from_numpy(y_train).to(device)
    loader = None
    if data_path == "dataloader":
        ds = _UInt8Dataset(
            train_images, y_train, torchvision_transform(aug, cfg.input_size, mean, std)
        )

    def batches(epoch_idx: torch.Tensor):
        if data_path == "dataloader":
            nonlocal loader
            loader = torch.utils.data.DataLoader(
                ds,
                batch_size=cfg.batch_size,
                sampler=epoch_idx.tolist(),
                num_workers=cfg.num_workers,
                pin_memory=device.type == "cuda",
                persistent_workers=False,
            )
            for xb, yb in loader:
                x = xb.to(device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, yb.to(device, non_blocking=True)
            return
        for s in range(0, len(epoch_idx), cfg.batch_size):
            idx = epoch_idx[s : s + cfg.batch_size].to(device)
            if data_path == "features":
                view = torch.randint(
                    0, train_feats.shape[0], (len(idx),), device=device
                )
                yield train_feats[view, idx], labels_dev[idx]
            else:
                x = normalize(augment_batch(train_dev[idx], aug), mean, std)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, labels_dev[idx]

    def evaluate(module: torch.nn.Module) -> np.ndarray:
        if frozen:
            module.eval()
            with torch.inference_mode():
                out = []
                for s in range(0, len(val_feats), cfg.eval_batch_size):
                    out.append(
                        torch.softmax(
                            module(val_feats[s : s + cfg.eval_batch_size]).float(), 1
                        )
                    )
            return torch.cat(out).cpu().numpy()
        with torch.autocast(
            device.type, dtype=amp_dtype, enabled=amp_dtype is not None
        ):
            return predict_proba(
                module, val_images, mean, std, device, cfg.eval_batch_size
            )

    # ---- the loop
    t_start = time.perf_counter()
    optimizer_steps = (start_epoch - 1) * steps_per_epoch
    stopped_early = False
    gen = torch.Generator()
    for epoch in range(start_epoch, cfg.epochs + 1):
        gen.manual_seed(cfg.seed * 1000 + epoch)
        epoch_idx = epoch_indices(y_train, cfg.sampler_power, samples_per_epoch, gen)
        trainable.train()
        if frozen:
            model.eval()
            trainable.train()
        t0 = time.perf_counter()
        loss_sum, seen = torch.zeros((), device=device), 0
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=samples_per_epoch,
                desc=f"epoch {epoch}/{cfg.epochs}",
                unit="img",
                leave=False,
                mininterval=1.0,
            )
        optimizer.zero_grad(set_to_none=True)
        for k, (x, y) in enumerate(batches(epoch_idx)):
            with torch.autocast(
                device.type, dtype=amp_dtype, enabled=amp_dtype is not None
            ):
                logits = compiled(x)
            loss = criterion(logits.float(), y)
            scaler.scale(loss / cfg.grad_accum_steps).backward()
            last_micro = (k + 1) % cfg.grad_accum_steps == 0 or (k + 1) == micro_batches
            if last_micro:
                if cfg.grad_clip and cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(
                        trainable.parameters(), cfg.grad_clip
                    )
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if not per_epoch_sched:
                    scheduler.step()
                optimizer_steps += 1
                if ema is not None:
                    ema.update(trainable, step=optimizer_steps)
            # summed on the device: no host sync per step (that would stall a GPU)
            loss_sum = loss_sum + loss.detach().float() * len(y)
            seen += len(y)
            if bar is not None:
                bar.update(len(y))
                if k % 50 == 0:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", refresh=False)
        if bar is not None:
            bar.close()
        total_loss = float(loss_sum.item())
        if not math.isfinite(total_loss):
            raise FloatingPointError(
                f"training loss became {total_loss} in epoch {epoch}; lower lr or enable "
                "grad_clip"
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - t0
        eval_module = ema.module if ema is not None else trainable
        proba = evaluate(
            eval_module if frozen else (ema.module if ema is not None else compiled)
        )
        scores = classification_scores(y_val, proba)
        row = {
            "epoch": epoch,
            "train_loss": total_loss / max(1, seen),
            "val_loss": scores["loss"],
            "val_balanced_accuracy": scores["balanced_accuracy"],
            "val_macro_auc": scores["macro_auc"],
            "lr": float(optimizer.param_groups[-1]["lr"]),
            "images_per_second": seen / max(train_seconds, 1e-9),
            "epoch_seconds": time.perf_counter() - t0,
        }
        history.append(row)
        if per_epoch_sched:
            scheduler.step(row[cfg.monitor])
        score = row[cfg.monitor]
        improved = best_score is None or (
            score > best_score + cfg.min_delta
            if mode == "max"
            else score < best_score - cfg.min_delta
        )
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch, 0
            best_state = _best_checkpoint(
                model, trainable, eval_module, frozen, meta_base, row
            )
            if best_path is not None:
                atomic_torch_save(best_state, best_path)
        else:
            bad_epochs += 1
        logger.info(
            "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_BA %.4f  val_AUC %.4f  lr %.2e  %.0f img/s%s",
            epoch,
            cfg.epochs,
            row["train_loss"],
            row["val_loss"],
            row["val_balanced_accuracy"],
            row["val_macro_auc"],
            row["lr"],
            row["images_per_second"],
            "  *" if improved else "",
        )
        if last_path is not None:
            atomic_torch_save(
                {
                    "fingerprint": fingerprint,
                    "epoch": epoch,
                    "trainable": unwrap_model(trainable).state_dict(),
                    "ema": ema.module.state_dict() if ema is not None else None,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "history": history,
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs,
                    "rng": _rng_state(),
                    "config": cfg.to_dict(),
                },
                last_path,
            )
        if (
            on_epoch_end is not None
        ):  # after last.pt: a callback that stops the run can resume
            on_epoch_end(dict(row))
        if bad_epochs >= cfg.patience:
            logger.info(
                "Early stop: %s did not improve for %d epochs",
                cfg.monitor,
                cfg.patience,
            )
            stopped_early = True
            break
        if (
            cfg.max_train_minutes
            and (time.perf_counter() - t_start) / 60 > cfg.max_train_minutes
        ):
            logger.info(
                "Stopping: the %.1f-minute training budget is spent",
                cfg.max_train_minutes,
            )
            stopped_early = True
            break

    if best_state is None:  # resumed a finished run without best.pt
        best_state = _best_checkpoint(
            model,
            trainable,
            ema.module if ema else trainable,
            frozen,
            meta_base,
            history[-1] if history else {},
        )
    final = create_model(
        cfg.arch,
        num_classes=n_classes,
        pretrained=False,
        allow_random_init=True,
        input_size=cfg.input_size,
        check_size=False,
        **cfg.model_kwargs,
    )
    final.load_state_dict(best_state["state_dict"])
    final.eval()
    hist = pd.DataFrame(history, columns=list(HISTORY_COLUMNS))
    best_row = (
        hist.loc[hist.epoch == best_epoch].iloc[0].to_dict() if best_epoch else {}
    )
    best_metrics = {k: float(v) for k, v in best_row.items() if k.startswith("val_")}
    return TrainResult(
        final, best_state, hist, int(best_epoch), best_metrics, stopped_early
    )


def _best_checkpoint(
    model, trainable, eval_module, frozen, meta_base, row
) -> dict[str, Any]:
    """The contract checkpoint of the current evaluation weights (EMA when on)."""
    full = copy.deepcopy(unwrap_model(model)).cpu()
    if frozen:
        _head_module(full).load_state_dict(unwrap_model(eval_module).state_dict())
    else:
        full.load_state_dict(unwrap_model(eval_module).state_dict())
    meta = dict(meta_base)
    meta["metrics"] = {k: float(v) for k, v in row.items() if k.startswith("val_")}
    meta["training"] = {**meta_base["training"], "epoch": int(row.get("epoch", 0))}
    return make_checkpoint(full.to(memory_format=torch.contiguous_format), meta)


def _frozen_features(
    model, cfg, train_images, val_images, mean, std, device, amp_dtype, ckpt_dir
):
    """``(views, N_train, D)`` train features (view 0 plain, the rest augmented) and
    ``(N_val, D)`` val features, cached in ``ckpt_dir/features.pt`` when given."""
    key = _fingerprint(
        cfg,
        train_images,
        val_images,
        extra=(
            "epochs",
            "lr",
            "batch_size",
            "optimizer",
            "weight_decay",
            "scheduler",
            "warmup_epochs",
            "min_lr_ratio",
            "loss",
            "label_smoothing",
            "class_weight_power",
            "focal_gamma",
            "sampler_power",
            "ema",
            "ema_decay",
            "monitor",
            "grad_clip",
            "grad_accum_steps",
            "samples_per_epoch",
            "backbone_lr_mult",
            "restart_epochs",
            "restart_mult",
            "plateau_factor",
            "plateau_patience",
            "compile",
        ),
    )
    path = ckpt_dir / "features.pt" if ckpt_dir else None
    if path is not None and path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key:
            logger.info("Reusing frozen-backbone features from %s", path)
            return cached["train"].to(device), cached["val"].to(device)
    aug = cfg.augment_config
    kw = dict(
        mean=mean,
        std=std,
        device=device,
        batch_size=cfg.eval_batch_size,
        autocast_dtype=amp_dtype,
        channels_last=cfg.channels_last,
        progress=cfg.progress,
    )
    views = [extract_features(model, train_images, desc="train features (plain)", **kw)]
    for v in range(1, cfg.feature_views):
        views.append(
            extract_features(
                model,
                train_images,
                augment=aug,
                desc=f"train features (view {v + 1})",
                **kw,
            )
        )
    train_feats = torch.stack(views)
    val_feats = extract_features(model, val_images, desc="val features", **kw)
    if path is not None:
        atomic_torch_save(
            {"key": key, "train": train_feats.cpu(), "val": val_feats.cpu()}, path
        )
    return train_feats, val_feats


__all__ = [
    "HISTORY_COLUMNS",
    "TrainResult",
    "classification_scores",
    "extract_features",
    "macro_auc",
    "resolve_amp",
    "seed_everything",
    "train_model",
]
