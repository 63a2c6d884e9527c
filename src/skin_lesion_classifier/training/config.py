"""The training configuration: one dataclass filled from ``parameters_training.yml``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from skin_lesion_classifier.data.augment import AugmentConfig
from skin_lesion_classifier.training.losses import LOSSES
from skin_lesion_classifier.training.schedulers import SCHEDULERS

TRAIN_MODES = ("finetune", "frozen_features")
DATA_PATHS = ("auto", "device", "dataloader")
AMP_MODES = ("auto", "bf16", "fp16", "off")
MONITORS = {"val_balanced_accuracy": "max", "val_macro_auc": "max", "val_loss": "min"}


@dataclass
class TrainConfig:
    """Every knob of :func:`skin_lesion_classifier.training.engine.train_model`.

    ``train_mode``:
      * ``finetune``: the whole network is trained on augmented images.
      * ``frozen_features``: the backbone stays frozen; pooled features of
        ``feature_views`` views of every training image (the first plain, the others
        augmented) and of the validation images are computed once, then only the head is
        trained on them for many cheap epochs. Use ``model_kwargs: {head: multiscale}`` to
        concatenate features of several stages. The result is still one ordinary model.
    """

    arch: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    allow_random_init: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int] = (192, 256)
    train_mode: str = "finetune"
    feature_views: int = 4
    epochs: int = 30
    batch_size: int = 128
    eval_batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 1e-3
    backbone_lr_mult: float = 1.0
    weight_decay: float = 1e-2
    grad_accum_steps: int = 1
    grad_clip: float = 1.0
    scheduler: str = "cosine_warmup"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    restart_epochs: int = 5
    restart_mult: int = 1
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    loss: str = "ce"
    label_smoothing: float = 0.1
    class_weight_power: float = 0.0
    focal_gamma: float = 2.0
    sampler_power: float = 0.5
    samples_per_epoch: int | None = None
    augment: dict[str, Any] = field(default_factory=dict)
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    ema: bool = True
    ema_decay: float = 0.999
    monitor: str = "val_balanced_accuracy"
    patience: int = 8
    min_delta: float = 0.0
    max_train_minutes: float | None = None
    seed: int = 42
    deterministic: bool = False
    device: str = "auto"
    data_path: str = "auto"
    num_workers: int = 0
    progress: bool = True
    resume: bool = True

    @classmethod
    def from_dict(cls, params: Mapping[str, Any] | None) -> TrainConfig:
        """Build and validate; unknown keys and bad values raise ``ValueError`` naming them."""
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"unknown training option(s) {unknown}; known: {sorted(known)}"
            )
        cfg = cls(**params)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def choice(name: str, allowed) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )

        if isinstance(self.amp, bool):  # YAML reads a bare `off` as false
            self.amp = "auto" if self.amp else "off"
        choice("train_mode", TRAIN_MODES)
        choice("data_path", DATA_PATHS)
        choice("amp", AMP_MODES)
        choice("scheduler", SCHEDULERS)
        choice("loss", LOSSES)
        choice("monitor", MONITORS)
        choice("optimizer", ("adamw", "sgd"))
        try:
            h, w = (int(v) for v in self.input_size)
        except (TypeError, ValueError):
            raise ValueError(
                f"input_size must be [H, W], got {self.input_size!r}"
            ) from None
        self.input_size = (h, w)
        for name in (
            "epochs",
            "batch_size",
            "eval_batch_size",
            "grad_accum_steps",
            "feature_views",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.pretrained and not self.allow_random_init:
            raise ValueError(
                f"pretrained: false would train {self.arch} from random weights; set "
                "allow_random_init: true if that is really wanted"
            )
        if self.train_mode == "frozen_features" and not self.pretrained:
            raise ValueError(
                "train_mode frozen_features needs pretrained: true (a frozen random "
                "backbone gives meaningless features)"
            )
        AugmentConfig.from_dict(self.augment)

    @property
    def augment_config(self) -> AugmentConfig:
        return AugmentConfig.from_dict(self.augment)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d
