"""Metadata encoder and metadata-fusion model on real HAM10000 rows and images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.images import load_resized
from skin_lesion_classifier.data.metadata_features import (
    OTHER_SITE,
    MetadataEncoder,
    with_metadata,
)
from skin_lesion_classifier.inference.predict import predict_proba
from skin_lesion_classifier.models.checkpoint import load_model, make_checkpoint
from skin_lesion_classifier.models.factory import create_model
from skin_lesion_classifier.models.fusion import MetadataFusionModel
from tests.conftest import fusion_params, train_params


@pytest.fixture(scope="module")
def awkward_rows(metadata_df: pd.DataFrame) -> pd.DataFrame:
    """Real rows with unknown sex, blank age, unknown site, and ordinary ones."""
    unknown_sex = metadata_df[metadata_df.sex == "unknown"].head(3)
    blank_age = metadata_df[metadata_df.age.isna()].head(3)
    unknown_site = metadata_df[metadata_df.localization == "unknown"].head(2)
    plain = metadata_df[metadata_df.age.notna() & (metadata_df.sex != "unknown")].head(
        4
    )
    return pd.concat([unknown_sex, blank_age, unknown_site, plain], ignore_index=True)


def test_encoder_handles_unknown_sex_and_blank_age(metadata_df, awkward_rows):
    train = metadata_df.sample(2000, random_state=0)
    enc = MetadataEncoder.fit(train, min_site_count=10)
    x = enc.transform(awkward_rows)
    names = enc.feature_names
    assert x.shape == (len(awkward_rows), enc.dim)
    assert np.isfinite(x).all()
    col = {n: i for i, n in enumerate(names)}
    blank = awkward_rows.age.isna().to_numpy()
    assert blank.any() and (~blank).any()
    # blank age: z = 0 and the missing flag set; known age: flag clear, z standardised
    np.testing.assert_array_equal(x[blank, col["age_missing"]], 1.0)
    np.testing.assert_array_equal(x[blank, col["age_z"]], 0.0)
    np.testing.assert_array_equal(x[~blank, col["age_missing"]], 0.0)
    known_train = train.age.dropna()
    expected = (awkward_rows.age[~blank] - known_train.mean()) / known_train.std(ddof=0)
    np.testing.assert_allclose(x[~blank, col["age_z"]], expected, rtol=1e-5)
    # unknown sex is a category of its own, exactly one sex column per row
    sex_cols = [col[f"sex_{s}"] for s in ("female", "male", "unknown")]
    np.testing.assert_array_equal(x[:, sex_cols].sum(axis=1), 1.0)
    unknown = (awkward_rows.sex == "unknown").to_numpy()
    np.testing.assert_array_equal(x[unknown, col["sex_unknown"]], 1.0)
    np.testing.assert_array_equal(x[~unknown, col["sex_unknown"]], 0.0)
    # exactly one site column per row; unknown site goes to site_unknown
    site_cols = [i for n, i in col.items() if n.startswith("site_")]
    np.testing.assert_array_equal(x[:, site_cols].sum(axis=1), 1.0)
    unk_site = (awkward_rows.localization == "unknown").to_numpy()
    np.testing.assert_array_equal(x[unk_site, col["site_unknown"]], 1.0)
    summary = enc.missing_summary(awkward_rows)
    assert summary["age_missing"] == int(blank.sum())
    assert summary["sex_unknown"] == int(unknown.sum())


def test_encoder_fits_on_train_only_and_round_trips(metadata_df):
    train = metadata_df[metadata_df.localization != "acral"].sample(
        3000, random_state=1
    )
    enc = MetadataEncoder.fit(train, min_site_count=10)
    assert "acral" not in enc.sites  # never seen in training
    acral = metadata_df[metadata_df.localization == "acral"].head(2)
    x = enc.transform(acral)
    assert (x[:, enc.feature_names.index(f"site_{OTHER_SITE}")] == 1).all()
    # the age statistics are the training rows', not the whole set's
    assert enc.age_mean == pytest.approx(train.age.mean())
    again = MetadataEncoder.from_dict(enc.to_dict())
    rows = metadata_df.sample(50, random_state=2)
    np.testing.assert_array_equal(again.transform(rows), enc.transform(rows))
    one = enc.transform_one(age=None, sex=None, localization="back")
    assert one[0, enc.feature_names.index("age_missing")] == 1
    assert one[0, enc.feature_names.index("sex_unknown")] == 1


def test_field_masking_replaces_whole_fields_by_unknown(metadata_df):
    """Training-time field masking: a masked field is exactly the 'unknown' encoding the
    model will see for a picture without metadata; the other fields stay as they were."""
    enc = MetadataEncoder.fit(metadata_df, min_site_count=10)
    x = torch.as_tensor(enc.transform(metadata_df.head(2000)))
    unknown = torch.as_tensor(enc.unknown_vector())
    assert torch.equal(enc.mask_fields(x, 0.0), x)
    assert torch.equal(enc.mask_fields(x, 1.0), unknown.expand_as(x))
    masked = enc.mask_fields(x, 0.5, torch.Generator().manual_seed(0))
    changed = {}
    for field, sl in enc.field_slices().items():
        is_unknown = (masked[:, sl] == unknown[sl]).all(1)
        kept = (masked[:, sl] == x[:, sl]).all(1)
        assert bool((is_unknown | kept).all()), (
            field
        )  # a field is masked whole or not at all
        changed[field] = float((~kept).float().mean())
    # fields that were known get masked about half the time, independently of each other
    assert 0.3 < changed["localization"] < 0.6 and 0.3 < changed["sex"] < 0.6
    with pytest.raises(ValueError, match="masking probability"):
        enc.mask_fields(x, 1.5)


def test_encoder_rejects_bad_values_naming_the_rows(metadata_df):
    enc = MetadataEncoder.fit(metadata_df.head(500))
    bad = metadata_df.head(3).copy()
    bad.loc[1, "sex"] = "yes"
    with pytest.raises(ValueError, match=bad.loc[1, "image_id"]):
        enc.transform(bad)
    bad = metadata_df.head(3).copy().astype({"age": object})
    bad.loc[2, "age"] = "fifty"
    with pytest.raises(ValueError, match="non-numeric"):
        enc.transform(bad)
    with pytest.raises(ValueError, match="lacks column"):
        enc.transform(metadata_df[["image_id", "age"]])


def test_with_metadata_joins_by_image_id(small_split, metadata_df):
    rows = small_split[["image_id", "lesion_id", "split"]].iloc[::-1]
    joined = with_metadata(rows, metadata_df)
    ref = metadata_df.set_index("image_id").loc[joined.image_id]
    assert joined.sex.tolist() == ref.sex.tolist()
    with pytest.raises(ValueError, match="not in image_index"):
        with_metadata(pd.DataFrame({"image_id": ["ISIC_nope"]}), metadata_df)


@pytest.mark.slow
def test_fusion_model_trains_and_round_trips_through_checkpoint(small_split):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train = small_split[small_split.split == "train"]
    enc = MetadataEncoder.fit(train, min_site_count=1)
    size = (48, 64)
    images = np.stack([load_resized(p, size) for p in small_split.path])
    meta_x = enc.transform(small_split)
    model = create_model(
        "test_efficientnet",
        metadata_dim=enc.dim,
        input_size=size,
        fusion_kwargs={"hidden": [16], "metadata_dropout": 0.1},
    )
    assert isinstance(model, MetadataFusionModel)
    mean, std = [0.5] * 3, [0.25] * 3
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    m = torch.from_numpy(meta_x)
    y = torch.tensor(small_split.label.to_numpy().copy())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x, m), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    # the metadata branch changes the output: same image, other metadata
    model.eval()
    with torch.no_grad():
        a = model(x[:4], m[:4])
        b = model(x[:4], torch.flip(m[:4], dims=[0]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="model\\(images, metadata\\)"):
        model(x[:2])
    meta = {
        "arch": "test_efficientnet",
        "model_kwargs": {
            "metadata_dim": enc.dim,
            "fusion_kwargs": {"hidden": [16], "metadata_dropout": 0.1},
        },
        "classes": list(CLASSES),
        "input_size": list(size),
        "mean": mean,
        "std": std,
        "uses_metadata": True,
        "metadata_encoder": enc.to_dict(),
    }
    loaded, meta2 = load_model(make_checkpoint(model, meta))
    enc2 = MetadataEncoder.from_dict(meta2["metadata_encoder"])
    p1 = predict_proba(model, images, mean, std, extra_inputs=meta_x)
    p2 = predict_proba(
        loaded, images, mean, std, extra_inputs=enc2.transform(small_split)
    )
    np.testing.assert_allclose(p1, p2, atol=1e-5)
    assert p1.shape == (len(small_split), len(CLASSES))


def _tiny_trained_model(small_split, size=(48, 64)):
    """A tiny image-only model trained for two epochs by the project's training loop."""
    from skin_lesion_classifier.training.engine import train_model

    tr = small_split[small_split.split == "train"]
    va = small_split[small_split.split == "val"]
    load = lambda rows: np.stack([load_resized(p, size) for p in rows.path])  # noqa: E731
    result = train_model(
        load(tr),
        tr.label.to_numpy(),
        load(va),
        va.label.to_numpy(),
        train_params(
            arch="test_efficientnet",
            pretrained=False,
            allow_random_init=True,
            input_size=list(size),
            epochs=2,
            batch_size=16,
            eval_batch_size=32,
            ema=False,
            progress=False,
            device="cpu",
            amp="off",
            channels_last=False,
            lr=3e-3,
            num_workers=0,
        ),
        device="cpu",
    )
    return result, load


@pytest.mark.slow
def test_second_stage_fusion_starts_at_the_image_model_and_trains(small_split):
    from skin_lesion_classifier.models.fusion import fusion_from_image_model
    from skin_lesion_classifier.training.fusion import train_fusion_head

    torch.manual_seed(0)
    torch.set_num_threads(1)
    base, load = _tiny_trained_model(small_split)
    meta = base.checkpoint["meta"]
    tr = small_split[small_split.split == "train"].reset_index(drop=True)
    va = small_split[small_split.split == "val"].reset_index(drop=True)
    x_va = load(va)
    p_base = predict_proba(base.model, x_va, meta["mean"], meta["std"])
    # zero-initialised metadata branch: the fused model predicts what the base predicts
    enc = MetadataEncoder.fit(tr, min_site_count=1)
    fused0, meta0 = fusion_from_image_model(base.model, meta, enc.dim)
    p0 = predict_proba(
        fused0, x_va, meta["mean"], meta["std"], extra_inputs=enc.transform(va)
    )
    np.testing.assert_allclose(p0, p_base, atol=1e-5)
    assert meta0["uses_metadata"] and meta0["model_kwargs"]["metadata_dim"] == enc.dim

    cfg = fusion_params(
        hidden=[16],
        epochs=6,
        batch_size=8,
        feature_views=2,
        min_site_count=1,
        lr=1e-2,
        patience=6,
    )
    x_tr = load(tr)
    fusion = train_fusion_head(base.model, meta, x_tr, tr, x_va, va, cfg)
    control = train_fusion_head(
        base.model, meta, x_tr, tr, x_va, va, cfg, use_metadata=False
    )
    assert control.checkpoint is None and fusion.checkpoint is not None
    assert 1 <= fusion.best_epoch <= 6 and len(fusion.history) >= fusion.best_epoch
    assert fusion.history.val_balanced_accuracy.max() == pytest.approx(
        fusion.history.set_index("epoch").loc[
            fusion.best_epoch, "val_balanced_accuracy"
        ]
    )
    # the saved fusion model reproduces its validation probabilities after a reload
    loaded, meta2 = load_model(fusion.checkpoint)
    enc2 = MetadataEncoder.from_dict(meta2["metadata_encoder"])
    assert enc2.age_mean == pytest.approx(tr.age.mean())  # fitted on train rows only
    p = predict_proba(
        loaded, x_va, meta2["mean"], meta2["std"], extra_inputs=enc2.transform(va)
    )
    np.testing.assert_allclose(p, fusion.val_proba, atol=1e-4)
    # the backbone is frozen: its weights equal the base model's
    base_sd = base.model.state_dict()
    for k, v in loaded.backbone.state_dict().items():
        torch.testing.assert_close(v, base_sd[k])
