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

import os
import re
from pathlib import Path

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


def paired_version(model_file: str | os.PathLike, name: str) -> Path | None:
    """The versioned file ``name`` (e.g. ``decision_rule.json``) beside the model's
    versioned folder that belongs to the model at ``model_file``: the one saved by the same
    run, else the latest saved after the model and before the next model version (an
    evaluation-only run of that model). ``None`` when there is none.
    """
    version = version_of(model_file)
    if version is None:
        return None
    model_root = Path(model_file).parent.parent
    sibling = model_root.parent / name
    candidates = saved_versions(sibling)
    if not candidates:
        return None
    later_models = [v for v in saved_versions(model_root) if v > version]
    upper = later_models[0] if later_models else None
    fitting = [v for v in candidates if v >= version and (upper is None or v < upper)]
    return sibling / fitting[-1] / name if fitting else None
