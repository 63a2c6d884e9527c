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
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.utils import ModelEmaV3

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.augment import augment_batch
from skin_lesion_classifier.data.transforms import normalize
from skin_lesion_classifier.device import detect_device
from skin_lesion_classifier.inference.predict import predict_proba
from skin_lesion_classifier.models.checkpoint import (
    atomic_torch_save,
    make_checkpoint,
    unwrap_model,
)
from skin_lesion_classifier.models.factory import create_model, resolve_preprocessing
from skin_lesion_classifier.models.stages import freeze_leading_stages
from skin_lesion_classifier.training.config import MONITORS, TrainConfig
from skin_lesion_classifier.training.distributed import (
    SINGLE,
    DistContext,
    gather_rows,
    shard_bounds,
)
from skin_lesion_classifier.training.feeders import (
    DeviceFeeder,
    FeatureFeeder,
    LoaderFeeder,
    _UInt8Dataset,  # noqa: F401  (re-exported for callers of the old location)
    count_batches,
)
from skin_lesion_classifier.training.loop import (
    FitSpec,
    FitState,
    Stepper,
    fit,
    monitor_rule,
    validation_scores,
)
from skin_lesion_classifier.training.losses import build_loss
from skin_lesion_classifier.training.resume import fingerprint, load_last, save_last
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


# ------------------------------------------------------------------------------ setup
def check_inputs(
    train_images, y_train, val_images, y_val, cfg: TrainConfig, n_classes: int
) -> None:
    """Shapes, sizes and labels of the two splits; ``ValueError`` naming the culprit."""
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


def build_model(
    cfg: TrainConfig, classes: Sequence[str], counts: np.ndarray, device: torch.device
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model on ``device`` and the checkpoint meta it will carry."""
    model = create_model(
        cfg.arch,
        num_classes=len(classes),
        pretrained=cfg.pretrained,
        allow_random_init=cfg.allow_random_init,
        input_size=cfg.input_size,
        **cfg.model_kwargs,
    )
    prep = resolve_preprocessing(model)
    meta_base = {
        "arch": cfg.arch,
        "model_kwargs": dict(cfg.model_kwargs),
        "classes": list(classes),
        "input_size": list(cfg.input_size),
        "mean": prep["mean"],
        "std": prep["std"],
        "interpolation": prep["interpolation"],
        "uses_metadata": False,
        "train_class_counts": counts.tolist(),
        "training": {
            "train_mode": cfg.train_mode,
            "frozen_stages": cfg.frozen_stages,
            "pretrained": cfg.pretrained,
        },
    }
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, meta_base


def build_optimization(
    model: torch.nn.Module,
    trainable: torch.nn.Module,
    frozen: bool,
    cfg: TrainConfig,
    steps_per_epoch: int,
):
    """AdamW/SGD over the trainable parameters and the LR schedule."""
    if frozen:
        params = [
            {
                "params": [p for p in trainable.parameters() if p.ndim > 1],
                "weight_decay": cfg.weight_decay,
            },
            {
                "params": [p for p in trainable.parameters() if p.ndim <= 1],
                "weight_decay": 0.0,
            },
        ]
    else:
        params = _param_groups(model, cfg)
    optimizer = _build_optimizer(params, cfg)
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
    return optimizer, scheduler


def wrap_ddp(
    module: torch.nn.Module, cfg: TrainConfig, device: torch.device, ctx: DistContext
) -> torch.nn.Module | None:
    """The ``DistributedDataParallel`` wrapper of ``module`` (None when single). With
    ``sync_bn`` the BatchNorm layers share their batch statistics across ranks (CUDA)."""
    if not ctx.enabled:
        return None
    if cfg.sync_bn:
        if device.type != "cuda":
            raise ValueError(
                "sync_bn: true needs CUDA (torch SyncBatchNorm runs on GPUs only); "
                "on CPU use a model without BatchNorm or sync_bn: false"
            )
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


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
    dist_context: DistContext = SINGLE,
) -> TrainResult:
    """Train a classifier and return the best model (by ``config.monitor`` on val).

    ``train_images`` / ``val_images``: ``(N, H, W, 3)`` uint8 at ``config.input_size``
    (the image cache rows). ``train_labels`` / ``val_labels``: ints into ``classes``.
    Under DDP (``dist_context`` from
    :func:`~skin_lesion_classifier.training.distributed.init_from_env`) every rank calls
    this with the same arguments; ``config.batch_size`` is the global batch.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg.validate()
    ctx = dist_context
    y_train = np.array(train_labels, dtype=np.int64)
    y_val = np.array(val_labels, dtype=np.int64)
    check_inputs(train_images, y_train, val_images, y_val, cfg, len(classes))
    device = detect_device(cfg.device) if device is None else torch.device(device)
    seed_everything(cfg.seed, cfg.deterministic)
    amp_dtype = resolve_amp(cfg.amp, device)
    counts = np.bincount(y_train, minlength=len(classes))
    model, meta_base = build_model(cfg, classes, counts, device)
    frozen = cfg.train_mode == "frozen_features"
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    # ---- what is trained, and how a batch is formed
    kept_frozen = freeze_leading_stages(model, cfg.frozen_stages) if not frozen else []
    trainable, feeder, val_feats = _trainable_and_feeder(
        model,
        meta_base,
        cfg,
        train_images,
        y_train,
        val_images,
        device,
        amp_dtype,
        ckpt_dir,
        ctx,
    )
    samples_per_epoch = int(cfg.samples_per_epoch or len(y_train))
    n_micro = count_batches(samples_per_epoch, cfg.batch_size, ctx)
    steps_per_epoch = max(1, math.ceil(n_micro / cfg.grad_accum_steps))
    optimizer, scheduler = build_optimization(
        model, trainable, frozen, cfg, steps_per_epoch
    )
    stepper = _build_stepper(
        trainable, optimizer, scheduler, counts, cfg, device, amp_dtype
    )

    # ---- resume, then wrap (DDP starts every rank from rank 0's weights)
    key = fingerprint(cfg, y_train, y_val, train_images, val_images)
    state = _resume_and_wrap(
        stepper, trainable, cfg, key, ckpt_dir, steps_per_epoch, device, ctx
    )
    best = _BestKeeper(
        model, trainable, stepper, frozen, meta_base, ckpt_dir, ctx, state
    )

    def set_train_mode() -> None:
        if frozen:
            model.eval()
        trainable.train()
        for module in kept_frozen:  # frozen stages keep their BatchNorm statistics
            module.eval()

    def evaluate() -> dict[str, float]:
        module = stepper.ema.module if stepper.ema is not None else trainable
        proba = _validation_proba(
            module,
            frozen,
            val_feats,
            val_images,
            meta_base,
            device,
            amp_dtype,
            cfg,
            ctx,
        )
        return validation_scores(y_val, proba)

    stopped_early = fit(
        stepper,
        _epoch_feed(feeder, y_train, cfg, samples_per_epoch),
        set_train_mode,
        evaluate,
        _fit_spec(cfg, samples_per_epoch, ctx),
        state,
        ctx,
        on_improved=best.keep,
        on_epoch_saved=lambda row, st: save_last(
            ckpt_dir / "last.pt" if ckpt_dir else None,
            key,
            row["epoch"],
            stepper,
            st,
            cfg,
            ctx,
        ),
        on_epoch_end=on_epoch_end,
    )
    return _finalise(cfg, classes, best.checkpoint(), state, stopped_early)


def _resume_and_wrap(
    stepper: Stepper,
    trainable: torch.nn.Module,
    cfg: TrainConfig,
    key: str,
    ckpt_dir: Path | None,
    steps_per_epoch: int,
    device: torch.device,
    ctx: DistContext,
) -> FitState:
    """Load ``last.pt`` (``resume: true``), seed the ranks apart on a fresh start, then
    wrap the trainable module (DDP, ``torch.compile``) as the stepper's forward. Returns
    the loop's starting state."""
    last_path = ckpt_dir / "last.pt" if cfg.resume and ckpt_dir else None
    state = load_last(last_path, key, stepper, ctx)
    stepper.steps_done = (state.start_epoch - 1) * steps_per_epoch
    if state.start_epoch == 1 and ctx.enabled:  # augmentation/dropout differ per rank
        torch.manual_seed(cfg.seed + 1000 * ctx.rank)
        np.random.seed(cfg.seed + 1000 * ctx.rank)
    stepper.ddp = wrap_ddp(trainable, cfg, device, ctx)
    core = stepper.ddp if stepper.ddp is not None else trainable
    frozen = cfg.train_mode == "frozen_features"
    if cfg.compile and device.type == "cuda" and not frozen:
        core = torch.compile(core)
    stepper.forward = core
    return state


def _epoch_feed(
    feeder, y_train: np.ndarray, cfg: TrainConfig, samples_per_epoch: int
) -> Callable[[int], Any]:
    """``epoch -> batches``: the epoch's class-balanced draw (seeded per epoch) fed to
    ``feeder``."""
    gen = torch.Generator()

    def feed(epoch: int):
        gen.manual_seed(cfg.seed * 1000 + epoch)
        return feeder(epoch_indices(y_train, cfg.sampler_power, samples_per_epoch, gen))

    return feed


def _fit_spec(cfg: TrainConfig, samples_per_epoch: int, ctx: DistContext) -> FitSpec:
    """The epoch loop's settings: epochs, early stopping on ``cfg.monitor``, time cap."""
    return FitSpec(
        epochs=cfg.epochs,
        patience=cfg.patience,
        is_better=monitor_rule(cfg.monitor, MONITORS[cfg.monitor], cfg.min_delta),
        scheduler_metric=cfg.monitor,
        max_train_minutes=cfg.max_train_minutes,
        progress_total=samples_per_epoch // ctx.world_size if cfg.progress else None,
        name=cfg.arch,
    )


def _trainable_and_feeder(
    model,
    meta_base,
    cfg,
    train_images,
    y_train,
    val_images,
    device,
    amp_dtype,
    ckpt_dir,
    ctx,
):
    """The module to train, this rank's batch feeder, and (frozen backbone) the
    validation features."""
    if cfg.train_mode == "frozen_features":
        for p in model.parameters():
            p.requires_grad_(False)
        trainable = _head_module(model)
        for p in trainable.parameters():
            p.requires_grad_(True)
        train_feats, val_feats = _frozen_features(
            model,
            cfg,
            train_images,
            val_images,
            meta_base,
            device,
            amp_dtype,
            ckpt_dir,
            ctx,
        )
        return (
            trainable,
            FeatureFeeder(train_feats, y_train, cfg.batch_size, device, ctx),
            val_feats,
        )
    data_path = cfg.data_path
    if data_path == "auto":
        data_path = "device" if device.type == "cuda" else "dataloader"
    mean, std, aug = meta_base["mean"], meta_base["std"], cfg.augment_config
    if data_path == "device":
        feeder = DeviceFeeder(train_images, y_train, aug, mean, std, cfg, device, ctx)
    else:
        feeder = LoaderFeeder(
            train_images, y_train, aug, cfg.input_size, mean, std, cfg, device, ctx
        )
    return model, feeder, None


def _build_stepper(
    trainable, optimizer, scheduler, counts, cfg, device, amp_dtype
) -> Stepper:
    """Loss, gradient scaler and EMA around the optimiser (forward set after DDP)."""
    return Stepper(
        forward=trainable,
        trainable=trainable,
        optimizer=optimizer,
        scheduler=scheduler,
        per_epoch_scheduler=steps_per_epoch_scheduler(cfg.scheduler),
        criterion=build_loss(
            cfg.loss,
            counts,
            cfg.class_weight_power,
            cfg.label_smoothing,
            cfg.focal_gamma,
        ).to(device),
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        ema=ModelEmaV3(trainable, decay=cfg.ema_decay, use_warmup=True)
        if cfg.ema
        else None,
        device=device,
        amp_dtype=amp_dtype,
        grad_accum_steps=cfg.grad_accum_steps,
        grad_clip=cfg.grad_clip,
    )


class _BestKeeper:
    """Holds the best epoch's contract checkpoint; rank 0 writes it to ``best.pt``."""

    def __init__(
        self, model, trainable, stepper, frozen, meta_base, ckpt_dir, ctx, state
    ):
        self.model, self.trainable, self.stepper = model, trainable, stepper
        self.frozen, self.meta_base, self.ctx, self.state = (
            frozen,
            meta_base,
            ctx,
            state,
        )
        self.path = ckpt_dir / "best.pt" if ckpt_dir else None
        self.best = None
        if state.best_epoch and self.path is not None and self.path.is_file():
            self.best = torch.load(self.path, map_location="cpu", weights_only=True)

    def _eval_module(self):
        ema = self.stepper.ema
        return ema.module if ema is not None else self.trainable

    def keep(self, row: dict[str, float]) -> None:
        self.best = _best_checkpoint(
            self.model,
            self.trainable,
            self._eval_module(),
            self.frozen,
            self.meta_base,
            row,
        )
        if self.path is not None and self.ctx.is_main:
            atomic_torch_save(self.best, self.path)

    def checkpoint(self) -> dict[str, Any]:
        if self.best is None:  # resumed a finished run without best.pt
            self.best = _best_checkpoint(
                self.model,
                self.trainable,
                self._eval_module(),
                self.frozen,
                self.meta_base,
                self.state.history[-1] if self.state.history else {},
            )
        return self.best


def _validation_proba(
    module, frozen, val_feats, val_images, meta_base, device, amp_dtype, cfg, ctx
) -> np.ndarray:
    """Validation probabilities: this rank's contiguous share, gathered in order."""
    batch_size, n_classes = cfg.eval_batch_size, len(meta_base["classes"])
    mean, std = meta_base["mean"], meta_base["std"]
    start, stop = shard_bounds(len(val_images), ctx)
    if stop == start:
        part = np.zeros((0, n_classes), dtype=np.float32)
    elif frozen:
        module.eval()
        with torch.inference_mode():
            out = [
                torch.softmax(module(val_feats[s : s + batch_size]).float(), 1)
                for s in range(start, stop, batch_size)
            ]
        part = torch.cat(out).cpu().numpy()
    else:
        with torch.autocast(
            device.type, dtype=amp_dtype, enabled=amp_dtype is not None
        ):
            part = predict_proba(
                module, val_images[start:stop], mean, std, device, batch_size
            )
    return gather_rows(part, ctx)


def _finalise(cfg, classes, best_state, state, stopped_early) -> TrainResult:
    """A fresh CPU model with the best weights, the history frame and the best figures."""
    final = create_model(
        cfg.arch,
        num_classes=len(classes),
        pretrained=False,
        allow_random_init=True,
        input_size=cfg.input_size,
        check_size=False,
        **cfg.model_kwargs,
    )
    final.load_state_dict(best_state["state_dict"])
    final.eval()
    hist = pd.DataFrame(state.history, columns=list(HISTORY_COLUMNS))
    best_epoch = state.best_epoch
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
    model, cfg, train_images, val_images, meta_base, device, amp_dtype, ckpt_dir, ctx
):
    """``(views, N_train, D)`` train features (view 0 plain, the rest augmented) and
    ``(N_val, D)`` val features, cached in ``ckpt_dir/features.pt`` when given."""
    key = fingerprint(
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
        mean=meta_base["mean"],
        std=meta_base["std"],
        device=device,
        batch_size=cfg.eval_batch_size,
        autocast_dtype=amp_dtype,
        channels_last=cfg.channels_last,
        progress=cfg.progress and ctx.is_main,
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
    if path is not None and ctx.is_main:
        atomic_torch_save(
            {"key": key, "train": train_feats.cpu(), "val": val_feats.cpu()}, path
        )
    return train_feats, val_feats


__all__ = [
    "HISTORY_COLUMNS",
    "TrainResult",
    "extract_features",
    "resolve_amp",
    "seed_everything",
    "train_model",
]
