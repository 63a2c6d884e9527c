"""Model factory, offline EfficientNet-Lite weights and checkpoints, on real images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.images import load_resized, resize_rgb
from skin_lesion_classifier.data.transforms import to_float_nchw
from skin_lesion_classifier.models.checkpoint import load_model, save_checkpoint
from skin_lesion_classifier.models.factory import (
    MODEL_ALIASES,
    PretrainedWeightsUnavailable,
    create_model,
    resolve_arch,
    resolve_preprocessing,
)
from skin_lesion_classifier.models.offline_weights import (
    convert_lite_state_dict,
    lite_weights_path,
)


@pytest.fixture(scope="module")
def sample_images(samples_dir: Path) -> np.ndarray:
    """The 21 full-size 600x450 originals resized to 224x224 uint8."""
    files = sorted((samples_dir / "images").glob("*.jpg"))
    assert len(files) == 21
    return np.stack([load_resized(f, (224, 224)) for f in files])


def test_aliases_resolve_to_timm_models():
    assert resolve_arch("resnet50_attention")[0] == "seresnet50"
    assert resolve_preprocessing("efficientnet_lite0")["mean"] == [0.5, 0.5, 0.5]
    assert resolve_arch("vit_small")[0] == "vit_small_patch16_224"
    assert resolve_arch("swin_tiny")[0] == "swin_tiny_patch4_window7_224"
    assert resolve_arch("efficientnet_b0") == ("efficientnet_b0", {})
    for name in MODEL_ALIASES:
        resolve_arch(name)


def test_cbam_alias_builds_attention_blocks():
    model = create_model("resnet50_cbam", num_classes=7, pretrained=False)
    names = {type(m).__name__ for m in model.modules()}
    assert "CbamModule" in names
    assert model.get_classifier().out_features == 7


def test_unknown_architecture_lists_close_names():
    with pytest.raises(
        ValueError, match="unknown architecture 'efficientnet_b9'"
    ) as info:
        create_model("efficientnet_b9")
    assert "efficientnet_b1" in str(info.value)


@pytest.mark.parametrize(
    ("arch", "size", "match"),
    [
        ("test_efficientnet", (0, 64), "impossible input_size"),
        ("test_efficientnet", (16, 16), "impossible input_size"),
        ("test_efficientnet", (64,), r"input_size must be \[H, W\]"),
        ("test_vit", (100, 130), "cannot take input_size"),
    ],
)
def test_impossible_input_size_fails_clearly(arch, size, match):
    with pytest.raises(ValueError, match=match):
        create_model(arch, input_size=size)


def test_vit_takes_a_non_square_input():
    model = create_model("test_vit", input_size=(64, 96))
    out = model(torch.zeros(2, 3, 64, 96))
    assert out.shape == (2, len(CLASSES))


@pytest.mark.parametrize(
    "arch", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
)
def test_offline_lite_weights_map_every_key(arch):
    import timm

    source = torch.load(lite_weights_path(arch), map_location="cpu", weights_only=True)
    model = timm.create_model(
        arch, pretrained=False
    )  # 1000-class head: every key must map
    converted = convert_lite_state_dict(source, model)
    assert len(converted) == len(source) == len(model.state_dict())
    target = model.state_dict()
    for key, value in converted.items():
        assert target[key].shape == value.shape, key
    assert torch.equal(converted["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(converted["classifier.bias"], source["_fc.bias"])


def test_offline_lite_weights_give_imagenet_predictions(sample_images):
    """With the packaged weights and a 1000-class head, ImageNet predictions on real
    dermoscopy images are confident (random weights give near-uniform output) and the
    stem's per-channel variances follow the BN running variances it was trained with."""
    mean = resolve_preprocessing("tf_efficientnet_lite0")["mean"]
    std = resolve_preprocessing("tf_efficientnet_lite0")["std"]
    assert mean == [0.5, 0.5, 0.5] and std == [0.5, 0.5, 0.5]
    x = to_float_nchw(sample_images, mean, std)
    pre = create_model(
        "tf_efficientnet_lite0", num_classes=1000, pretrained=True
    ).eval()
    rnd = create_model(
        "tf_efficientnet_lite0", num_classes=1000, pretrained=False
    ).eval()
    with torch.no_grad():
        p_pre = pre(x).softmax(1)
        p_rnd = rnd(x).softmax(1)
        stem = pre.conv_stem(x)
    entropy = lambda p: float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())  # noqa: E731
    assert entropy(p_pre) < 0.6 * math.log(1000)
    assert entropy(p_rnd) > 0.8 * math.log(1000)
    assert float(p_pre.max(1).values.mean()) > 0.1
    batch_var = stem.var(dim=(0, 2, 3))
    corr = np.corrcoef(batch_var.numpy(), pre.bn1.running_var.numpy())[0, 1]
    assert corr > 0.9


def test_pretrained_lite_with_7_classes_keeps_backbone():
    model = create_model("efficientnet_lite0", num_classes=7, pretrained=True)
    assert resolve_preprocessing(model)["std"] == [0.5, 0.5, 0.5]
    source = torch.load(lite_weights_path("tf_efficientnet_lite0"), weights_only=True)
    assert torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])
    assert model.get_classifier().out_features == 7


def test_hub_only_architecture_fails_clearly_offline(monkeypatch):
    from skin_lesion_classifier.models import factory

    monkeypatch.setattr(factory, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(PretrainedWeightsUnavailable, match="allow_random_init: true"):
        create_model("resnet10t", pretrained=True)
    model = create_model("resnet10t", pretrained=True, allow_random_init=True)
    assert model.get_classifier().out_features == 7


def test_metadata_fusion_with_unknown_builder_fails_clearly():
    with pytest.raises(
        NotImplementedError, match="metadata-fusion head 'no_such_fusion'"
    ):
        create_model("test_efficientnet", metadata_dim=10, fusion="no_such_fusion")


def test_multiscale_head_concatenates_stage_features(sample_images):
    model = create_model(
        "efficientnet_lite0",
        pretrained=True,
        head="multiscale",
        head_kwargs={"stages": [2, 3], "hidden": 32},
        input_size=(64, 64),
    ).eval()
    assert model.num_features == 40 + 112 + 1280
    x = to_float_nchw(sample_images[:3, ::4, ::4][:, :64, :64], [0.5] * 3, [0.5] * 3)
    with torch.no_grad():
        assert model.features(x).shape == (3, model.num_features)
        assert model(x).shape == (3, len(CLASSES))
    spread = create_model(
        "efficientnet_lite0",
        head="multiscale",
        head_kwargs={"stages": [1, 4], "pool": "avgstd", "hidden": 0},
    ).eval()
    assert spread.num_features == 2 * (24 + 320) + 1280
    with torch.no_grad():
        assert spread.features(x).shape == (3, spread.num_features)
    with pytest.raises(ValueError, match="unknown head"):
        create_model("test_efficientnet", head="nope")


def test_checkpoint_roundtrip_gives_identical_outputs(tmp_path, sample_images):
    torch.manual_seed(0)
    model = create_model("test_efficientnet", input_size=(48, 64)).eval()
    prep = resolve_preprocessing(model)
    meta = {
        "arch": "test_efficientnet",
        "model_kwargs": {},
        "classes": list(CLASSES),
        "input_size": [48, 64],
        "mean": prep["mean"],
        "std": prep["std"],
        "uses_metadata": False,
        "train_class_counts": np.array([1, 2, 3, 4, 5, 6, 7]),
    }
    path = save_checkpoint(tmp_path / "m.pt", model, meta)
    images = np.stack(
        [resize_rgb(Image.fromarray(img), (48, 64)) for img in sample_images[:4]]
    )
    x = to_float_nchw(images, prep["mean"], prep["std"])
    loaded, loaded_meta = load_model(path)
    assert not loaded.training
    assert loaded_meta["train_class_counts"] == [1, 2, 3, 4, 5, 6, 7]
    assert loaded_meta["classes"] == list(CLASSES)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_load_model_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_model(bad)
    with pytest.raises(ValueError, match="lacks"):
        save_checkpoint(
            tmp_path / "x.pt", create_model("test_efficientnet"), {"arch": "x"}
        )


def test_new_head_starts_near_uniform_on_real_images(sample_images):
    """A pretrained backbone with a new 7-class head starts at the neutral loss ln(7) on
    real dermoscopy images; timm's own fan-out initialisation of that head starts far above
    it (the confidently wrong start that a fine-tune otherwise has to undo)."""
    from timm.models._efficientnet_builder import _init_weight_goog

    labels = torch.arange(len(sample_images)) // 3  # 3 images per class, in class order
    x = to_float_nchw(sample_images[:, ::2, ::2], [0.5] * 3, [0.5] * 3)
    for kwargs in ({}, {"head": "multiscale", "head_kwargs": {"stages": [2, 3]}}):
        model = create_model("efficientnet_lite0", pretrained=True, **kwargs).eval()
        assert float(model.get_classifier().weight.detach().abs().max()) <= 0.02
        assert float(model.get_classifier().bias.detach().abs().max()) == 0.0
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        assert abs(float(loss) - math.log(len(CLASSES))) < 0.1, kwargs
    model = create_model("efficientnet_lite0", pretrained=True).eval()
    _init_weight_goog(
        model.get_classifier(), n="classifier"
    )  # timm's fan-out U(+-1/sqrt(7))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), labels)
    assert float(loss) > math.log(len(CLASSES)) + 0.5


def test_fusion_heads_start_near_zero():
    model = create_model("efficientnet_lite0", pretrained=True, metadata_dim=5)
    for layer in (model.image_head[1], model.metadata_head):
        assert float(layer.weight.detach().abs().max()) <= 0.02
        assert float(layer.bias.detach().abs().max()) == 0.0
