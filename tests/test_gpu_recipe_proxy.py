"""CPU proxy of the default GPU recipe (conf/base): same code path and knobs, tiny scale.

The default fine-tune has never run on CUDA here, so this test runs exactly its recipe
(``data_path: device``, AdamW, learning rate, cosine warm-up, EMA, augmentation, sampling,
label smoothing, drop rates from ``conf/base/parameters_training.yml``) on ~340 real
HAM10000 images at 64x96 for 2 epochs, with only the input size, epochs, batch size and
device reduced. It checks that the new head starts neutral (loss ~ ln 7) and that the
recipe learns from there instead of diverging.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from skin_lesion_classifier.config_defaults import resolved_parameters, soft_merge
from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.cache import build_image_cache
from skin_lesion_classifier.data.transforms import to_float_nchw
from skin_lesion_classifier.models.factory import create_model, resolve_preprocessing
from skin_lesion_classifier.training.config import TrainConfig
from skin_lesion_classifier.training.engine import train_model
from tests.conftest import make_small_split, project_params

SIZE = (64, 96)
#: what the proxy changes; everything else is the GPU default
PROXY = {
    "input_size": list(SIZE),
    "epochs": 2,
    "batch_size": 32,
    "device": "cpu",
    "data_path": "device",
    "progress": False,
}


@pytest.mark.slow
def test_gpu_default_recipe_learns_on_a_cpu_proxy(
    project_root, metadata_df, ham10000_dir
):
    params = project_params("base")["training"]["train"]
    cfg = TrainConfig.from_dict(soft_merge(params, PROXY))
    assert cfg.train_mode == "finetune" and cfg.pretrained and cfg.ema
    split = make_small_split(metadata_df, ham10000_dir / "images", per_class=48, seed=1)
    cache = build_image_cache(split, SIZE, num_workers=2, progress=False)
    tr, va = split[split.split == "train"], split[split.split == "val"]
    val_images, y_val = cache.take(va.image_id), va.label.to_numpy()

    torch.manual_seed(cfg.seed)
    model = create_model(
        cfg.arch, pretrained=True, input_size=SIZE, **cfg.model_kwargs
    ).eval()
    prep = resolve_preprocessing(model)
    with torch.no_grad():
        logits = model(to_float_nchw(val_images, prep["mean"], prep["std"]))
    initial = float(torch.nn.functional.cross_entropy(logits, torch.tensor(y_val)))
    assert abs(initial - math.log(len(CLASSES))) < 0.1  # neutral start, not ~4.5

    result = train_model(
        cache.take(tr.image_id), tr.label.to_numpy(), val_images, y_val, cfg
    )
    hist = result.history
    assert list(hist.epoch) == [1, 2]
    assert np.isfinite(hist.train_loss).all()
    # learns from the neutral start: no confidently wrong phase, better than chance
    assert hist.train_loss.iloc[0] < math.log(len(CLASSES)) + 0.2
    assert (hist.val_loss < math.log(len(CLASSES))).all()
    assert hist.val_loss.iloc[-1] < hist.val_loss.iloc[0]
    assert hist.val_balanced_accuracy.max() > 2.0 / len(CLASSES)
    assert hist.val_macro_auc.iloc[-1] > 0.65


def test_cpu_finetune_is_the_gpu_recipe_at_a_reduced_size():
    """The long CPU option (conf/cpu_finetune) changes only size, length and device
    details of the default recipe: the optimiser, schedule, EMA, augmentation and
    sampling are the GPU default's."""
    base = resolved_parameters("training", "base")["train"]
    long = resolved_parameters("training", "cpu_finetune")["train"]
    changed = {k for k in base if base[k] != long[k]}
    assert changed <= {
        "input_size",
        "epochs",
        "batch_size",
        "eval_batch_size",
        "patience",
        "amp",
        "data_path",
        "max_train_minutes",
    }
    assert long["input_size"] == [128, 171] and long["train_mode"] == "finetune"
    assert long["frozen_stages"] == 0  # every stage trains
    TrainConfig.from_dict(long)
