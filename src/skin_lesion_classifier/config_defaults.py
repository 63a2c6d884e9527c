"""The parameter defaults of ``conf/base``, read without Kedro.

Every parameter has exactly one default, in ``conf/base/parameters_<pipeline>.yml``; the
typed configs (:class:`~skin_lesion_classifier.training.config.TrainConfig`, ...) carry
none. Code that runs without Kedro (the ``bench`` command on a bare GPU machine, tests)
starts from these files through :func:`resolved_parameters` and overrides what it names with
:func:`soft_merge`, the merge Kedro applies between environments (``settings.py``).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

#: ``SLC_CONF_DIR`` points at another ``conf`` folder (holding ``base/``).
CONF_ENV_VAR = "SLC_CONF_DIR"

_GLOBALS = re.compile(r"\$\{globals:([A-Za-z0-9_.]+)\}")


def conf_dir() -> Path:
    """The project's ``conf`` folder: ``$SLC_CONF_DIR``, else the one of this checkout
    (``src/skin_lesion_classifier/../../conf``), else ``./conf``."""
    candidates = [Path(__file__).resolve().parents[2] / "conf", Path.cwd() / "conf"]
    if os.environ.get(CONF_ENV_VAR):
        candidates.insert(0, Path(os.environ[CONF_ENV_VAR]))
    for path in candidates:
        if (path / "base").is_dir():
            return path
    raise FileNotFoundError(
        f"no conf/base folder at {[str(p) for p in candidates]}; set {CONF_ENV_VAR}"
    )


def soft_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` on top: nested mappings merge key by key, anything else
    (a list, a scalar, ``None``) replaces the base value. Neither input is changed."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = soft_merge(out[key], value)
        else:
            out[key] = value
    return out


@functools.lru_cache(maxsize=16)
def _merged_env(folder: Path, globals_json: str):
    """One environment folder's ``parameters*.yml`` merged (parsed once per process for a folder and
    globals), with ``${globals:...}`` pointing at ``globals_json``."""
    from omegaconf import OmegaConf

    files = sorted(folder.glob("parameters*.yml"))
    if not files:
        return None
    merged = OmegaConf.merge(
        *(
            OmegaConf.create(_GLOBALS.sub(r"${_globals.\1}", f.read_text()))
            for f in files
        )
    )
    merged["_globals"] = json.loads(globals_json)
    return merged


def _read_env(folder: Path, section: str, globals_: dict) -> dict[str, Any] | None:
    """``section`` of one environment folder: its ``parameters*.yml`` merged, then
    resolved (interpolations between its files, ``${globals:...}`` from ``globals_``)."""
    from omegaconf import OmegaConf

    merged = _merged_env(folder, json.dumps(globals_, sort_keys=True))
    if merged is None or section not in merged:
        return None
    return OmegaConf.to_container(merged[section], resolve=True)


def _read_globals(folder: Path) -> dict[str, Any]:
    import yaml

    path = folder / "globals.yml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def resolved_parameters(
    section: str, env: str = "base", conf: str | Path | None = None
) -> dict[str, Any]:
    """The resolved top-level parameter ``section`` (``"training"``, ``"ensemble"``, ...)
    as Kedro's ``OmegaConfigLoader`` with the project's settings resolves it for ``env``:
    each environment's ``parameters*.yml`` merged and resolved (``${globals:...}`` from the
    soft-merged ``globals.yml`` files), then ``env`` soft-merged onto ``base``."""
    root = Path(conf) if conf is not None else conf_dir()
    folders = [root / "base"] + ([root / env] if env != "base" else [])
    globals_: dict[str, Any] = {}
    for folder in folders:
        globals_ = soft_merge(globals_, _read_globals(folder))
    out = _read_env(folders[0], section, globals_)
    if out is None:
        raise KeyError(f"no parameters {section!r} in {folders[0]}")
    for folder in folders[1:]:
        out = soft_merge(out, _read_env(folder, section, globals_) or {})
    return out


def check_keys(cls: type, params: Mapping[str, Any], what: str) -> None:
    """Every field of the dataclass ``cls`` and nothing else: unknown or missing keys raise
    ``ValueError`` naming them (the defaults live in ``conf/base``, not in ``cls``)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; known: {sorted(known)}")
    missing = sorted(known - set(params))
    if missing:
        raise ValueError(
            f"missing {what} option(s) {missing}: every option has its default in "
            "conf/base (start from config_defaults.resolved_parameters)"
        )
