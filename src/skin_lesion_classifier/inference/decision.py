"""Applying the validated decision rule at inference time.

Evaluation fits a :class:`evaluation.decision.DecisionRule` on the validation split
(``decide(p) = argmax_c p_c w_c`` plus the melanoma flag ``p_mel >= t``) and the checkpoint
meta carries it as ``meta["decision"]`` (its ``to_dict()`` form). Inference only applies it:

* ``predicted_class``: the rule's decision when ``meta["decision"]`` has ``class_weights``,
  else the arg-max class.
* ``melanoma_flag``: ``p_mel >= meta["decision"]["melanoma_threshold"]`` when a validated
  threshold exists, else ``predicted_class == "mel"`` with :data:`NO_THRESHOLD_NOTE` attached
  to every answer.

Probabilities are always reported as the model's softmax output, unadjusted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from skin_lesion_classifier.constants import CLASSES, MELANOMA_INDEX
from skin_lesion_classifier.evaluation.decision import DecisionRule

#: The note attached to every answer when no validated threshold exists.
NO_THRESHOLD_NOTE = (
    "no validated melanoma threshold in the model meta; melanoma_flag is "
    "predicted_class == 'mel'"
)


@dataclass(frozen=True)
class Decision:
    """How a probability vector becomes ``predicted_class`` and ``melanoma_flag``."""

    rule: DecisionRule | None
    melanoma_threshold: float | None
    note: str | None = None
    source: str = "checkpoint meta"

    @property
    def rule_name(self) -> str:
        return self.rule.name if self.rule is not None else "argmax"

    def predict(self, probabilities: np.ndarray) -> np.ndarray:
        """Class indices ``(n,)`` in :data:`CLASSES` order."""
        p = _check(probabilities)
        if self.rule is None:
            return p.argmax(axis=1)
        return self.rule.predict(p)

    def flag_melanoma(self, probabilities: np.ndarray) -> np.ndarray:
        """Boolean ``(n,)``: ``p_mel >= threshold``, or ``predicted == mel`` without one."""
        p = _check(probabilities)
        if self.melanoma_threshold is None:
            return self.predict(p) == MELANOMA_INDEX
        return p[:, MELANOMA_INDEX] >= self.melanoma_threshold

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule_name,
            "melanoma_threshold": self.melanoma_threshold,
            "note": self.note,
            "source": self.source,
        }


def _check(probabilities: np.ndarray) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(CLASSES):
        raise ValueError(
            f"expected probabilities of shape (n, {len(CLASSES)}), got {p.shape}"
        )
    return p


def decision_from_meta(
    meta: Mapping[str, Any], source: str = "checkpoint meta"
) -> Decision:
    """The :class:`Decision` stored in a checkpoint ``meta`` (see the module doc).

    ``source`` names where the rule came from (reported by the service and the CLI); it
    becomes ``"none"`` when the meta holds no decision at all.

    A malformed ``meta["decision"]`` or a threshold outside ``[0, 1]`` raises ``ValueError``
    rather than silently falling back to arg-max.
    """
    data = meta.get("decision") or {}
    if not data:
        source = "none"
    if not isinstance(data, Mapping):
        raise ValueError(
            f"meta['decision'] must be a mapping, got {type(data).__name__}"
        )
    rule = DecisionRule.from_dict(data) if "class_weights" in data else None
    if rule is not None and tuple(rule.classes) != CLASSES:
        raise ValueError(
            f"meta['decision'] classes {rule.classes} are not in CLASSES order {CLASSES}"
        )
    threshold = data.get("melanoma_threshold")
    if threshold is None:
        return Decision(
            rule=rule, melanoma_threshold=None, note=NO_THRESHOLD_NOTE, source=source
        )
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"meta['decision']['melanoma_threshold'] must be in [0, 1], got {threshold}"
        )
    return Decision(rule=rule, melanoma_threshold=threshold, source=source)
