"""Train outside Kedro, e.g. on several machines with ``torchrun``::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint node0:29500 --rdzv_id ham1 \\
        -m skin_lesion_classifier.training \\
        --params conf/base/parameters_training.yml \\
        --cache data/05_model_input/image_cache \\
        --split data/03_primary/split_assignment.parquet \\
        --output data/06_models/checkpoints \\
        --model data/06_models/model.pt \\
        --history data/08_reporting/training_history.csv

Every worker runs the same engine (:func:`~skin_lesion_classifier.training.engine.train_model`)
on the ``train`` and ``val`` rows of the split; rank 0 writes ``best.pt`` / ``last.pt``
to ``--output`` and, at the end, the best checkpoint to ``--model`` and the per-epoch
history to ``--history`` (the catalog's ``model_checkpoint`` and ``training_history``
files), after which ``kedro run --pipelines evaluation,reporting`` picks them up.
Without ``torchrun`` it trains in one process. The cache, split and output paths must be
the same shared files on every node.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def load_cache(path: str | Path) -> tuple[np.ndarray, dict[str, int]]:
    """The image cache folder (``images.npy`` memory-mapped + ``index.json``): the array
    and the row of each image id."""
    path = Path(path)
    index_file, array_file = path / "index.json", path / "images.npy"
    if not index_file.is_file() or not array_file.is_file():
        raise FileNotFoundError(
            f"no image cache at {path} (images.npy + index.json); build it with "
            "kedro run --pipelines model_input"
        )
    ids = json.loads(index_file.read_text())["image_ids"]
    return np.load(array_file, mmap_mode="r"), {str(i): k for k, i in enumerate(ids)}


def split_rows(
    split: pd.DataFrame, row_of: dict[str, int], name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Cache rows and labels of the ``name`` rows of the split assignment."""
    part = split[split["split"] == name]
    if part.empty:
        raise ValueError(f"the split assignment has no {name!r} rows")
    missing = [i for i in part["image_id"].astype(str) if i not in row_of]
    if missing:
        raise KeyError(
            f"{len(missing)} {name} image id(s) are not in the image cache: {missing[:10]}"
        )
    rows = np.array([row_of[str(i)] for i in part["image_id"]], dtype=np.int64)
    return rows, part["label"].to_numpy(dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m skin_lesion_classifier.training",
        description=__doc__.split("::")[0],
    )
    parser.add_argument(
        "--params",
        required=True,
        help="conf/<env>/parameters_training.yml (resolved on conf/base as kedro run "
        "does) or a YAML of training options on top of conf/base's",
    )
    parser.add_argument("--cache", required=True, help="image cache folder")
    parser.add_argument("--split", required=True, help="split assignment parquet")
    parser.add_argument("--output", required=True, help="folder for best.pt, last.pt")
    parser.add_argument("--model", help="where rank 0 writes the best checkpoint")
    parser.add_argument("--history", help="where rank 0 writes the history CSV")
    args = parser.parse_args(argv)

    from skin_lesion_classifier.models.checkpoint import atomic_torch_save
    from skin_lesion_classifier.training.bench import load_train_config
    from skin_lesion_classifier.training.config import TrainConfig
    from skin_lesion_classifier.training.distributed import init_from_env
    from skin_lesion_classifier.training.engine import train_model

    cfg = TrainConfig.from_dict(load_train_config(args.params))
    ctx, device = init_from_env(cfg.device)
    logging.basicConfig(
        level=logging.INFO if ctx.is_main else logging.WARNING,
        format=f"[rank {ctx.rank}] %(name)s: %(message)s",
    )
    images, row_of = load_cache(args.cache)
    split = pd.read_parquet(args.split)
    tr_rows, tr_labels = split_rows(split, row_of, "train")
    va_rows, va_labels = split_rows(split, row_of, "val")
    result = train_model(
        np.ascontiguousarray(images[tr_rows]),
        tr_labels,
        np.ascontiguousarray(images[va_rows]),
        va_labels,
        cfg,
        checkpoint_dir=args.output,
        device=device,
        dist_context=ctx,
    )
    if ctx.is_main:
        if args.model:
            atomic_torch_save(result.checkpoint, args.model)
        if args.history:
            Path(args.history).parent.mkdir(parents=True, exist_ok=True)
            result.history.to_csv(args.history, index=False)
        logging.getLogger(__name__).info(
            "best epoch %d: %s", result.best_epoch, result.best_metrics
        )
    if ctx.enabled:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
