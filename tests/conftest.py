"""Shared fixtures: real HAM10000 data from ``../shared/data`` beside the checkout.

``SLC_SHARED_DATA`` overrides the location. Tests never download anything.
"""

from __future__ import annotations

import copy
import functools
import gc
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skin_lesion_classifier.constants import CLASS_TO_INDEX, CLASSES

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(
    os.environ.get("SLC_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data")
).resolve()


@functools.cache
def _project_params(env: str) -> dict:
    from kedro.config import OmegaConfigLoader

    from skin_lesion_classifier.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(
        str(PROJECT_ROOT / "conf"), env=env, **CONFIG_LOADER_ARGS
    )
    return loader["parameters"]


def project_params(env: str = "base") -> dict:
    """The project's parameters for ``env`` exactly as ``kedro run --env <env>`` resolves
    them (Kedro's ``OmegaConfigLoader`` with the settings of ``settings.py``); a copy."""
    return copy.deepcopy(_project_params(env))


def train_params(**overrides) -> dict:
    """``training.train`` of ``conf/base`` with ``overrides`` on top (soft merge): what a
    test's tiny model trains with; every other option keeps its one default."""
    from skin_lesion_classifier.config_defaults import soft_merge

    return soft_merge(project_params()["training"]["train"], overrides)


def tiny_train_params(**overrides) -> dict:
    """``training.train`` for a tiny random-init ``test_efficientnet`` trained 2 epochs on a
    few dozen cached images: no warm-up, EMA, augmentation or progress bar, seed 0;
    ``overrides`` on top (soft merge)."""
    cfg = {
        "arch": "test_efficientnet",
        "pretrained": False,
        "allow_random_init": True,
        "input_size": [64, 64],
        "epochs": 2,
        "batch_size": 8,
        "eval_batch_size": 32,
        "lr": 3e-3,
        "warmup_epochs": 0,
        "ema": False,
        "progress": False,
        "data_path": "device",
        "augment": {"enabled": False},
        "seed": 0,
    }
    return train_params(**{**cfg, **overrides})


def fusion_params(**overrides) -> dict:
    """``ensemble.fusion`` of ``conf/base`` with ``overrides`` on top (soft merge)."""
    from skin_lesion_classifier.config_defaults import soft_merge

    return soft_merge(project_params()["ensemble"]["fusion"], overrides)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the layering test's fresh interpreter (seconds of imports) as soon as the tests
    are chosen, when it is among them: it runs beside the other tests on a second core.

    Also move everything imported so far (torch, timm, MLflow: millions of objects that live
    for the whole session) out of the garbage collector's sight: its full collections, and
    the ones pytest runs at the end, then skip them (about 2 s at the end of a fast run)."""
    if session.config.option.collectonly:
        return
    gc.freeze()
    if any(
        item.name == "test_models_and_engine_imports_in_a_fresh_interpreter"
        for item in session.items
    ):
        from tests.test_layering import start_fresh_interpreter

        start_fresh_interpreter()


def kedro_env(**extra: str) -> dict[str, str]:
    """The environment for a ``kedro`` (or ``mlflow``) subprocess: telemetry off and no
    inherited ``MLFLOW_TRACKING_URI``, then ``extra`` on top.

    ``mlflow.set_tracking_uri()`` in an earlier test also sets ``MLFLOW_TRACKING_URI`` in this
    process's environment; ``conf/base/mlflow.yml`` reads that variable, so a run would log to
    the earlier test's store instead of its own. A test that wants a tracking URI passes it in
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["KEDRO_DISABLE_TELEMETRY"] = "true"
    env.update(extra)
    return env


def run_kedro(
    cwd: Path, *args: str, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``kedro *args`` of this environment in ``cwd`` (environment: :func:`kedro_env` with
    ``env`` on top), output captured, return code not checked."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("kedro")), *args],
        cwd=cwd,
        env=kedro_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def scratch_project(root: Path, *folders: str) -> Path:
    """A copy of the project's configuration (not its data, not ``conf/local``) in
    ``root/project``, plus the named ``folders`` (e.g. ``notebooks``), so that a ``kedro``
    subprocess run there writes only under ``root``. The package itself is the one installed
    in the environment."""
    dst = root / "project"
    dst.mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(PROJECT_ROOT / name, dst / name)
    shutil.copytree(
        PROJECT_ROOT / "conf", dst / "conf", ignore=shutil.ignore_patterns("local")
    )
    (dst / "conf" / "local").mkdir()
    for name in folders:
        shutil.copytree(PROJECT_ROOT / name, dst / name)
    (dst / "src").mkdir()
    return dst


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"test data not found at {path}; put the shared HAM10000 data there "
            "or set SLC_SHARED_DATA"
        )
    return path


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def ham10000_dir() -> Path:
    """The full HAM10000 at 200x150: ``HAM10000_metadata.csv`` + ``images/``."""
    return _require(SHARED_DATA / "ham10000")


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """21 images at the original 600x450 + ``HAM10000_metadata_samples.csv``."""
    return _require(SHARED_DATA / "ham10000-samples")


@pytest.fixture(scope="session")
def metadata_df(ham10000_dir: Path) -> pd.DataFrame:
    """The original 10,015-row metadata, as read from disk."""
    return pd.read_csv(ham10000_dir / "HAM10000_metadata.csv")


def make_small_split(
    metadata: pd.DataFrame, image_dir: Path, per_class: int = 8, seed: int = 0
) -> pd.DataFrame:
    """A small, real, lesion-aware split: ``per_class`` lesions per class (one image each),
    half train, a quarter val, a quarter test. Columns follow the ``image_index`` +
    ``split_assignment`` contract (see docs/architecture.md)."""
    rng = np.random.default_rng(seed)
    rows = []
    first = metadata.drop_duplicates("lesion_id")
    for dx in CLASSES:
        lesions = first[first.dx == dx]
        pick = lesions.iloc[rng.choice(len(lesions), size=per_class, replace=False)]
        n_train, n_val = per_class // 2, per_class // 4
        for k, (_, r) in enumerate(pick.iterrows()):
            split = (
                "train" if k < n_train else ("val" if k < n_train + n_val else "test")
            )
            rows.append(
                {
                    "image_id": r.image_id,
                    "lesion_id": r.lesion_id,
                    "group_id": r.lesion_id,
                    "dx": dx,
                    "label": CLASS_TO_INDEX[dx],
                    "dx_type": r.dx_type,
                    "age": r.age,
                    "sex": r.sex,
                    "localization": r.localization,
                    "path": str(image_dir / f"{r.image_id}.jpg"),
                    "split": split,
                    "fold": -1,
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def small_split(metadata_df: pd.DataFrame, ham10000_dir: Path) -> pd.DataFrame:
    """56 real 200x150 images (8 lesions per class) with a train/val/test split."""
    return make_small_split(metadata_df, ham10000_dir / "images", per_class=8)


#: The known duplicate pairs of HAM10000: two byte-identical pairs within a lesion, and one
#: picture filed under two lesion ids (``conf/base/parameters_ingestion.yml``).
IDENTICAL_PAIRS = {("ISIC_0024366", "ISIC_0029861"), ("ISIC_0024777", "ISIC_0029938")}
CROSS_LESION_PAIR = ("ISIC_0025226", "ISIC_0030074")


@pytest.fixture(scope="session")
def full_lesion_index(metadata_df: pd.DataFrame) -> pd.DataFrame:
    """All 10,015 metadata rows as a splitter input: ``label`` and ``group_id`` (the lesion,
    with the known cross-lesion duplicate pair merged into one group)."""
    index = metadata_df.copy()
    index["label"] = index["dx"].map(CLASS_TO_INDEX)
    index["group_id"] = index["lesion_id"]
    index.loc[index.image_id.isin(CROSS_LESION_PAIR), "group_id"] = "GROUP_dup_0025226"
    return index


@pytest.fixture(scope="session")
def full_split_assignment(full_lesion_index: pd.DataFrame) -> pd.DataFrame:
    """The project's split of all 10,015 images (70/15/15, seed 42) with 5 lesion-grouped
    folds over train+val, plus ``orig_lesion``; computed once per session. Copy before
    changing it."""
    from skin_lesion_classifier.pipelines.splitting.nodes import assign_splits

    params = {
        "train_size": 0.7,
        "val_size": 0.15,
        "test_size": 0.15,
        "seed": 42,
        "n_folds": 5,
    }
    index = full_lesion_index
    return assign_splits(index, params).merge(
        index[["image_id", "lesion_id"]].rename(columns={"lesion_id": "orig_lesion"}),
        on="image_id",
    )


def catalog_section(project_root: Path, *sections: str) -> dict:
    """The entries of ``conf/base/catalog.yml`` under ``# === section: <name>`` headers."""
    import yaml

    chunks: dict[str, list[str]] = {}
    current = None
    for line in (project_root / "conf/base/catalog.yml").read_text().splitlines():
        if line.startswith("# === section: "):
            current = line.removeprefix("# === section: ").strip()
            chunks[current] = []
        elif current is not None:
            chunks[current].append(line)
    conf: dict = {}
    for name in sections:
        if name not in chunks:
            raise KeyError(
                f"no section {name!r} in conf/base/catalog.yml; have {sorted(chunks)}"
            )
        conf.update(yaml.safe_load("\n".join(chunks[name])) or {})
    return conf


def tiny_model(
    input_size=(48, 64),
    seed: int = 0,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    **meta_extra,
):
    """A random-init timm ``test_efficientnet`` and its checkpoint meta (project contract),
    for tests that need a real model but not a trained one. ``meta_extra`` adds keys such as
    ``decision`` or ``metrics``."""
    import torch

    from skin_lesion_classifier.models.factory import create_model

    torch.manual_seed(seed)
    model = create_model(
        "test_efficientnet", num_classes=len(CLASSES), input_size=input_size
    )
    meta = {
        "arch": "test_efficientnet",
        "classes": list(CLASSES),
        "input_size": list(input_size),
        "mean": list(mean),
        "std": list(std),
        **meta_extra,
    }
    return model, meta
