"""Pick the compute device once; everything else receives it as an argument."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_VALID = ("auto", "cuda", "mps", "cpu")


def detect_device(preference: str = "auto") -> torch.device:
    """Return the device to use: ``cuda`` if available, else ``mps``, else ``cpu``.

    ``preference`` may force one of ``cuda``, ``mps``, ``cpu`` (``cuda:1`` works too); asking
    for an accelerator that is not present raises a clear ``RuntimeError`` instead of
    silently falling back.
    """
    pref = (preference or "auto").lower()
    if pref.split(":")[0] not in _VALID:
        raise ValueError(
            f"unknown device {preference!r}; use one of {', '.join(_VALID)}"
        )
    if pref == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        device = torch.device(pref)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "device 'cuda' was asked for but CUDA is not available here"
            )
        if device.type == "mps" and not (
            getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        ):
            raise RuntimeError(
                "device 'mps' was asked for but Apple MPS is not available here"
            )
    logger.info("Using device %s", device)
    return device
