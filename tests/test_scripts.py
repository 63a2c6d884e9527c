"""The measurement scripts under scripts/ still import what they use (a rename in the
package must not break them silently): each is imported as a module, without running it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").rglob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_imports(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs the imports; main() only under __main__
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"


def test_scripts_found() -> None:
    assert len(SCRIPTS) >= 3
