"""Project settings. See https://docs.kedro.org/en/stable/configure/configuration_basics/"""

import os

from kedro.config import OmegaConfigLoader  # noqa: F401


def _env(name: str, default: str | None = None) -> str | None:
    """``${env:NAME,default}`` in any config file: an environment variable or a default."""
    return os.environ.get(name, default)


CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "custom_resolvers": {"env": _env},
}
