"""Ensembles as one model: a weighted average of member models' class probabilities.

:class:`EnsembleModel` takes the images normalised with the ensemble's ``mean``/``std`` at
its ``input_size``, re-normalises (and, if a member was trained at another size, resizes
with antialiased bicubic) for each member, and returns ``log(sum_m w_m softmax(z_m))``,
whose softmax is the weighted average. Members that fuse metadata get the metadata
vector. An ensemble checkpoint has ``meta["arch"] ==`` :data:`ENSEMBLE_ARCH`;
``models.checkpoint.build_from_meta`` builds it with :func:`build_ensemble` (explicit
dispatch, no registry import), and ``models.ensemble_checkpoint`` assembles one from its
members' checkpoints. Choosing the weights is evaluation (``evaluation.ensemble``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: ``meta["arch"]`` of an ensemble checkpoint (``models.checkpoint.build_from_meta``
#: builds it with :func:`build_ensemble`).
ENSEMBLE_ARCH = "slc_ensemble"
#: Meta keys of a member kept in the ensemble (what rebuilding and feeding it needs).
MEMBER_META_KEYS = (
    "arch",
    "model_kwargs",
    "classes",
    "input_size",
    "mean",
    "std",
    "uses_metadata",
)


def check_weights(weights, n_members: int) -> np.ndarray:
    """``weights`` as a float array on the simplex; raises naming a bad value."""
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != (n_members,):
        raise ValueError(f"need {n_members} ensemble weights, got {w.tolist()}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(
            f"ensemble weights must be >= 0 with a positive sum, got {w.tolist()}"
        )
    return w / w.sum()


def is_ensemble(meta: Mapping[str, Any]) -> bool:
    """Whether a checkpoint meta describes an ensemble."""
    return meta.get("arch") == ENSEMBLE_ARCH


class EnsembleModel(nn.Module):
    """Weighted probability average of member models, as one ``nn.Module``.

    Input: images normalised with ``mean``/``std`` at ``input_size`` (what
    ``predict_proba`` makes from the ensemble meta), plus the metadata vector when a member
    fuses metadata. Output: ``log(sum_m w_m softmax(z_m))`` (``softmax`` of it is the
    average).
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        member_metas: Sequence[Mapping[str, Any]],
        weights,
        input_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        if len(members) != len(member_metas) or not members:
            raise ValueError(
                "an ensemble needs one meta per member and at least one member"
            )
        self.members = nn.ModuleList(members)
        w = check_weights(weights, len(members))
        self.register_buffer(
            "weights", torch.as_tensor(w, dtype=torch.float32), persistent=False
        )
        self.input_size = tuple(int(v) for v in input_size)
        self.register_buffer(
            "mean",
            torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
            persistent=False,
        )
        self.register_buffer(
            "std",
            torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
            persistent=False,
        )
        self.uses_metadata = [bool(m.get("uses_metadata", False)) for m in member_metas]
        self.member_sizes = [
            tuple(int(v) for v in m["input_size"]) for m in member_metas
        ]
        self.register_buffer(
            "member_mean",
            torch.tensor([list(m["mean"]) for m in member_metas], dtype=torch.float32),
            persistent=False,
        )
        self.register_buffer(
            "member_std",
            torch.tensor([list(m["std"]) for m in member_metas], dtype=torch.float32),
            persistent=False,
        )

    def _member_input(self, x01: torch.Tensor, i: int) -> torch.Tensor:
        size = self.member_sizes[i]
        if tuple(x01.shape[-2:]) != size:
            # same geometry as data.images.resize_rgb: centre-crop to the aspect, then resize
            src_h, src_w = x01.shape[-2:]
            target, src = size[1] / size[0], src_w / src_h
            if abs(src - target) > 1e-3:
                if src > target:
                    new_w = round(src_h * target)
                    left = (src_w - new_w) // 2
                    x01 = x01[..., :, left : left + new_w]
                else:
                    new_h = round(src_w / target)
                    top = (src_h - new_h) // 2
                    x01 = x01[..., top : top + new_h, :]
            x01 = F.interpolate(
                x01, size=size, mode="bicubic", antialias=True, align_corners=False
            )
        m = self.member_mean[i].view(1, 3, 1, 1)
        s = self.member_std[i].view(1, 3, 1, 1)
        return (x01 - m) / s

    def forward(
        self, images: torch.Tensor, metadata: torch.Tensor | None = None
    ) -> torch.Tensor:
        if any(self.uses_metadata) and metadata is None:
            raise ValueError(
                "this ensemble has members that fuse patient metadata: call it as "
                "model(images, metadata)"
            )
        x01 = images * self.std.to(images.dtype) + self.mean.to(images.dtype)
        acc = None
        for i, member in enumerate(self.members):
            xi = self._member_input(x01, i)
            z = member(xi, metadata) if self.uses_metadata[i] else member(xi)
            p = torch.softmax(z.float(), dim=1) * self.weights[i]
            acc = p if acc is None else acc + p
        return torch.log(acc.clamp_min(1e-12))


def build_ensemble(
    num_classes: int,
    build_member: Callable[[Mapping[str, Any]], nn.Module],
    members: Sequence[Mapping[str, Any]] = (),
    ensemble_input_size: Sequence[int] = (224, 224),
    ensemble_mean: Sequence[float] = (0.485, 0.456, 0.406),
    ensemble_std: Sequence[float] = (0.229, 0.224, 0.225),
    **_: Any,
) -> EnsembleModel:
    """An untrained :class:`EnsembleModel` from an ensemble meta's ``model_kwargs``:
    ``members`` are the member metas, each with its ``weight``; ``build_member`` builds
    one member from its meta (``models.checkpoint.build_from_meta``, which calls this for
    ``arch == ENSEMBLE_ARCH``)."""
    if not members:
        raise ValueError(
            f"{ENSEMBLE_ARCH} needs a non-empty 'members' list in model_kwargs"
        )
    metas = [dict(m) for m in members]
    for m in metas:
        if len(m.get("classes", [])) != num_classes:
            raise ValueError(
                f"ensemble member {m.get('name')} has {len(m.get('classes', []))} classes, "
                f"the ensemble {num_classes}"
            )
    modules = [build_member(m) for m in metas]
    return EnsembleModel(
        modules,
        metas,
        [float(m["weight"]) for m in metas],
        ensemble_input_size,
        ensemble_mean,
        ensemble_std,
    )
