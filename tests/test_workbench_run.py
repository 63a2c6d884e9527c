"""A small real run against a real MLflow tracking server, and what the workbench does with
it: the registered model loads back by ``models:/`` URI, also where the project is not
installed; the notebooks execute end to end; ``kedro viz build`` writes a static site.

One ``kedro run`` (ingestion -> report) on 140 real images with a tiny random-init model
(parameter overrides on the default configuration), logging to ``mlflow server`` on loopback
with its own backend store and ``--artifacts-destination``.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from skin_lesion_classifier.constants import CLASSES
from tests.conftest import kedro_env, run_kedro, scratch_project

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
MODEL_NAME = "skin-lesion-classifier"
#: The tiny run: default configuration, random-init test model, 2 epochs, few bootstrap draws.
PARAMS = ",".join(
    [
        "training.train.arch=test_efficientnet",
        "training.train.pretrained=false",
        "training.train.allow_random_init=true",
        "training.train.epochs=2",
        "training.train.batch_size=16",
        "training.train.eval_batch_size=32",
        "training.train.amp=off",
        "training.train.channels_last=false",
        "training.train.progress=false",
        "model_input.progress=false",
        "evaluation.bootstrap.n_boot=20",
        "evaluation.decision.n_folds=2",
        "splitting.n_folds=0",
    ]
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "server-artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=kedro_env(),
    )
    deadline = time.monotonic() + 600  # a loaded 2-core machine takes minutes
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited: {(root / 'server.log').read_text()}"
            )
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(
        f"mlflow server did not start: {(root / 'server.log').read_text()}"
    )


def _project_with_data(root: Path, metadata: pd.DataFrame, images: Path):
    """The project's configuration and notebooks plus 20 lesions per class of real data."""
    proj = scratch_project(root, "notebooks")
    first = metadata.drop_duplicates("lesion_id")
    lesions = first.groupby("dx").head(20)["lesion_id"]
    rows = metadata[metadata.lesion_id.isin(lesions)]
    raw = proj / "data" / "01_raw"
    raw.mkdir(parents=True)
    rows.to_csv(raw / "HAM10000_metadata.csv", index=False)
    for image_id in rows.image_id:
        shutil.copy(images / f"{image_id}.jpg", raw / f"{image_id}.jpg")
    return proj


@pytest.fixture(scope="module")
def served_run(tmp_path_factory, metadata_df, ham10000_dir):
    """(project folder, tracking URI) after one small ``kedro run`` against the server."""
    root = tmp_path_factory.mktemp("workbench")
    proc, uri = _start_server(root)
    try:
        proj = _project_with_data(root, metadata_df, ham10000_dir / "images")
        out = run_kedro(
            proj,
            "run",
            "--params",
            PARAMS,
            env={"MLFLOW_TRACKING_URI": uri},
            timeout=900,
        )
        assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
        yield proj, uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_runs_artifacts_and_models_go_to_the_tracking_server(served_run) -> None:
    import mlflow
    from mlflow import MlflowClient

    proj, uri = served_run
    assert not (proj / "mlflow.db").exists()  # nothing in a local store
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["skin_lesion_classifier"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    (best_ba,) = [c for c in runs.columns if c.endswith(".best_val_balanced_accuracy")]
    assert 0 <= run[best_ba] <= 1
    client = MlflowClient(uri)
    artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"checkpoint", "figures", "report.html"} <= artifacts
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == "1" and champion.run_id == run["run_id"]
    assert float(champion.tags["val_balanced_accuracy"]) == pytest.approx(run[best_ba])
    (saved,) = (proj / "data/06_models").rglob("model_registration.json/*/*.json")
    registration = json.loads(saved.read_text())
    assert registration["promoted"] and registration["version"] == "1"


def test_the_champion_loads_by_models_uri_and_serves(served_run, samples_dir) -> None:
    """``make serve MODEL=models:/skin-lesion-classifier@champion``'s model reference."""
    import mlflow

    from skin_lesion_classifier.api.model_source import open_predictor

    proj, uri = served_run
    picture = sorted((samples_dir / "images").glob("*.jpg"))[0]
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    out = model.predict(pd.DataFrame({"path": [str(picture)]}))
    assert list(out.columns) == [f"prob_{c}" for c in CLASSES] + ["pred"]
    pred = open_predictor(f"models:/{MODEL_NAME}@champion", tracking_uri=uri)
    assert pred.version == f"{MODEL_NAME}/1"
    probs = pred.predict_one(picture)
    assert probs.sum() == pytest.approx(1, abs=1e-5)


#: Runs in a fresh interpreter where the project's package is not importable (its source
#: folder and editable-install path entries are removed) and loads the model from a folder.
_WITHOUT_PROJECT = r"""
import importlib.util, json, sys
sys.path[:] = [p for p in sys.path if p and not __import__('os').path.isdir(
    __import__('os').path.join(p, 'skin_lesion_classifier'))]
assert importlib.util.find_spec('skin_lesion_classifier') is None, 'project importable'
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({'path': [sys.argv[2]]}))
import skin_lesion_classifier
print(json.dumps({'module': skin_lesion_classifier.__file__, 'pred': out['pred'][0]}))
"""


def test_the_logged_model_loads_where_the_project_is_not_installed(
    served_run, samples_dir, tmp_path
) -> None:
    import mlflow

    proj, uri = served_run
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(
        f"models:/{MODEL_NAME}@champion", dst_path=str(tmp_path / "model")
    )
    picture = sorted((samples_dir / "images").glob("*.jpg"))[0]
    env = kedro_env()
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_PROJECT, local, str(picture)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["module"].startswith(str(tmp_path / "model"))  # the model's own code
    assert result["pred"] in CLASSES


#: Figures each notebook draws at least (counts, age, examples; confusion, mistakes).
FIGURES = {"01_data_exploration": 3, "02_results": 2}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebooks_run_end_to_end(served_run, name: str, monkeypatch) -> None:
    """Each notebook executes top to bottom on the small run (Kedro's IPython extension,
    the catalog, the tracking server through MLFLOW_TRACKING_URI)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    proj, uri = served_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    nb = nbformat.read(proj / "notebooks" / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(proj / "notebooks")}},
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= FIGURES[name]  # the figures were drawn


def test_kedro_viz_build_writes_a_static_site_with_previews(served_run) -> None:
    proj, uri = served_run
    out = run_kedro(
        proj, "viz", "build", "--include-previews", env={"MLFLOW_TRACKING_URI": uri}
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    build = proj / "build"
    assert (build / "index.html").is_file()
    graph = json.loads((build / "api" / "main").read_text())
    names = {n["name"]: n["id"] for n in graph["nodes"]}
    assert {"train_classifier", "register_model", "evaluation_metrics"} <= set(names)

    def preview(dataset: str) -> tuple[str | None, object]:
        node = json.loads((build / "api" / "nodes" / names[dataset]).read_text())
        return node.get("preview_type"), node.get("preview")

    # metrics JSON and tables of the (unversioned) ingestion and splitting outputs
    assert preview("data_quality_report")[0] == "JSONPreview"
    assert preview("split_summary")[0] == "TablePreview"
    assert preview("data_quality_report")[1]
