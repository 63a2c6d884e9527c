"""DDP on the CPU: 2 gloo processes on a few dozen real HAM10000 images, tiny models.

Equivalence (measured on 2 cores): 2 ranks x batch 4 and 1 process x batch 8, 2 epochs of
5 steps, GroupNorm model (no per-rank BatchNorm statistics), no dropout/augmentation:
train losses agree to 3e-6 and every weight to 1e-6 on both data paths; the tests
allow 1e-4 (loss, relative) and 1e-5 (weights, absolute).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.cache import ImageCache, build_image_cache
from skin_lesion_classifier.inference.predict import predict_proba
from skin_lesion_classifier.models.checkpoint import load_model
from skin_lesion_classifier.training.config import TrainConfig
from skin_lesion_classifier.training.distributed import DistContext, rank_shard
from skin_lesion_classifier.training.engine import train_model
from skin_lesion_classifier.training.feeders import global_batches
from skin_lesion_classifier.training.launch import WorkerFailed, launch_training
from skin_lesion_classifier.training.sampler import epoch_indices
from tests.conftest import tiny_train_params

SIZE = (64, 64)


@pytest.fixture(scope="module")
def cache(small_split) -> ImageCache:
    return build_image_cache(small_split, SIZE, num_workers=2, progress=False)


def tiny(**overrides) -> dict:
    cfg = {
        "arch": "test_efficientnet_gn",  # GroupNorm: no per-rank batch statistics
        "input_size": list(SIZE),
        "model_kwargs": {"drop_rate": 0.0, "drop_path_rate": 0.0},
        "channels_last": False,
        "sampler_power": 0.5,
        "num_workers": 0,
    }
    return tiny_train_params(**{**cfg, **overrides})


def _splits(cache, small_split):
    tr = small_split[small_split.split == "train"]
    va = small_split[small_split.split == "val"]
    return tr, va


def _launch(cache, small_split, cfg: dict, checkpoint_dir=None, **kw):
    tr, va = _splits(cache, small_split)
    return launch_training(
        cache.images,
        cache.rows(tr.image_id),
        tr.label.to_numpy(),
        cache.rows(va.image_id),
        va.label.to_numpy(),
        TrainConfig.from_dict({**cfg, "distributed": {"nproc_per_node": 2}}),
        checkpoint_dir,
        CLASSES,
        **kw,
    )


def raise_on_rank(row: dict, rank: int) -> None:
    """An ``on_epoch_end`` that fails on one rank only (pickled into the workers)."""
    if int(os.environ["RANK"]) == rank:
        raise ValueError(f"disk full on rank {rank} after epoch {row['epoch']}")


def test_ranks_see_the_global_batches_of_one_process(small_split):
    labels = small_split.label.to_numpy()
    idx = epoch_indices(labels, 0.5, 37, torch.Generator().manual_seed(3))
    one = [b for b, _ in global_batches(idx, 8, DistContext())]
    ranks = [
        list(global_batches(idx, 8, DistContext(rank=r, world_size=2)))
        for r in range(2)
    ]
    # 4 full batches + a last batch of 5 split 3 + 2
    assert [len(b) for b, _ in ranks[0]] == [4, 4, 4, 4, 3]
    for k, batch in enumerate(one):
        torch.testing.assert_close(torch.cat([ranks[0][k][0], ranks[1][k][0]]), batch)
        # DDP averages the ranks' scaled batch means: each sample weighs 1 / len(batch)
        for r in range(2):
            mine, scale = ranks[r][k]
            assert scale / (2 * len(mine)) == pytest.approx(1 / len(batch))
    # the DataLoader path's sampler holds the same indices in the same order
    shard0 = rank_shard(idx, 8, DistContext(rank=0, world_size=2))
    torch.testing.assert_close(shard0, torch.cat([b for b, _ in ranks[0]]))
    with pytest.raises(ValueError, match="not divisible"):
        rank_shard(idx, 7, DistContext(rank=0, world_size=2))


@pytest.mark.slow
@pytest.mark.parametrize("data_path", ["device", "dataloader"])
def test_two_ranks_match_one_process(cache, small_split, data_path):
    torch.set_num_threads(1)
    tr, va = _splits(cache, small_split)
    cfg = tiny(data_path=data_path)
    one = train_model(
        cache.take(tr.image_id),
        tr.label.to_numpy(),
        cache.take(va.image_id),
        va.label.to_numpy(),
        cfg,
    )
    two = _launch(cache, small_split, cfg)
    np.testing.assert_allclose(
        two.history.train_loss, one.history.train_loss, rtol=1e-4
    )
    np.testing.assert_allclose(two.history.val_loss, one.history.val_loss, rtol=1e-4)
    a, b = one.checkpoint["state_dict"], two.checkpoint["state_dict"]
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, worst
    # and the run really moved the weights (a broken all-reduce would not match)
    assert one.history.train_loss.iloc[-1] < one.history.train_loss.iloc[0]


@pytest.mark.slow
def test_kedro_training_node_starts_ddp_workers(tmp_path, cache, small_split):
    from skin_lesion_classifier.pipelines.training.nodes import train_classifier

    params = {
        "checkpoint_dir": str(tmp_path / "ck"),
        "train": tiny(
            arch="test_efficientnet",
            ema=True,
            data_path="dataloader",
            distributed={"nproc_per_node": 2},
        ),
    }
    ckpt, history, metrics = train_classifier(cache, small_split, params)
    assert list(history.epoch) == [1, 2]
    assert metrics["val_balanced_accuracy"][-1]["step"] == 2
    assert (tmp_path / "ck" / "best.pt").is_file()
    saved = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert saved["world_size"] == 2 and len(saved["rng_ranks"]) == 2
    model, meta = load_model(ckpt)
    test = small_split[small_split.split == "test"]
    p = predict_proba(model, cache.take(test.image_id), meta["mean"], meta["std"])
    assert p.shape == (len(test), len(CLASSES)) and np.allclose(p.sum(1), 1, atol=1e-5)


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_with_its_error(cache, small_split):
    t0 = time.perf_counter()
    with pytest.raises(WorkerFailed, match=r"rank 1 failed: .*disk full on rank 1"):
        _launch(
            cache,
            small_split,
            tiny(epochs=5),
            on_epoch_end=functools.partial(raise_on_rank, rank=1),
        )
    # rank 0 did not wait out the 30-minute collective timeout (bound loose for busy CPUs)
    assert time.perf_counter() - t0 < 900


def _write_inputs(tmp_path, cache, small_split):
    from skin_lesion_classifier.datasets.image_cache import ImageCacheDataset

    ImageCacheDataset(str(tmp_path / "cache")).save(cache)
    small_split.to_parquet(tmp_path / "split.parquet")


def _torchrun(tmp_path, params: dict, out: str, **popen):
    import yaml

    (tmp_path / "params.yml").write_text(
        yaml.safe_dump({"training": {"train": params}})
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "skin_lesion_classifier.training",
        "--params",
        str(tmp_path / "params.yml"),
        "--cache",
        str(tmp_path / "cache"),
        "--split",
        str(tmp_path / "split.parquet"),
        "--output",
        str(tmp_path / out),
        "--model",
        str(tmp_path / out / "model.pt"),
        "--history",
        str(tmp_path / out / "history.csv"),
    ]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (Linux ``/proc``); torchrun puts each worker in a
    session of its own, so killing the launcher's group would leave them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.mark.slow
def test_torchrun_entry_point_trains_and_a_killed_run_resumes(
    tmp_path, cache, small_split
):
    _write_inputs(tmp_path, cache, small_split)
    # epochs of 320 samples (a few seconds each), so that the kill lands mid-run
    params = tiny(
        arch="test_efficientnet",
        data_path="dataloader",
        epochs=4,
        samples_per_epoch=320,
    )
    proc = _torchrun(tmp_path, params, "run")
    last = tmp_path / "run" / "last.pt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if last.is_file() and torch.load(last, weights_only=True)["epoch"] >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    for pid in [*_descendants(proc.pid), proc.pid]:  # both workers, then torchrun
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    killed_at = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= killed_at < 4 and not (tmp_path / "run" / "model.pt").exists()

    proc = _torchrun(tmp_path, params, "run")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert f"at epoch {killed_at + 1}" in log  # resumed, not restarted
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(history.epoch) == [1, 2, 3, 4]
    model, meta = load_model(tmp_path / "run" / "model.pt")
    assert meta["training"]["epoch"] == int(
        history.loc[history.val_balanced_accuracy.idxmax(), "epoch"]
    )
    test = small_split[small_split.split == "test"]
    p = predict_proba(model, cache.take(test.image_id), meta["mean"], meta["std"])
    assert p.shape == (len(test), len(CLASSES)) and np.allclose(p.sum(1), 1, atol=1e-5)
