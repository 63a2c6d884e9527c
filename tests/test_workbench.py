"""The workbench around the pipelines: Make targets, ``make help``, ``check-gpu``, the
pre-commit configuration and the committed notebooks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

BIN = Path(sys.executable).parent
#: Every target the workbench promises (issue: the familiar commands).
EXPECTED_TARGETS = {
    "help", "setup", "data", "run", "test", "info", "check-gpu", "dataset-info",
    "train-efficientnet", "train-resnet", "train-vit", "train-swin", "train-ensemble",
    "analyze", "visualize", "notebook", "format", "type-check", "pre-commit", "dev",
    "clean-logs", "clean-all", "serve", "viz", "viz-build", "mlflow-ui",
}  # fmt: skip


#: fixed so that each `make` call does not ask torch for CUDA
ENV = ["KEDRO_ENV=quick"]


def _make(project_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            f"VENV={BIN.parent}",
            f"BIN={BIN}",
            *ENV,
            *args,
        ],
        cwd=project_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _targets(project_root: Path) -> list[str]:
    text = (project_root / "Makefile").read_text()
    return re.findall(r"^([a-z][a-z0-9-]*):", text, flags=re.MULTILINE)


def test_make_help_lists_every_target_with_one_line(project_root: Path) -> None:
    targets = _targets(project_root)
    assert EXPECTED_TARGETS <= set(targets), EXPECTED_TARGETS - set(targets)
    out = _make(project_root, "help")
    assert out.returncode == 0, out.stderr
    described = {}
    for line in out.stdout.splitlines():
        m = re.match(r"\s+make (\S+)\s+(\S.*)$", line)
        if m:
            described[m.group(1)] = m.group(2)
    assert set(targets) == set(described), set(targets) ^ set(described)
    assert all(d.strip() for d in described.values())


def test_every_target_dry_runs(project_root: Path) -> None:
    """``make -n`` of each target: the recipe expands (no missing variable/target)."""
    for target in _targets(project_root):
        out = _make(project_root, "-n", target)
        assert out.returncode == 0, (target, out.stderr)


def test_train_targets_override_the_architecture(project_root: Path) -> None:
    arch = {
        "train-efficientnet": "tf_efficientnet_lite0",
        "train-resnet": "resnet50_attention",
        "train-vit": "vit_small",
        "train-swin": "swin_tiny",
    }
    for target, name in arch.items():
        plain = _make(project_root, "-n", target).stdout
        assert f"training.train.arch={name}" in plain
        assert "--pipelines ingestion,splitting,model_input,training" in plain
        assert "allow_random_init" not in plain  # offline: the clear weights message
        scratch = _make(project_root, "-n", target, "ALLOW_RANDOM_INIT=1").stdout
        assert (
            "training.train.pretrained=false,training.train.allow_random_init=true"
            in scratch
        )


def test_check_gpu_reports_this_machine_honestly(capsys) -> None:
    from skin_lesion_classifier.workbench import main  # `python -m` runs the same main

    assert main(["check-gpu"]) == 0
    out = capsys.readouterr().out
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    assert ("CUDA: not available" in out) is not cuda
    assert ("Apple MPS: available" in out) is mps
    device = "cuda" if cuda else "mps" if mps else "cpu"
    assert f"`make run` would use: device {device}" in out
    assert ("Kedro environment quick" in out) is not cuda


def test_mps_notes_say_what_runs_there() -> None:
    from skin_lesion_classifier.workbench import mps_notes

    text = " ".join(mps_notes())
    assert "AMP is off" in text and "DataLoader" in text


def test_pre_commit_hooks_are_local_and_strip_notebooks(project_root: Path) -> None:
    conf = yaml.safe_load((project_root / ".pre-commit-config.yaml").read_text())
    assert {r["repo"] for r in conf["repos"]} == {"local"}  # nothing fetched offline
    ids = {h["id"] for r in conf["repos"] for h in r["hooks"]}
    assert {"ruff", "ruff-format", "nbstripout"} <= ids


@pytest.mark.parametrize("name", ["01_data_exploration", "02_results"])
def test_notebooks_are_committed_without_outputs(project_root: Path, name: str) -> None:
    # read as the JSON it is: nbformat's import pulls in jsonschema's format checkers,
    # seconds of start-up for a check of a few keys
    nb = json.loads((project_root / "notebooks" / f"{name}.ipynb").read_text())
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
    source = "\n".join("".join(c["source"]) for c in code)
    assert "%load_ext kedro.ipython" in source and "catalog.load(" in source
    assert "data/0" not in source  # paths come from the catalog, never typed here
