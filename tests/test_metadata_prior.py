"""The metadata prior (models/metadata_prior.py): fitted on real HAM10000 metadata, fused
into a real (tiny) image model, exactly the image model when every field is unknown."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from skin_lesion_classifier.constants import CLASS_TO_INDEX, CLASSES
from skin_lesion_classifier.models.metadata_prior import (
    PRIOR_KEY,
    attach_metadata_prior,
    choose_alpha,
    fit_metadata_prior,
    log_loss_of,
    masking_patterns,
)
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def split_rows(full_split_assignment, metadata_df) -> pd.DataFrame:
    """The project's split of all 10,015 images with their age, sex and site."""
    meta = metadata_df.set_index("image_id")[["age", "sex", "localization"]]
    return full_split_assignment.join(meta, on="image_id")


@pytest.fixture(scope="module")
def prior(split_rows):
    return fit_metadata_prior(split_rows[split_rows.split == "train"], CLASSES)


def test_every_field_unknown_gives_exactly_zero(prior):
    u = prior.encoder.unknown_vector()[None]
    np.testing.assert_array_equal(prior.log_ratio(u), np.zeros((1, len(CLASSES))))
    p = np.full((1, len(CLASSES)), 1 / len(CLASSES))
    np.testing.assert_allclose(prior.fuse(p, u, alpha=1.0), p)


def test_prior_learns_what_the_metadata_says(prior):
    """Dermatology the regression must find in the training rows: an older patient
    raises carcinoma (bcc, akiec) against nevus, a face site raises akiec and bkl against
    nevus, a lesion on the acral skin (acral melanoma, ...) is not a nevus by default."""
    enc = prior.encoder

    def ratio(**fields):
        return prior.log_ratio(enc.transform_one(**fields))[0]

    old, young = ratio(age=75), ratio(age=30)
    nv, bcc, akiec = (CLASS_TO_INDEX[c] for c in ("nv", "bcc", "akiec"))
    assert old[bcc] - old[nv] > young[bcc] - young[nv] + 1.0
    assert old[akiec] - old[nv] > young[akiec] - young[nv] + 1.0
    face = ratio(localization="face")
    assert face[akiec] > face[nv] and face[CLASS_TO_INDEX["bkl"]] > face[nv]
    # the fields are combined: age and site together move further than age alone
    both = ratio(age=75, localization="face")
    assert both[akiec] - both[nv] > old[akiec] - old[nv]


def test_masking_patterns_cover_every_mix_of_known_fields(prior, split_rows):
    enc = prior.encoder
    x = enc.transform(split_rows.head(5))
    patterns = masking_patterns(x, enc)
    assert patterns.shape == (8 * 5, enc.dim)
    np.testing.assert_array_equal(patterns[:5], x)  # nothing masked
    u = enc.unknown_vector()
    np.testing.assert_array_equal(patterns[-5:], np.tile(u, (5, 1)))  # all masked


def test_choose_alpha_on_validation(prior, split_rows):
    """With an uninformative image model the metadata is all there is: validation picks a
    weight above 0; with the validation metadata shuffled across patients it picks 0."""
    val = split_rows[split_rows.split == "val"]
    y = val["label"].to_numpy()
    p = np.full((len(val), len(CLASSES)), 1 / len(CLASSES))
    e = prior.encoder.transform(val)
    alpha, losses = choose_alpha(prior, p, e, y, [0.0, 0.5, 1.0])
    assert alpha > 0 and losses[alpha] < losses[0.0] - 0.05
    shuffled = e[np.random.default_rng(0).permutation(len(e))]
    alpha, losses = choose_alpha(prior, p, shuffled, y, [0.0, 0.5, 1.0])
    assert alpha == 0.0
    assert losses[0.0] == pytest.approx(log_loss_of(p, y)) == pytest.approx(np.log(7))


def test_fused_model_is_the_image_model_plus_the_prior(prior, split_rows):
    model, meta = tiny_model(metrics={"val_balanced_accuracy": 0.5})
    model.eval()
    fused, fused_meta = attach_metadata_prior(model, meta, prior, alpha=0.5)
    images = torch.rand(4, 3, 48, 64)
    rows = split_rows[split_rows.split == "val"].head(4)
    e = prior.encoder.transform(rows)
    u = np.tile(prior.encoder.unknown_vector(), (4, 1))
    with torch.no_grad():
        z_image = model(images)
        z_known = fused(images, torch.as_tensor(e))
        z_unknown = fused(images, torch.as_tensor(u))
    torch.testing.assert_close(z_unknown, z_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        z_known - z_image,
        torch.as_tensor(0.5 * prior.log_ratio(e), dtype=torch.float32),
        atol=1e-4,
        rtol=0,
    )
    assert fused_meta["uses_metadata"] is True
    assert fused_meta["metrics"] == {"val_balanced_accuracy": 0.5}
    assert fused_meta[PRIOR_KEY]["alpha"] == 0.5


def test_fused_checkpoint_round_trips_and_serves_without_metadata(prior, split_rows):
    from skin_lesion_classifier.inference.predictor import TorchPredictor
    from skin_lesion_classifier.models.checkpoint import make_checkpoint

    model, meta = tiny_model()
    fused, fused_meta = attach_metadata_prior(model, meta, prior, alpha=1.0)
    image_p = TorchPredictor.from_checkpoint(make_checkpoint(model, meta))
    fused_p = TorchPredictor.from_checkpoint(make_checkpoint(fused, fused_meta))
    assert fused_p.uses_metadata and not image_p.uses_metadata
    images = np.random.default_rng(0).integers(0, 255, (3, 48, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        fused_p.predict(images), image_p.predict(images), atol=1e-5
    )
    patient = {"age": 80, "sex": "male", "localization": "face"}
    with_meta = fused_p.predict(images, patient)
    expected = prior.fuse(
        image_p.predict(images),
        np.tile(prior.encoder.transform_one(**patient), (3, 1)),
        1.0,
    )
    np.testing.assert_allclose(with_meta, expected, atol=1e-4)


def test_bad_training_rows_are_named(split_rows):
    train = split_rows[split_rows.split == "train"]
    with pytest.raises(ValueError, match="missing \\['localization'\\]"):
        fit_metadata_prior(train.drop(columns="localization"), CLASSES)
    bad = train.copy()
    bad.loc[bad.index[0], "label"] = 9
    with pytest.raises(ValueError, match="class indices"):
        fit_metadata_prior(bad, CLASSES)
    without_df = fit_metadata_prior(train[train.dx != "df"], CLASSES)
    assert not without_df.coef[CLASS_TO_INDEX["df"]].any()
    assert without_df.coef[CLASS_TO_INDEX["nv"]].any()
    with pytest.raises(ValueError, match="at least 2 classes; got \\['nv'\\]"):
        fit_metadata_prior(train[train.dx == "nv"], CLASSES)
    two = fit_metadata_prior(train[train.dx.isin(["nv", "mel"])], CLASSES)
    old = two.log_ratio(two.encoder.transform_one(age=80))[0]
    assert old[CLASS_TO_INDEX["mel"]] > old[CLASS_TO_INDEX["nv"]]
    with pytest.raises(ValueError, match="impossible|age|sex"):
        weird = train.copy()
        weird["sex"] = weird["sex"].astype(object)
        weird.loc[weird.index[0], "sex"] = "robot"
        fit_metadata_prior(weird, CLASSES)


@pytest.fixture(scope="module")
def small_cache(small_split):
    from skin_lesion_classifier.data.cache import build_image_cache

    return build_image_cache(small_split, (48, 64), num_workers=1, progress=False)


def _node_params(**prior):
    return {
        "metadata_prior": {"enabled": True, "C": 1.0, "min_site_count": 1, **prior},
        "train": {"device": "cpu", "eval_batch_size": 16},
    }


def test_training_node_fuses_the_prior_chosen_on_validation(small_split, small_cache):
    from skin_lesion_classifier.models.checkpoint import make_checkpoint
    from skin_lesion_classifier.pipelines.training.nodes import add_metadata_prior

    image_ckpt = make_checkpoint(*tiny_model())
    split = small_split.drop(columns=["age", "sex", "localization"])
    args = (image_ckpt, small_cache, split, small_split)
    off = add_metadata_prior(*args, {"metadata_prior": {"enabled": False}})
    assert off is image_ckpt
    fixed = add_metadata_prior(*args, _node_params(alpha=1.0))
    assert fixed["meta"]["uses_metadata"] and fixed["meta"][PRIOR_KEY]["alpha"] == 1.0
    chosen = add_metadata_prior(*args, _node_params(alpha=[0.0, 0.5, 2.0]))
    if chosen is image_ckpt:  # validation chose alpha 0: the image model, unchanged
        return
    losses = chosen["meta"][PRIOR_KEY]["val_log_loss"]
    best = min(losses, key=losses.get)
    assert chosen["meta"][PRIOR_KEY]["alpha"] == float(best) > 0
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        add_metadata_prior(*args, _node_params(alpha=[-1.0]))


def test_evaluation_scores_a_metadata_model_with_the_metadata_withheld(
    prior, small_split, project_root
):
    import yaml

    from skin_lesion_classifier.models.checkpoint import make_checkpoint
    from skin_lesion_classifier.pipelines.evaluation import nodes as ev
    from skin_lesion_classifier.reporting.sections import headline_section

    model, meta = tiny_model()
    image_ckpt = make_checkpoint(model, meta)
    fused_ckpt = make_checkpoint(*attach_metadata_prior(model, meta, prior, 1.0))
    params = yaml.safe_load(
        (project_root / "conf/base/parameters_evaluation.yml").read_text()
    )["evaluation"]
    params.update(device="cpu", tta=False)
    params["bootstrap"]["n_boot"] = 50
    split = small_split.drop(columns=["path", "age", "sex", "localization"])
    frames = {}
    for name, ckpt in (("image", image_ckpt), ("fused", fused_ckpt)):
        val = ev.predict_validation(ckpt, split, small_split, params)
        test = ev.predict_test(ckpt, split, small_split, params)
        val_w = ev.predict_validation_withheld(ckpt, split, small_split, val, params)
        test_w = ev.predict_test_withheld(ckpt, split, small_split, test, params)
        frames[name] = (val, test, val_w, test_w)
    val, test, val_w, test_w = frames["fused"]
    image_val, image_test, *_ = frames["image"]
    assert frames["image"][2] is image_val  # an image model is not predicted twice
    cols = [f"prob_{c}" for c in CLASSES]
    # withheld = the image model, exactly; with metadata the answers move
    np.testing.assert_allclose(val_w[cols], image_val[cols], atol=1e-5)
    np.testing.assert_allclose(test_w[cols], image_test[cols], atol=1e-5)
    assert np.abs(val[cols].to_numpy() - image_val[cols].to_numpy()).max() > 0.01
    rule = ev.choose_rule(val, fused_ckpt, split, params)
    metrics, logged = ev.compute_metrics(
        val, test, rule, fused_ckpt, split, params, val_w, test_w
    )
    withheld = metrics["metadata_withheld"]
    image_metrics, _ = ev.compute_metrics(
        image_val, image_test, rule, image_ckpt, split, params, image_val, image_test
    )
    assert "metadata_withheld" not in image_metrics
    assert withheld["splits"]["test"]["argmax"]["macro_auc"] == pytest.approx(
        image_metrics["splits"]["test"]["argmax"]["macro_auc"]
    )
    assert logged["test_withheld_macro_auc"]["value"] == pytest.approx(
        withheld["splits"]["test"]["argmax"]["macro_auc"]
    )
    text = "\n".join(headline_section(metrics))
    assert "metadata withheld" in text and "every field unknown" in text
    from skin_lesion_classifier.show_results import headline_table

    table = headline_table(metrics)
    assert table.columns[-1].header == "metadata withheld"
    assert table.row_count == len(metrics["headline"])
    assert headline_table(image_metrics).columns[-1].header != "metadata withheld"
