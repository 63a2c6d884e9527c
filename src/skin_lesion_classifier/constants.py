"""One source of truth for class codes and their orders.

Inside the project every probability vector, label index and confusion matrix uses
:data:`CLASSES` (alphabetical HAM10000 codes). The ISIC challenge submission format uses its
own column order, :data:`ISIC_COLUMNS`; convert with :func:`to_isic_order`.
"""

from __future__ import annotations

import numpy as np

#: HAM10000 diagnosis codes, in the order used for label indices everywhere in the project.
CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

#: Human-readable names of :data:`CLASSES`.
CLASS_NAMES: dict[str, str] = {
    "akiec": "Actinic keratoses / Bowen's disease",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesions",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevi",
    "vasc": "Vascular lesions",
}

#: Column order of the ISIC 2018 task 3 submission / ground-truth CSV (after ``image``).
ISIC_COLUMNS: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")

#: The class whose detection the clinical metrics are about.
MELANOMA: str = "mel"
MELANOMA_INDEX: int = CLASSES.index(MELANOMA)

CLASS_TO_INDEX: dict[str, int] = {c: i for i, c in enumerate(CLASSES)}

#: Index permutation: ``probs[:, ISIC_PERMUTATION]`` puts project-order columns in ISIC order.
ISIC_PERMUTATION: tuple[int, ...] = tuple(
    CLASSES.index(c.lower()) for c in ISIC_COLUMNS
)


def to_isic_order(probabilities: np.ndarray) -> np.ndarray:
    """Reorder ``(n, 7)`` probabilities from :data:`CLASSES` order to :data:`ISIC_COLUMNS`."""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(CLASSES):
        raise ValueError(
            f"expected probabilities of shape (n, {len(CLASSES)}), got {probabilities.shape}"
        )
    return probabilities[:, list(ISIC_PERMUTATION)]


def from_isic_order(probabilities: np.ndarray) -> np.ndarray:
    """Reorder ``(n, 7)`` probabilities from :data:`ISIC_COLUMNS` order to :data:`CLASSES`."""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(CLASSES):
        raise ValueError(
            f"expected probabilities of shape (n, {len(CLASSES)}), got {probabilities.shape}"
        )
    inverse = [ISIC_COLUMNS.index(c.upper()) for c in CLASSES]
    return probabilities[:, inverse]
