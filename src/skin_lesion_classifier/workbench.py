"""What this machine and this checkout hold: ``make info``, ``make check-gpu``,
``make dataset-info``.

``python -m skin_lesion_classifier.workbench info|check-gpu|dataset-info [--env ENV]``.
Paths come from the Kedro catalog of the project in the current folder (never typed
here); the tracking store from ``MLFLOW_TRACKING_URI`` or ``conf/*/mlflow.yml``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from pathlib import Path
from typing import Any

import torch

#: Distributions whose versions ``make info`` prints.
PACKAGES = (
    "skin_lesion_classifier",
    "torch",
    "torchvision",
    "timm",
    "kedro",
    "kedro-datasets",
    "kedro-mlflow",
    "kedro-viz",
    "mlflow",
    "onnxruntime",
    "fastapi",
)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def accelerator_report() -> list[str]:
    """Lines saying which devices exist and what ``make run`` and training do with them.

    Mirrors ``device.detect_device`` (cuda, then mps, then cpu), the Makefile's choice of
    Kedro environment (GPU config on CUDA, else ``conf/quick``) and the training engine's
    rules (mixed precision and the on-device data path are CUDA-only).
    """
    cuda = torch.cuda.is_available()
    mps = _mps_available()
    lines = [f"torch {torch.__version__} (built for CUDA {torch.version.cuda or '-'})"]
    if cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(
                f"CUDA: yes, device {i}: {props.name}, "
                f"{props.total_memory / 2**30:.1f} GiB, bf16 "
                f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}"
            )
    else:
        lines.append("CUDA: not available")
    lines.append(f"Apple MPS: {'available' if mps else 'not available'}")
    lines.append(f"CPU: {torch.get_num_threads()} torch threads")
    device = "cuda" if cuda else "mps" if mps else "cpu"
    env = "base (GPU config)" if cuda else "quick (conf/quick, CPU config)"
    lines.append(f"`make run` would use: device {device}, Kedro environment {env}")
    if device == "cuda":
        lines.append(
            "on CUDA: bf16/fp16 autocast, the uint8 cache and augmentation on the GPU "
            "(data_path: device), channels-last, optional torch.compile"
        )
    elif device == "mps":
        lines.extend(mps_notes())
    else:
        lines.append(
            "on CPU: fp32 (mixed precision is CUDA-only), DataLoader data path, the "
            "quick config (frozen backbone, features computed once) keeps it to minutes"
        )
    return lines


def mps_notes() -> list[str]:
    """What runs on Apple MPS and what does not (also in the README)."""
    return [
        "on MPS: the model, forward/backward and evaluation run on the GPU in fp32;",
        "  AMP is off (autocast bf16/fp16 is CUDA-only in this project: `amp` is ignored),",
        "  images come through the DataLoader path (data_path auto -> dataloader; the",
        "  on-device cache and GPU augmentation are CUDA-only), no torch.compile,",
        "  no pinned memory; run the GPU config with `make run KEDRO_ENV=local` or the",
        "  CPU-sized one with `make run KEDRO_ENV=quick` (the default without CUDA)",
    ]


def _catalog(env: str | None):
    """The Kedro catalog of the project in the current folder."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(Path.cwd())
    session = KedroSession.create(project_path=Path.cwd(), env=env)
    return session.load_context().catalog


def data_report(catalog) -> list[str]:
    """Whether the raw data and the ingestion outputs are there."""
    lines = []
    raw = catalog.get("raw_images") if hasattr(catalog, "get") else None
    if catalog.exists("raw_metadata") and raw is not None and raw.exists():
        files = raw.load()
        lines.append(f"raw data: metadata present, {len(files)} image files")
    else:
        lines.append("raw data: missing (run `make data`)")
    for name in ("image_index", "split_assignment", "image_cache"):
        state = "present" if catalog.exists(name) else "not built yet"
        lines.append(f"{name}: {state}")
    if catalog.exists("model_checkpoint"):
        meta = catalog.load("model_checkpoint")["meta"]
        metrics = meta.get("metrics") or {}
        ba = metrics.get("val_balanced_accuracy")
        lines.append(
            f"latest model: {meta.get('arch')} {meta.get('input_size')}"
            + (f", val balanced accuracy {ba:.3f}" if ba is not None else "")
        )
    else:
        lines.append("latest model: none yet (make run)")
    return lines


def latest_run_report() -> list[str]:
    """The tracking store and its most recent run (read after the Kedro session set the
    tracking URI from ``mlflow.yml`` / ``MLFLOW_TRACKING_URI``)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if (
        uri.startswith("sqlite:///")
        and not Path(uri.removeprefix("sqlite:///")).exists()
    ):
        return [f"MLflow store {uri}: empty (no run yet)"]
    try:
        runs = mlflow.search_runs(
            search_all_experiments=True, order_by=["start_time DESC"], max_results=1
        )
    except Exception as exc:  # noqa: BLE001 - a report line, not a failure
        return [f"MLflow store {uri}: not reachable ({exc})"]
    if runs.empty:
        return [f"MLflow store {uri}: no run yet"]
    run = runs.iloc[0]
    return [
        f"MLflow store {uri}: latest run {run['run_id']} "
        f"({run.get('tags.mlflow.runName', '')}, {run['status']}, "
        f"started {run['start_time']:%Y-%m-%d %H:%M})"
    ]


def info(env: str | None) -> list[str]:
    lines = [f"python {platform.python_version()} on {platform.platform()}"]
    lines += [f"{dist} {_version(dist)}" for dist in PACKAGES]
    lines += accelerator_report()
    lines += data_report(_catalog(env))
    lines += latest_run_report()
    return lines


def dataset_info(env: str | None) -> list[str]:
    """Class and lesion counts from the ingestion (and, when present, split) outputs."""
    catalog = _catalog(env)
    if not catalog.exists("image_index"):
        raise SystemExit(
            "no image_index yet: run `kedro run --pipelines ingestion` (or `make run`)"
        )
    index = catalog.load("image_index")
    per_lesion = index.groupby("lesion_id").size()
    table = index.groupby("dx").agg(
        images=("image_id", "size"), lesions=("lesion_id", "nunique")
    )
    table["share"] = (table["images"] / table["images"].sum()).round(3)
    lines = [
        f"{len(index)} usable images of {index['lesion_id'].nunique()} lesions; "
        f"images per lesion: mean {per_lesion.mean():.2f}, max {per_lesion.max()}",
        table.to_string(),
    ]
    if catalog.exists("split_assignment"):
        split = catalog.load("split_assignment")
        counts = split.pivot_table(
            index="dx", columns="split", values="image_id", aggfunc="count"
        )
        lines.append(counts.fillna(0).astype(int).to_string())
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["info", "check-gpu", "dataset-info"])
    parser.add_argument("--env", default=None, help="Kedro environment (default local)")
    args = parser.parse_args(argv)
    commands: dict[str, Any] = {
        "info": lambda: info(args.env),
        "check-gpu": accelerator_report,
        "dataset-info": lambda: dataset_info(args.env),
    }
    sys.stdout.write("\n".join(commands[args.command]()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
