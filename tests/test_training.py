"""Training engine and training pipeline on a few dozen real HAM10000 images (CPU, tiny models)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.augment import (
    AugmentConfig,
    augment_batch,
    torchvision_transform,
)
from skin_lesion_classifier.data.cache import ImageCache, build_image_cache
from skin_lesion_classifier.inference.predict import predict_proba
from skin_lesion_classifier.models.checkpoint import load_model
from skin_lesion_classifier.training.engine import _UInt8Dataset, train_model
from skin_lesion_classifier.training.losses import FocalLoss, build_loss, class_weights
from skin_lesion_classifier.training.sampler import epoch_indices
from tests.conftest import tiny_train_params, train_params

SIZE = (64, 64)


def augment_config(options: dict) -> AugmentConfig:
    """``training.train.augment`` of conf/base with ``options`` on top."""
    return AugmentConfig.from_dict(train_params(augment=options)["augment"])


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def cache(small_split) -> ImageCache:
    return build_image_cache(small_split, SIZE, num_workers=2, progress=False)


@pytest.fixture(scope="module")
def parts(small_split):
    return {s: small_split[small_split.split == s] for s in ("train", "val", "test")}


def tiny_config(**overrides) -> dict:
    return tiny_train_params(
        **{"input_size": list(SIZE), "sampler_power": 0.0, **overrides}
    )


def _train(cache, parts, checkpoint_dir=None, **overrides):
    tr, va = parts["train"], parts["val"]
    return train_model(
        cache.take(tr.image_id),
        tr.label.to_numpy(),
        cache.take(va.image_id),
        va.label.to_numpy(),
        tiny_config(**overrides),
        checkpoint_dir=checkpoint_dir,
    )


# ----------------------------------------------------------------------- augmentation
def test_augment_batch_keeps_shapes_and_range_on_real_images(cache, parts):
    images = torch.from_numpy(cache.take(parts["train"].image_id))
    cfg = augment_config({})
    out = augment_batch(images, cfg)
    assert out.shape == (len(images), 3, *SIZE) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    plain = images.permute(0, 3, 1, 2).float() / 255
    assert (out - plain).abs().mean() > 0.02  # something happened
    assert augment_batch(images, cfg, out_size=(32, 48)).shape == (
        len(images),
        3,
        32,
        48,
    )
    off = augment_batch(images, augment_config({"enabled": False}))
    assert torch.equal(off, plain)


def test_augment_flip_is_exact(cache, parts):
    images = torch.from_numpy(cache.take(parts["train"].image_id[:4]))
    only_hflip = augment_config(
        {
            "hflip": 1.0,
            "vflip": 0.0,
            "rotation": 0,
            "zoom": [1, 1],
            "crop_p": 0,
            "brightness": 0,
            "contrast": 0,
            "saturation": 0,
        }
    )
    out = augment_batch(images, only_hflip)
    expected = torch.flip(images.permute(0, 3, 1, 2).float() / 255, dims=[3])
    assert torch.allclose(out, expected, atol=1e-5)


def test_dataloader_path_keeps_labels_and_shapes(cache, parts):
    tr = parts["train"]
    tf = torchvision_transform(augment_config({}), SIZE, [0.5] * 3, [0.5] * 3)
    ds = _UInt8Dataset(cache.take(tr.image_id), tr.label.to_numpy(), tf)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, *SIZE) and x.dtype == torch.float32
        assert y == tr.label.iloc[i]


def test_bad_augmentation_options_fail_clearly():
    with pytest.raises(ValueError, match="unknown augmentation option"):
        AugmentConfig.from_dict({"rotate": 10})
    with pytest.raises(ValueError, match="zoom"):
        augment_config({"zoom": [1.2, 0.8]})
    with pytest.raises(ValueError, match=r"missing augmentation option.*'vflip'"):
        AugmentConfig.from_dict(
            {k: v for k, v in train_params()["augment"].items() if k != "vflip"}
        )


# ----------------------------------------------------------------------- losses, sampler
def test_focal_loss_with_gamma_zero_is_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 7), torch.randint(0, 7, (16,))
    w = torch.tensor(class_weights([5, 1, 2, 3, 4, 6, 7], 1.0), dtype=torch.float32)
    ce_w = torch.nn.functional.cross_entropy(logits, y, weight=w)
    assert torch.allclose(FocalLoss(0.0, w)(logits, y), ce_w, atol=1e-6)
    ce_s = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(FocalLoss(0.0, None, 0.1)(logits, y), ce_s, atol=1e-6)
    assert FocalLoss(2.0)(logits, y) < torch.nn.functional.cross_entropy(logits, y)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("hinge")


def test_class_weights_formula():
    w = class_weights(
        [10, 30], power=1.0
    )  # n/(C n_c) = 2, 2/3 -> mean-normalised 1.5, 0.5
    assert np.allclose(w, [1.5, 0.5])
    with pytest.raises(ValueError, match="every class needs training samples"):
        class_weights([3, 0], 1.0)


def test_inverse_frequency_sampling_balances_classes(metadata_df):
    labels = metadata_df.dx.map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    idx = epoch_indices(
        labels,
        power=1.0,
        num_samples=70_000,
        generator=torch.Generator().manual_seed(0),
    )
    freq = np.bincount(labels[idx.numpy()], minlength=7) / 70_000
    assert np.allclose(freq, 1 / 7, atol=0.01)
    idx0 = epoch_indices(labels, power=0.0, generator=torch.Generator().manual_seed(0))
    assert sorted(idx0.tolist()) == list(range(len(labels)))


# ----------------------------------------------------------------------- engine
@pytest.mark.slow
def test_loss_falls_and_best_checkpoint_reloads(tmp_path, cache, parts):
    result = _train(cache, parts, tmp_path / "ck", epochs=3)
    hist = result.history
    assert list(hist.epoch) == [1, 2, 3]
    assert hist.train_loss.iloc[-1] < hist.train_loss.iloc[0]
    assert set(hist.columns) >= {
        "val_balanced_accuracy",
        "val_macro_auc",
        "lr",
        "images_per_second",
    }
    assert (tmp_path / "ck" / "best.pt").is_file() and (
        tmp_path / "ck" / "last.pt"
    ).is_file()
    model, meta = load_model(tmp_path / "ck" / "best.pt")
    assert meta["classes"] == list(CLASSES) and meta["input_size"] == list(SIZE)
    assert (
        meta["train_class_counts"]
        == np.bincount(parts["train"].label, minlength=7).tolist()
    )
    assert meta["metrics"]["val_balanced_accuracy"] == pytest.approx(
        hist.val_balanced_accuracy.max()
    )
    test_images = cache.take(parts["test"].image_id)
    p1 = predict_proba(model, test_images, meta["mean"], meta["std"])
    p2 = predict_proba(result.model, test_images, meta["mean"], meta["std"])
    assert np.allclose(p1, p2, atol=1e-6) and np.allclose(p1.sum(1), 1, atol=1e-5)


@pytest.mark.slow
def test_ema_warm_up_follows_the_optimizer_steps(cache, parts):
    """The EMA that is evaluated forgets the starting weights within the first steps
    (timm's warm-up needs the step count): with decay 0.9999 and one short epoch it moves
    most of the way from the initial weights to the trained ones. Without the warm-up it
    would stay at the initial weights (a few steps x 1e-4 of the way)."""
    from skin_lesion_classifier.models.factory import create_model

    torch.manual_seed(0)
    init = create_model("test_efficientnet", input_size=SIZE).state_dict()
    raw = _train(cache, parts, epochs=1, lr=1e-2).model.state_dict()
    ema = _train(cache, parts, epochs=1, lr=1e-2, ema=True, ema_decay=0.9999)
    ema_sd = ema.model.state_dict()
    keys = [k for k, v in init.items() if v.is_floating_point() and "running" not in k]
    moved = sum(float((ema_sd[k] - init[k]).norm()) for k in keys)
    trained = sum(float((raw[k] - init[k]).norm()) for k in keys)
    assert trained > 0
    assert moved > 0.3 * trained


@pytest.mark.slow
def test_killed_run_resumes_at_the_next_epoch(tmp_path, cache, parts):
    class Killed(Exception):
        pass

    def kill_after_two(row):
        if row["epoch"] == 2:
            raise Killed

    tr, va = parts["train"], parts["val"]
    args = (
        cache.take(tr.image_id),
        tr.label.to_numpy(),
        cache.take(va.image_id),
        va.label.to_numpy(),
    )
    cfg = tiny_config(
        epochs=4, ema=True, augment={}, sampler_power=0.5, data_path="dataloader"
    )
    with pytest.raises(Killed):
        train_model(*args, cfg, checkpoint_dir=tmp_path, on_epoch_end=kill_after_two)
    seen = []
    resumed = train_model(
        *args,
        cfg,
        checkpoint_dir=tmp_path,
        on_epoch_end=lambda r: seen.append(r["epoch"]),
    )
    assert seen == [3, 4]
    assert list(resumed.history.epoch) == [1, 2, 3, 4]
    full = train_model(*args, cfg, checkpoint_dir=tmp_path / "fresh")
    # the first two epochs are the same run; resuming restores optimizer, EMA, RNG state
    assert np.allclose(full.history.train_loss[:2], resumed.history.train_loss[:2])
    assert np.allclose(full.history.train_loss, resumed.history.train_loss, rtol=1e-4)


@pytest.mark.slow
def test_frozen_features_mode_trains_only_the_head(tmp_path, cache, parts):
    result = _train(
        cache,
        parts,
        tmp_path,
        arch="efficientnet_lite0",
        pretrained=True,
        allow_random_init=False,
        train_mode="frozen_features",
        feature_views=2,
        epochs=3,
        model_kwargs={
            "head": "multiscale",
            "head_kwargs": {"stages": [2, 3], "hidden": 32},
        },
        batch_size=16,
        lr=1e-2,
    )
    assert (tmp_path / "features.pt").is_file()
    from skin_lesion_classifier.models.factory import create_model

    pretrained = create_model(
        "efficientnet_lite0",
        pretrained=True,
        head="multiscale",
        head_kwargs={"stages": [2, 3], "hidden": 32},
    )
    assert torch.equal(
        result.model.backbone.conv_stem.weight, pretrained.backbone.conv_stem.weight
    )
    assert result.history.train_loss.iloc[-1] < result.history.train_loss.iloc[0]
    model, meta = load_model(result.checkpoint)
    assert meta["model_kwargs"]["head"] == "multiscale"


@pytest.mark.slow
def test_partial_finetune_keeps_the_stem_and_leading_stages_frozen(cache, parts):
    """frozen_stages: 2 trains stages 3+ and the head; the stem and the first two stages
    keep their ImageNet weights and BatchNorm statistics."""
    from skin_lesion_classifier.models.factory import create_model

    result = _train(
        cache,
        parts,
        arch="efficientnet_lite0",
        pretrained=True,
        allow_random_init=False,
        frozen_stages=2,
        epochs=1,
        batch_size=16,
    )
    trained = result.model.state_dict()
    start = create_model("efficientnet_lite0", pretrained=True, num_classes=7)
    start = start.state_dict()
    frozen_keys = [
        k for k in start if k.startswith(("conv_stem", "bn1", "blocks.0.", "blocks.1."))
    ]
    later_weights = [
        k for k in start if k.startswith("blocks.2.") and k.endswith("weight")
    ]
    later_stats = [
        k for k in start if k.startswith("blocks.2.") and k.endswith("running_mean")
    ]
    assert frozen_keys and later_weights and later_stats
    for k in frozen_keys:  # weights and BatchNorm buffers alike
        assert torch.equal(trained[k], start[k]), k
    assert any(not torch.equal(trained[k], start[k]) for k in later_weights)
    assert any(not torch.equal(trained[k], start[k]) for k in later_stats)
    assert result.checkpoint["meta"]["training"]["frozen_stages"] == 2


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"arch": "resnet_does_not_exist"}, "unknown architecture"),
        ({"input_size": [8, 8]}, "impossible input_size"),
        ({"arch": "test_vit", "input_size": [60, 70]}, "cannot take input_size"),
        ({"learning_rate": 0.1}, "unknown training option"),
        ({"pretrained": False, "allow_random_init": False}, "allow_random_init: true"),
        ({"scheduler": "linear"}, "scheduler must be one of"),
        ({"frozen_stages": -1}, "frozen_stages must be >= 0"),
        ({"frozen_stages": 2}, "needs train_mode: finetune and pretrained: true"),
        (
            {"arch": "efficientnet_lite0", "pretrained": True, "frozen_stages": 9},
            "frozen_stages: 9 but EfficientNet has 7 stages",
        ),
    ],
)
def test_bad_configs_fail_clearly(overrides, match):
    size = overrides.get("input_size", list(SIZE))
    images = np.zeros((4, *size, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=match):
        train_model(
            images, [0, 1, 2, 3], images, [0, 1, 2, 3], tiny_config(**overrides)
        )


def test_cache_size_mismatch_fails_clearly(cache, parts):
    images = cache.take(parts["train"].image_id)
    with pytest.raises(ValueError, match="rebuild the image cache"):
        train_model(
            images,
            parts["train"].label,
            images,
            parts["train"].label,
            tiny_config(input_size=[96, 128]),
        )


def test_image_cache_from_full_size_originals(samples_dir):
    meta = pd.read_csv(samples_dir / "HAM10000_metadata_samples.csv")
    index = pd.DataFrame(
        {
            "image_id": meta.image_id,
            "path": [str(samples_dir / "images" / f"{i}.jpg") for i in meta.image_id],
        }
    )
    cache = build_image_cache(index, (96, 128), progress=False)
    assert cache.images.shape == (21, 96, 128, 3)
    assert cache.take([meta.image_id[3]]).shape == (1, 96, 128, 3)
    with pytest.raises(KeyError, match="not in the image cache"):
        cache.take(["ISIC_none"])
