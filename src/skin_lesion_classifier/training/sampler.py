"""Class-balanced sampling: per-sample weights ``(1 / n_class) ** power``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def sample_weights(
    labels: Sequence[int], power: float = 0.5, n_classes: int | None = None
) -> np.ndarray:
    """Weight of each sample: ``w_i = n_{y_i} ** -power`` (normalised to sum 1).

    ``power=0`` samples uniformly, ``power=1`` draws every class equally often on average,
    values between (e.g. 0.5, square-root balancing) trade the two off.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        raise ValueError("cannot sample from an empty training set")
    counts = np.bincount(labels, minlength=n_classes or 0).astype(np.float64)
    w = counts[labels] ** -float(power)
    return w / w.sum()


def epoch_indices(
    labels: Sequence[int],
    power: float,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices of one epoch: a plain permutation when ``power == 0``, else ``num_samples``
    draws with replacement from :func:`sample_weights` (``torch.multinomial``)."""
    n = len(labels)
    num_samples = int(num_samples or n)
    if not power:
        perm = torch.randperm(n, generator=generator)
        return (
            perm[:num_samples]
            if num_samples <= n
            else torch.cat(
                [perm, torch.randint(0, n, (num_samples - n,), generator=generator)]
            )
        )
    w = torch.as_tensor(sample_weights(labels, power), dtype=torch.float64)
    return torch.multinomial(w, num_samples, replacement=True, generator=generator)
