"""Start the service in a child process on a free loopback port (for benchmarks and tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

LOOPBACK = "127.0.0.1"
#: uvicorn's protocol with a deadline on the request head (``SLC_HEADER_TIMEOUT_S``).
HTTP_PROTOCOL = "skin_lesion_classifier.api.protocol:HeaderTimeoutProtocol"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalServer:
    """``uvicorn skin_lesion_classifier.api.app:create_app`` in a child process on
    ``127.0.0.1``, configured through ``SLC_*`` environment variables.

    Use as a context manager: it waits until ``GET /health`` answers (or the process dies,
    which raises with its output) and stops the process on exit.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        port: int | None = None,
        startup_timeout: float = 120.0,
        log_path: str | os.PathLike | None = None,
        cwd: str | os.PathLike | None = None,
        http: str = HTTP_PROTOCOL,
    ):
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.env = {**os.environ, **env}
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else None
        self.cwd = cwd
        self.http = http
        self.proc: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> LocalServer:
        cmd = [
            sys.executable, "-m", "uvicorn", "skin_lesion_classifier.api.app:create_app",
            "--factory", "--host", LOOPBACK, "--port", str(self.port), "--log-level", "warning",
            "--no-server-header", "--http", self.http,
        ]  # fmt: skip
        if self.log_path:
            self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__
            out = self._log
        else:
            out = subprocess.DEVNULL
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (
                    self.log_path.read_text(errors="replace")[-3000:]
                    if self.log_path
                    else ""
                )
                self.__exit__(None, None, None)
                raise RuntimeError(
                    f"service exited with code {self.proc.returncode} at start-up:\n{log}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise TimeoutError(
            f"service on {self.url} did not answer /health within {self.startup_timeout} s"
        )

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
