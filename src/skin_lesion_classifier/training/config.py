"""The training configuration: one dataclass filled from ``parameters_training.yml``.

:class:`TrainConfig` has no defaults of its own: every field has its one default in
``conf/base/parameters_training.yml`` (``training.train``), which Kedro hands over
resolved and code without Kedro reads with :func:`base_train_params`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from skin_lesion_classifier.config_defaults import (
    check_keys,
    resolved_parameters,
    soft_merge,
)
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

    ``frozen_stages`` (``finetune`` only): the stem and this many leading stages of the
    backbone keep their ImageNet weights and BatchNorm statistics
    (:mod:`skin_lesion_classifier.models.stages`); 0 trains the whole network.
    """

    arch: str
    pretrained: bool
    allow_random_init: bool
    model_kwargs: dict[str, Any]
    input_size: tuple[int, int]
    train_mode: str
    frozen_stages: int
    feature_views: int
    epochs: int
    batch_size: int
    eval_batch_size: int
    optimizer: str
    lr: float
    backbone_lr_mult: float
    weight_decay: float
    grad_accum_steps: int
    grad_clip: float
    scheduler: str
    warmup_epochs: float
    min_lr_ratio: float
    restart_epochs: int
    restart_mult: int
    plateau_factor: float
    plateau_patience: int
    loss: str
    label_smoothing: float
    class_weight_power: float
    focal_gamma: float
    sampler_power: float
    samples_per_epoch: int | None
    augment: dict[str, Any]
    amp: str
    channels_last: bool
    compile: bool
    ema: bool
    ema_decay: float
    monitor: str
    patience: int
    min_delta: float
    max_train_minutes: float | None
    seed: int
    deterministic: bool
    device: str
    data_path: str
    num_workers: int
    progress: bool
    resume: bool
    sync_bn: bool
    distributed: dict[str, Any] | None

    @classmethod
    def from_dict(cls, params: Mapping[str, Any] | None) -> TrainConfig:
        """Build and validate; unknown or missing keys and bad values raise ``ValueError``
        naming them. The defaults are ``training.train`` in ``conf/base`` (see
        :func:`base_train_params`)."""
        params = dict(params or {})
        check_keys(cls, params, "training")
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
        if int(self.frozen_stages) < 0:
            raise ValueError(f"frozen_stages must be >= 0, got {self.frozen_stages}")
        if int(self.frozen_stages) > 0 and (
            self.train_mode != "finetune" or not self.pretrained
        ):
            raise ValueError(
                "frozen_stages keeps pretrained stages frozen while the rest fine-tunes: "
                "it needs train_mode: finetune and pretrained: true"
            )
        if self.train_mode == "frozen_features" and not self.pretrained:
            raise ValueError(
                "train_mode frozen_features needs pretrained: true (a frozen random "
                "backbone gives meaningless features)"
            )
        AugmentConfig.from_dict(self.augment)
        self._validate_distributed()

    def _validate_distributed(self) -> None:
        if self.distributed is None:
            return
        if not isinstance(self.distributed, Mapping) or set(self.distributed) != {
            "nproc_per_node"
        }:
            raise ValueError(
                "distributed must be null or {nproc_per_node: N | auto}, got "
                f"{self.distributed!r}"
            )
        n = self.distributed["nproc_per_node"]
        if n != "auto" and not (isinstance(n, int) and n >= 1):
            raise ValueError(
                "distributed.nproc_per_node must be a positive integer or 'auto', "
                f"got {n!r}"
            )

    @property
    def augment_config(self) -> AugmentConfig:
        return AugmentConfig.from_dict(self.augment)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d


def base_train_params(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``training.train`` of ``conf/base`` with ``overrides`` soft-merged on top (nested
    mappings such as ``augment`` merge key by key)."""
    return soft_merge(resolved_parameters("training")["train"], dict(overrides or {}))
