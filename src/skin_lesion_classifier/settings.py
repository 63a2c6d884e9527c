"""Project settings. See https://docs.kedro.org/en/stable/configure/configuration_basics/"""

import os
from pathlib import Path

from kedro.config import OmegaConfigLoader  # noqa: F401


def _env(name: str, default: str | None = None) -> str | None:
    """``${env:NAME,default}`` in any config file: an environment variable or a default."""
    return os.environ.get(name, default)


def _package_dir() -> str:
    """``${package_dir:}``: this package's folder, the code the logged pyfunc carries."""
    return str(Path(__file__).resolve().parent)


CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "custom_resolvers": {"env": _env, "package_dir": _package_dir},
}
