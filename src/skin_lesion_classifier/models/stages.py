"""The stem and leading stages of a timm backbone, to keep frozen while the rest trains.

A partial fine-tune (``training.train.frozen_stages``) keeps the low-level filters of the
ImageNet backbone (edges, colour blobs: the stem and the first stages, which run at the
highest resolution and cost most of the compute) and trains the later stages and the
head. Frozen modules get no gradient, so autograd records nothing for them and the
backward pass stops where they end; their BatchNorm layers keep the ImageNet statistics.
The stages are timm's own coarse parameter groups (``model.group_matcher(coarse=True)``:
group 0 is the stem, then one group per stage), so any timm backbone that declares them
works.
"""

from __future__ import annotations

from torch import nn


def _timm_backbone(model: nn.Module) -> nn.Module:
    """The timm model inside ``model`` (the project's multi-scale and fusion wrappers hold
    it as ``backbone``)."""
    inner = getattr(model, "backbone", None)
    return inner if isinstance(inner, nn.Module) else model


def leading_stage_modules(model: nn.Module, n_stages: int) -> list[nn.Module]:
    """The modules of the stem and the first ``n_stages`` stages of ``model``'s backbone.

    ``n_stages = 0`` gives no module (everything trains). Raises ``ValueError`` when the
    backbone declares no stages or has fewer than ``n_stages`` of them (the classifier
    group, last, is never counted)."""
    if n_stages < 0:
        raise ValueError(f"frozen_stages must be >= 0, got {n_stages}")
    if n_stages == 0:
        return []
    from timm.models import group_modules

    backbone = _timm_backbone(model)
    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        raise ValueError(
            f"{type(backbone).__name__} declares no stages (no timm group_matcher); "
            "use frozen_stages: 0"
        )
    groups = group_modules(backbone, matcher(coarse=True))
    ordered = [groups[k] for k in sorted(groups)]
    n_body = len(ordered) - 2  # minus the stem and the classifier group
    if n_stages > n_body:
        raise ValueError(
            f"frozen_stages: {n_stages} but {type(backbone).__name__} has {n_body} stages"
        )
    names = [name for group in ordered[: 1 + n_stages] for name in group]
    return [backbone.get_submodule(name) for name in names]


def freeze_leading_stages(model: nn.Module, n_stages: int) -> list[nn.Module]:
    """Stop gradients through the stem and the first ``n_stages`` stages; returns their
    modules, which the caller keeps in eval mode (BatchNorm statistics frozen)."""
    modules = leading_stage_modules(model, n_stages)
    for module in modules:
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
    return modules
