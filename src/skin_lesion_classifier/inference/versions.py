"""Kedro-versioned outputs on disk: find the latest (or a named) version, and pair a model
with the decision rule evaluated for it.

With ``versioned: true`` a catalog entry ``data/06_models/model.pt`` is a folder holding one
sub-folder per run, named by the run's save version (a UTC timestamp such as
``2026-12-02T12.00.00.000Z``), each with the file itself: ``model.pt/<version>/model.pt``.
No run overwrites another's. The predict and serve commands, ``show_results`` and the
pipelines take the latest version unless one is named (a full path to a version's file,
or ``kedro run --load-versions model_checkpoint:<version>``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

#: Kedro's save-version format (``kedro.io.core.generate_timestamp``).
VERSION_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z$")


def saved_versions(path: str | os.PathLike) -> list[str]:
    """The versions of the versioned dataset at ``path`` that hold their file, oldest
    first (empty when ``path`` is not a versioned dataset folder)."""
    root = Path(path)
    if not root.is_dir():
        return []
    return sorted(
        d.name
        for d in root.iterdir()
        if VERSION_PATTERN.match(d.name) and (d / root.name).is_file()
    )


def resolve_version(path: str | os.PathLike, version: str | None = None) -> Path:
    """The file of ``path``'s latest version (or of ``version``) when ``path`` is a
    versioned dataset folder; ``path`` unchanged otherwise (a plain file, a version's file).

    Raises ``FileNotFoundError`` naming the versions there when ``version`` is not one.
    """
    root = Path(path)
    versions = saved_versions(root)
    if not versions:
        if version is not None:
            raise FileNotFoundError(f"{root} holds no saved versions")
        return root
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise FileNotFoundError(
            f"{root} has no version {version!r}; saved versions: {versions}"
        )
    return root / version / root.name


def version_of(file: str | os.PathLike) -> str | None:
    """The save version of a file inside a versioned folder (``.../<version>/<file>``)."""
    parent = Path(file).parent
    return parent.name if VERSION_PATTERN.match(parent.name) else None


#: Key of the decision rule that names the weights it was chosen for.
WEIGHTS_KEY = "model_weights_sha256"


def weights_digest(state_dict: Mapping[str, object]) -> str:
    """sha256 of a state dict's names and tensor bytes (in name order): which model a
    decision rule was chosen for, whatever file the weights were saved to."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            raw = value.detach().cpu().contiguous().flatten().view(torch.uint8)
            h.update(raw.numpy().tobytes())
    return h.hexdigest()


def _rule_digest(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get(WEIGHTS_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def paired_version(
    model_file: str | os.PathLike, name: str, weights_sha256: str | None = None
) -> Path | None:
    """The versioned file ``name`` (e.g. ``decision_rule.json``) beside the model's
    versioned folder that belongs to the model at ``model_file``.

    Among the versions saved since the model's own: the latest that names these weights
    (``model_weights_sha256``, written by the evaluation pipeline; ``weights_sha256`` is
    the model's :func:`weights_digest`), else the latest that names no weights and was
    saved before the next model version. A rule chosen for other weights (a re-evaluation
    of an earlier model) is never taken. ``None`` when there is none.
    """
    version = version_of(model_file)
    if version is None:
        return None
    model_root = Path(model_file).parent.parent
    sibling = model_root.parent / name
    later = [v for v in saved_versions(sibling) if v >= version]
    digests = {v: _rule_digest(sibling / v / name) for v in later}
    same = [v for v in later if weights_sha256 and digests[v] == weights_sha256]
    if same:
        return sibling / same[-1] / name
    next_models = [v for v in saved_versions(model_root) if v > version]
    upper = next_models[0] if next_models else None
    fitting = [v for v in later if digests[v] is None and (upper is None or v < upper)]
    return sibling / fitting[-1] / name if fitting else None
