"""One source of truth for parameters: every option the engine reads comes from the YAML
of conf/base, an environment overrides only the keys it names, and the typed configs
carry no defaults of their own."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from skin_lesion_classifier.config_defaults import resolved_parameters, soft_merge
from skin_lesion_classifier.data.augment import AugmentConfig
from skin_lesion_classifier.pipelines.ensemble.nodes import member_parameters
from skin_lesion_classifier.pipelines.ensemble.pipeline import MEMBERS
from skin_lesion_classifier.training.bench import load_train_config
from skin_lesion_classifier.training.config import TrainConfig
from skin_lesion_classifier.training.fusion import FusionHeadConfig
from tests.conftest import (
    PROJECT_ROOT,  # noqa: E402
    project_params,
)

#: base and every environment shipped in conf/ (conf/local is the user's own)
ENVS = (
    "base",
    *sorted(
        p.name
        for p in (PROJECT_ROOT / "conf").iterdir()
        if p.is_dir() and p.name not in ("base", "local")
    ),
)
TYPED = (TrainConfig, AugmentConfig, FusionHeadConfig)


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("cls", TYPED, ids=lambda c: c.__name__)
def test_typed_configs_carry_no_defaults(cls):
    with_default = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING
        or f.default_factory is not dataclasses.MISSING
    ]
    assert with_default == []


@pytest.mark.parametrize("env", ENVS)
def test_every_option_the_engine_reads_comes_from_yaml(env):
    params = project_params(env)
    train = params["training"]["train"]
    assert set(train) == _field_names(TrainConfig)
    assert set(train["augment"]) == _field_names(AugmentConfig)
    cfg = TrainConfig.from_dict(train)
    cfg.augment_config  # noqa: B018 - validates the augment block
    fusion = params["ensemble"]["fusion"]
    assert set(fusion) == _field_names(FusionHeadConfig)
    FusionHeadConfig.from_dict(fusion)
    # the input size is declared once (conf/<env>/globals.yml) and agrees everywhere
    assert list(cfg.input_size) == params["model_input"]["input_size"]
    for m in MEMBERS:
        model_input, training = member_parameters(
            params["model_input"], params["training"], params["ensemble"]["members"][m]
        )
        member = TrainConfig.from_dict(training["train"])
        assert list(member.input_size) == model_input["input_size"]
        assert set(model_input) == set(params["model_input"])
    # every key a node reads is there (no `.get(key, default)` fallback is left to apply)
    for key in ("checkpoint_dir", "mlflow_model"):
        assert key in params["training"]
    assert set(params["training"]["mlflow_model"]) == {"device", "batch_size", "tta"}


def _leaves(d: dict, prefix: tuple = ()):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def _get(d: dict, path: tuple):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return KeyError
        d = d[k]
    return d


def test_quick_overrides_only_the_keys_it_names(project_root):
    base, quick = project_params("base"), project_params("quick")
    named = {}
    for f in (project_root / "conf/quick").glob("parameters*.yml"):
        named.update(yaml.safe_load(f.read_text()))
    changed, kept = [], 0
    for path, value in _leaves(base):
        if path[0] == "external_validation":
            continue  # ${env:...} paths
        if _get(named, path) is KeyError and "input_size" not in path:
            assert _get(quick, path) == value, path  # not named: the base value
            kept += 1
        else:
            changed.append(path)
    assert kept > 100
    q = quick["training"]["train"]
    assert q["train_mode"] == "finetune" and q["input_size"] == [128, 171]
    assert q["frozen_stages"] == 3 and base["training"]["train"]["frozen_stages"] == 0
    # keys the destructive merge used to drop under --env quick now come from base
    for key in ("grad_clip", "optimizer", "seed", "augment", "backbone_lr_mult"):
        assert q[key] == base["training"]["train"][key]
    # the mlflow_model block keeps base's keys beside the one quick names
    assert quick["training"]["mlflow_model"] == {
        **base["training"]["mlflow_model"],
        "tta": quick["evaluation"]["tta"],
    }
    # the quick ensemble's members keep the frozen-backbone head recipe at 150x200
    for member in quick["ensemble"]["members"].values():
        assert member["train"]["train_mode"] == "frozen_features"
        assert member["train"]["frozen_stages"] == 0 and member["input_size"] == [150, 200]
    assert quick["ensemble"]["members"]["member_2"]["train"]["batch_size"] == 256
    assert quick["ensemble"]["members"]["member_2"]["train"]["arch"] == "efficientnet_lite1"


@pytest.mark.parametrize("env", ENVS)
def test_reading_conf_without_kedro_matches_kedro(env, project_root):
    """The engine's reader (bench command, tests) resolves conf/ as Kedro does."""
    params = project_params(env)
    for section, value in params.items():
        if section == "external_validation":
            continue  # ${env:...} needs Kedro's resolver; the engine never reads it
        assert resolved_parameters(section, env) == value, section
    path = project_root / "conf" / env / "parameters_training.yml"
    if path.exists():
        assert load_train_config(path) == params["training"]["train"]


def test_missing_and_unknown_options_are_named():
    train = project_params()["training"]["train"]
    with pytest.raises(ValueError, match=r"missing training option.*'grad_clip'"):
        TrainConfig.from_dict({k: v for k, v in train.items() if k != "grad_clip"})
    with pytest.raises(ValueError, match=r"unknown training option.*'learning_rate'"):
        TrainConfig.from_dict({**train, "learning_rate": 0.1})
    fusion = project_params()["ensemble"]["fusion"]
    with pytest.raises(ValueError, match=r"missing fusion option.*'seed'"):
        FusionHeadConfig.from_dict({k: v for k, v in fusion.items() if k != "seed"})
    member = project_params()["ensemble"]["members"]["member_1"]
    with pytest.raises(ValueError, match="unknown: \\['lr'\\]"):
        member_parameters({}, {"train": train}, {**member, "lr": 0.1})


def test_soft_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    out = soft_merge(base, {"a": {"y": [3]}, "c": None})
    assert out == {"a": {"x": 1, "y": [3]}, "b": 2, "c": None}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 2}


LAYERS = {
    "raw",
    "intermediate",
    "primary",
    "model_input",
    "models",
    "model_output",
    "reporting",
}


@pytest.mark.parametrize("env", ENVS)
def test_every_catalog_entry_names_its_kedro_viz_layer(env):
    """kedro-viz groups the graph by these layers; every dataset (factories included)
    carries one, and the resolved catalog builds with it."""
    from kedro.config import OmegaConfigLoader
    from kedro.io import DataCatalog

    from skin_lesion_classifier.settings import CONFIG_LOADER_ARGS
    from tests.conftest import PROJECT_ROOT

    conf = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), env=env, **CONFIG_LOADER_ARGS)
    catalog_conf = conf["catalog"]
    layers = {n: e["metadata"]["kedro-viz"]["layer"] for n, e in catalog_conf.items()}
    assert set(layers.values()) <= LAYERS
    assert layers["raw_metadata"] == "raw" and layers["split_assignment"] == "primary"
    catalog = DataCatalog.from_config(catalog_conf)
    for name in ("raw_metadata", "image_cache", "member_1.image_cache"):
        assert catalog.get(name).metadata["kedro-viz"]["layer"] in LAYERS, name
    size = project_params(env)["model_input"]["input_size"]
    assert catalog_conf["image_cache"]["path"].endswith(
        f"image_cache_{size[0]}x{size[1]}"
    )


def test_the_project_pyfunc_predict_has_type_hints():
    """MLflow reads these (and warns without them); a DataFrame hint gives it no
    signature, so the logged model's is explicit (``mlflow_model.pyfunc_signature``)."""
    import pandas as pd
    from mlflow.models.signature import _extract_type_hints

    from skin_lesion_classifier.mlflow_model import SkinLesionPyfunc

    hints = _extract_type_hints(SkinLesionPyfunc.predict, input_arg_index=1)
    assert hints.input is pd.DataFrame and hints.output is pd.DataFrame
