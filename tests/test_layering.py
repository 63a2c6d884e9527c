"""The import floors of docs/architecture.md hold: a module imports only from floors below
it, ``models/`` imports nothing above ``data/``, and no engine module imports Kedro or
MLflow (checked on the source, function-level imports included, and in a fresh
interpreter)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "skin_lesion_classifier"

#: Floor of each engine sub-package (lower floors never import higher ones).
FLOORS = {
    "constants": 0,
    "device": 0,
    "data": 1,
    "models": 2,
    "training": 3,
    "inference": 4,
    "evaluation": 5,
    "reporting": 6,
}
ENGINE = tuple(FLOORS)
FORBIDDEN_IN_ENGINE = ("kedro", "kedro_datasets", "kedro_mlflow", "mlflow")
#: Known upward imports, each with its reason; the test fails on any other (and on an
#: entry here that no longer occurs, so the list only shrinks).
KNOWN_UPWARD = {
    # the training loop scores validation with the one batched forward pass + TTA
    (
        "skin_lesion_classifier.training.engine",
        "skin_lesion_classifier.inference.predict",
    ),
    (
        "skin_lesion_classifier.training.bench",
        "skin_lesion_classifier.inference.predict",
    ),
    # the loop scores validation with the project's metric functions (one copy of each)
    (
        "skin_lesion_classifier.training.loop",
        "skin_lesion_classifier.evaluation.metrics",
    ),
    # inference applies the decision rule that evaluation fits on validation
    (
        "skin_lesion_classifier.inference.decision",
        "skin_lesion_classifier.evaluation.decision",
    ),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "skin_lesion_classifier" or len(parts) < 2:
        return None
    return FLOORS.get(parts[1])


def _imports(path: Path) -> list[str]:
    """Every absolute import in the file, wherever it stands (module or function)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


def _engine_files() -> list[Path]:
    files = []
    for name in ENGINE:
        files += [PACKAGE / f"{name}.py"] if (PACKAGE / f"{name}.py").exists() else []
        files += sorted((PACKAGE / name).rglob("*.py"))
    return files


def test_engine_modules_import_only_floors_below_and_no_kedro_or_mlflow():
    files = _engine_files()
    assert len(files) > 30, "the engine packages were not found"
    upward, framework = set(), []
    for path in files:
        module = _module_name(path)
        own = _floor(module)
        for imported in _imports(path):
            if imported.split(".")[0] in FORBIDDEN_IN_ENGINE:
                framework.append(f"{module} imports {imported}")
            target = _floor(imported)
            if target is not None and target > own:
                upward.add((module, ".".join(imported.split(".")[:3])))
    assert not framework, framework
    assert upward - KNOWN_UPWARD == set(), sorted(upward - KNOWN_UPWARD)
    assert KNOWN_UPWARD - upward == set(), (
        f"{sorted(KNOWN_UPWARD - upward)} no longer happen: drop them from KNOWN_UPWARD"
    )


_FRESH: dict[str, subprocess.Popen] = {}


def start_fresh_interpreter() -> subprocess.Popen:
    """The fresh interpreter of :func:`test_models_and_engine_imports_in_a_fresh_interpreter`
    (started once). ``conftest.py`` starts it as soon as the tests are chosen, so that its
    seconds of imports run beside the other tests instead of after them."""
    if "proc" not in _FRESH:
        models = [_module_name(p) for p in sorted((PACKAGE / "models").glob("*.py"))]
        engine = [_module_name(p) for p in _engine_files()]
        # only the project's and the frameworks' modules are printed: the whole of
        # sys.modules (~80 kB) would fill the pipe, and the interpreter would wait for the
        # test to read it instead of importing beside the other tests
        watched = ("skin_lesion_classifier", *FORBIDDEN_IN_ENGINE)
        code = (
            "import importlib, json, sys\n"
            "def loaded():\n"
            f"    return sorted(m for m in sys.modules if m.split('.')[0] in {watched!r})\n"
            f"for m in {models!r}: importlib.import_module(m)\n"
            "print(json.dumps(loaded()))\n"
            f"for m in {engine!r}: importlib.import_module(m)\n"
            "print(json.dumps(loaded()))\n"
        )
        _FRESH["proc"] = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    return _FRESH["proc"]


def test_models_and_engine_imports_in_a_fresh_interpreter():
    """Importing every ``models/`` module (the union covers each one alone) loads no
    training, inference, evaluation, reporting, pipeline, Kedro or MLflow module; importing
    every engine module then loads no Kedro or MLflow (one interpreter, two snapshots)."""
    models = [_module_name(p) for p in sorted((PACKAGE / "models").glob("*.py"))]
    assert "skin_lesion_classifier.models.ensemble" in models
    proc = start_fresh_interpreter()
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    after_models, after_engine = (
        json.loads(line) for line in stdout.strip().splitlines()[-2:]
    )
    above = [
        m
        for m in after_models
        if m.split(".")[0] in FORBIDDEN_IN_ENGINE
        or (
            m.startswith("skin_lesion_classifier.")
            and _floor(m) not in range(FLOORS["models"] + 1)
        )
    ]
    assert above == [], above
    assert [m for m in after_engine if m.split(".")[0] in FORBIDDEN_IN_ENGINE] == []
    assert "skin_lesion_classifier.reporting.report" in after_engine
