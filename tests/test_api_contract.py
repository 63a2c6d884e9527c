"""A schema-driven fuzzer (Schemathesis) against the real service, bounded: every operation
of /openapi.json gets generated valid and invalid requests (its default phases: examples,
coverage, fuzzing), and every default check must pass: no 5xx, status codes, content
types, headers and bodies as the schema says, invalid requests refused, valid requests
accepted (see tests/schemathesis.toml and tests/fuzz_hooks.py for the picture)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from skin_lesion_classifier.api.server import LocalServer
from tests.service_helpers import tiny_checkpoint

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
#: Generated cases per operation and phase; the whole run takes well under a minute.
MAX_EXAMPLES = 25


def test_schemathesis_default_checks_pass(tmp_path, samples_dir) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st, "schemathesis is a dev dependency (pip install -e '.[dev]')"
    env = {"SLC_MODEL": str(tiny_checkpoint(tmp_path)), "SLC_THREADS": "1"}
    picture = sorted((samples_dir / "images").glob("*.jpg"))[0]
    with LocalServer(env, log_path=tmp_path / "serve.log") as server:
        run_env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks",
            "SLC_FUZZ_PICTURE": str(picture),
            "PYTHONPATH": os.pathsep.join(
                [str(TESTS.parent), os.environ.get("PYTHONPATH", "")]
            ),
        }
        cmd = [
            st, "--config-file", str(TESTS / "schemathesis.toml"), "run",
            f"{server.url}/openapi.json", "--max-examples", str(MAX_EXAMPLES),
            "--seed", "7", "--workers", "1", "--generation-database", "none",
            "--output-truncate", "true", "--request-timeout", "60",
        ]  # fmt: skip
        out = subprocess.run(
            cmd,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            cwd=tmp_path,  # schemathesis keeps a cache folder in its working directory
        )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    assert "4 selected / 4 total" in text and " failed" not in text, text[-3000:]
