"""Project settings. See https://docs.kedro.org/en/stable/configure/configuration_basics/

Every parameter has its one default in ``conf/base``; an environment (``conf/quick``,
``conf/local``) names only the keys it changes: parameters and globals are *soft*-merged
(nested mappings are merged key by key; a list or a scalar replaces the base value).
"""

import os
import warnings
from pathlib import Path

from kedro.config import OmegaConfigLoader  # noqa: F401

from skin_lesion_classifier.hooks import ProjectHooks

# Kedro 1.7's config loader and kedro-mlflow's hook register their resolvers with OmegaConf
# 2.4's deprecated register_new_resolver(); code outside this project that it cannot
# change, so the deprecation notice is not shown on every run.
warnings.filterwarnings(
    "ignore",
    message=r"register_new_resolver\(\) is deprecated",
    category=UserWarning,
    module=r"kedro(\.config\.omegaconf_config|_mlflow\.framework\.hooks)",
)

HOOKS = (ProjectHooks(),)


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
    "merge_strategy": {"parameters": "soft", "globals": "soft"},
}
