"""Two `kedro run`s started at the same time in one project: each keeps its own versioned
model, decision rule, metrics and report, the MLflow store stays whole, and the predict
command takes the latest model with the rule evaluated for it."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from skin_lesion_classifier.config_defaults import soft_merge
from skin_lesion_classifier.inference.versions import (
    WEIGHTS_KEY,
    resolve_version,
    saved_versions,
    weights_digest,
)
from skin_lesion_classifier.models.checkpoint import read_checkpoint
from tests.conftest import kedro_env, scratch_project

PER_CLASS = 10
SIZE = [32, 32]


def _tiny_conf(proj: Path) -> None:
    """A tiny model: conf/local names only the keys it changes (soft merge)."""
    local = proj / "conf" / "local"
    (local / "globals.yml").write_text(yaml.safe_dump({"input_size": SIZE}))
    train = dict(
        arch="test_efficientnet", pretrained=False, allow_random_init=True,
        model_kwargs={}, epochs=1, batch_size=8, eval_batch_size=16, amp="off",
        channels_last=False, ema=False, device="cpu", data_path="dataloader",
        num_workers=0, progress=False,
    )  # fmt: skip
    params = {
        "splitting": {"n_folds": 0},
        "model_input": {"progress": False, "num_workers": 1},
        "training": {"mlflow_model": {"device": "cpu"}, "train": train},
        "evaluation": {"device": "cpu", "bootstrap": {"n_boot": 20}},
    }
    (local / "parameters_tiny.yml").write_text(yaml.safe_dump(params))


def _raw_data(proj: Path, metadata_df: pd.DataFrame, ham10000_dir: Path) -> None:
    first = metadata_df.drop_duplicates("lesion_id")
    rows = first.groupby("dx", group_keys=False).head(PER_CLASS)
    raw = proj / "data" / "01_raw"
    (raw / "images").mkdir(parents=True)
    for image_id in rows.image_id:
        shutil.copy(ham10000_dir / "images" / f"{image_id}.jpg", raw / "images")
    rows.to_csv(raw / "HAM10000_metadata.csv", index=False)


def _start(proj: Path, *args: str) -> subprocess.Popen:
    kedro = Path(sys.executable).with_name("kedro")
    # each run logs to the scratch project's own store
    env = kedro_env(OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [str(kedro), "run", *args], cwd=proj, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_two_runs_at_once_keep_their_own_results(
    tmp_path, project_root, metadata_df, ham10000_dir, samples_dir
):
    import mlflow

    proj = scratch_project(tmp_path)
    _raw_data(proj, metadata_df, ham10000_dir)
    _tiny_conf(proj)
    _finish(_start(proj, "--pipelines", "ingestion,splitting,model_input"))

    runs = [
        _start(
            proj,
            "--pipelines",
            "training,evaluation,reporting",
            "--params",
            f"training.train.seed={seed},training.checkpoint_dir=data/06_models/ck{seed}",
        )  # fmt: skip
        for seed in (1, 2)
    ]
    for proc in runs:
        _finish(proc)

    data = proj / "data"
    for entry in (
        "06_models/model.pt",
        "06_models/decision_rule.json",
        "07_model_output/test_predictions.parquet",
        "08_reporting/evaluation_metrics.json",
        "08_reporting/report.html",
    ):
        assert len(saved_versions(data / entry)) == 2, entry
    models = data / "06_models" / "model.pt"
    versions = saved_versions(models)
    files = [models / v / "model.pt" for v in versions]
    assert _sha(files[0]) != _sha(files[1])  # two models, neither overwritten

    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["skin_lesion_classifier"])
    assert len(found) == 3 and set(found.status) == {"FINISHED"}
    client = mlflow.MlflowClient()
    trained = found[found["params.training.train.seed"].notna()]
    logged = set()
    for run_id in trained.run_id:
        ckpt = Path(
            client.download_artifacts(run_id, "checkpoint/model.pt", str(tmp_path))
        )
        in_model = Path(
            client.download_artifacts(
                run_id, "model/artifacts/model.pt", str(tmp_path / run_id)
            )
        )
        assert _sha(ckpt) == _sha(in_model), "the logged model holds another checkpoint"
        logged.add(_sha(ckpt))
    assert logged == {_sha(f) for f in files}

    # predict takes the latest model and the decision rule of the same run
    from skin_lesion_classifier.cli import main

    out = tmp_path / "preds.csv"
    assert main(["predict", str(samples_dir / "images"), "--model", str(models),
                 "--output", str(out)]) == 0  # fmt: skip
    assert len(pd.read_csv(out)) == 21
    rule = json.loads(
        (
            data / "06_models/decision_rule.json" / versions[-1] / "decision_rule.json"
        ).read_text()
    )
    latest_weights = read_checkpoint(files[-1])["state_dict"]
    assert rule[WEIGHTS_KEY] == weights_digest(latest_weights)  # chosen for that model


_FIRST_USE = """
import sys
from mlflow.tracking import MlflowClient
from skin_lesion_classifier.hooks import prepare_sqlite_store
uri = "sqlite:///" + sys.argv[1]
prepare_sqlite_store(uri)
client = MlflowClient(uri)
run = client.create_run(client.create_experiment("exp" + sys.argv[2]))
for step in range(50):
    client.log_metric(run.info.run_id, "m", step, step=step)
"""


@pytest.mark.slow
def test_three_processes_create_and_share_a_fresh_mlflow_store(tmp_path):
    # without the lock, two of three processes failed here on the table migration
    # ("duplicate column name: step")
    db = tmp_path / "mlflow.db"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FIRST_USE, str(db), str(k)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for k in range(3)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 3
    assert all(len(client.get_metric_history(r.info.run_id, "m")) == 50 for r in runs)


def _tiny_ensemble_conf(proj: Path) -> None:
    """Two tiny members, short fusion heads, few bootstrap draws (conf/local)."""
    member = {"input_size": SIZE, "train": {"arch": "test_efficientnet"}}
    params = {
        "ensemble": {
            "members": {
                "member_1": member,
                "member_2": soft_merge(
                    member,
                    {
                        "train": {
                            "arch": "resnet10t",
                            "model_kwargs": {},
                            "batch_size": 8,
                            "eval_batch_size": 16,
                        }
                    },
                ),  # fmt: skip
            },
            "fusion": {
                "hidden": [8],
                "epochs": 2,
                "batch_size": 16,
                "patience": 2,
                "feature_views": 1,
                "min_site_count": 1,
            },  # fmt: skip
            "predict": {"device": "cpu"},
            "mlflow": {"mlflow_model": {"device": "cpu"}},
            "compare": {"n_boot": 20},
        }
    }
    (proj / "conf/local/parameters_tiny_ensemble.yml").write_text(
        yaml.safe_dump(params)
    )


@pytest.mark.slow
def test_a_second_ensemble_run_keeps_the_first_ones_results(
    tmp_path, metadata_df, ham10000_dir, samples_dir
):
    proj = scratch_project(tmp_path)
    _raw_data(proj, metadata_df, ham10000_dir)
    _tiny_conf(proj)
    _tiny_ensemble_conf(proj)
    _finish(_start(proj, "--pipelines", "ingestion,splitting"))
    for _ in range(2):
        _finish(_start(proj, "--pipelines", "ensemble"))

    data = proj / "data"
    ensemble = data / "06_models/ensemble/ensemble.pt"
    versions = saved_versions(ensemble)
    assert len(versions) == 2
    for entry in (  # every output of both runs is kept, each at its run's version
        "06_models/ensemble/ensemble_image.pt",
        "06_models/ensemble/decision_rule.json",
        "06_models/ensemble/members/member_2_meta.pt",
        "06_models/ensemble/members/member_1_decision_rule.json",
        "07_model_output/ensemble/ensemble/test_predictions.parquet",
        "08_reporting/ensemble/comparison.csv",
        "08_reporting/ensemble/report.html",
    ):
        assert saved_versions(data / entry) == versions, entry
    # the ensemble model logged to MLflow by each run carries that run's checkpoint
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["skin_lesion_classifier"])
    logged = set()
    for run_id in runs.run_id:
        try:
            path = mlflow.MlflowClient().download_artifacts(
                run_id, "ensemble_model/artifacts/ensemble.pt", str(tmp_path / run_id)
            )
        except Exception:  # noqa: BLE001 - the ingestion run logged no model
            continue
        logged.add(_sha(Path(path)))
    assert logged == {_sha(ensemble / v / "ensemble.pt") for v in versions}
    # predict with the ensemble folder: the latest version with its own decision rule
    from skin_lesion_classifier.cli import main

    out = tmp_path / "preds.csv"
    assert main(["predict", str(samples_dir / "images"), "--model", str(ensemble),
                 "--output", str(out)]) == 0  # fmt: skip
    assert len(pd.read_csv(out)) == 21
    rule = json.loads(
        (resolve_version(data / "06_models/ensemble/decision_rule.json")).read_text()
    )
    latest = read_checkpoint(ensemble / versions[-1] / "ensemble.pt")["state_dict"]
    assert rule[WEIGHTS_KEY] == weights_digest(latest)
