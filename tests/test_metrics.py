"""Evaluation engine: every metric on a hand-made set of predictions with hand-computed
values, agreement with scikit-learn (the ISIC definitions), the one-class model, absent
classes, decision rules and the lesion bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from skin_lesion_classifier.constants import CLASSES, MELANOMA_INDEX
from skin_lesion_classifier.evaluation import bootstrap, calibration, clinical, decision
from skin_lesion_classifier.evaluation import metrics as M

# ---------------------------------------------------------------------------------------
# A hand-made 3-class example (class 2 plays "melanoma" in the clinical tests).
#
#   row  y  probabilities     arg-max
#    0   0  .7  .2  .1        0
#    1   0  .6  .3  .1        0
#    2   0  .3  .5  .2        1
#    3   1  .1  .8  .1        1
#    4   1  .2  .3  .5        2
#    5   2  .1  .1  .8        2
#    6   2  .2  .2  .6        2
#    7   2  .5  .1  .4        0
#
# Confusion matrix (rows truth, columns decision):
#   [[2, 1, 0],
#    [0, 1, 1],
#    [1, 0, 2]]
# ---------------------------------------------------------------------------------------
Y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
P = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.6, 0.3, 0.1],
        [0.3, 0.5, 0.2],
        [0.1, 0.8, 0.1],
        [0.2, 0.3, 0.5],
        [0.1, 0.1, 0.8],
        [0.2, 0.2, 0.6],
        [0.5, 0.1, 0.4],
    ]
)
K = 3
D = P.argmax(axis=1)


def test_hand_example_decisions_are_as_written():
    assert D.tolist() == [0, 0, 1, 1, 2, 2, 2, 0]
    assert M.confusion_matrix(Y, D, K).tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]


def test_hand_example_multiclass_metrics():
    # accuracy = (2 + 1 + 2) / 8
    assert M.accuracy(Y, D, K) == pytest.approx(5 / 8)
    # recall = 2/3, 1/2, 2/3  ->  BA = (2/3 + 1/2 + 2/3) / 3 = 11/18
    assert M.recall_per_class(Y, D, K) == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert M.balanced_accuracy(Y, D, K) == pytest.approx(11 / 18)
    assert M.average_sensitivity(Y, D, K) == pytest.approx(11 / 18)
    # specificity: class 0 TN=4 FP=1 -> 4/5; class 1 TN=5 FP=1 -> 5/6; class 2 TN=4 FP=1
    # -> 4/5; average = (4/5 + 5/6 + 4/5) / 3 = 73/90
    assert M.specificity_per_class(Y, D, K) == pytest.approx([4 / 5, 5 / 6, 4 / 5])
    assert M.average_specificity(Y, D, K) == pytest.approx(73 / 90)


def test_hand_example_per_class_table():
    t = M.per_class_table(Y, D, P, classes=("a", "b", "c")).set_index("class")
    # precision = TP / column sum: 2/3, 1/2, 2/3
    assert t["precision"].tolist() == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    # F1 = 2TP / (2TP + FP + FN): 4/6, 2/4, 4/6
    assert t["f1"].tolist() == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert t["support"].tolist() == [3, 2, 3]
    assert t[["tp", "fp", "fn", "tn"]].loc["b"].tolist() == [1, 1, 1, 5]


def test_hand_example_auc():
    # class 0: positives .7 .6 .3 vs negatives .1 .2 .1 .2 .5: 5 + 5 + 4 wins of 15 pairs
    # class 1: positives .8 .3 vs negatives .2 .3 .5 .1 .2 .1: 6 + (4 + 0.5 tie) of 12
    # class 2: positives .8 .6 .4 vs negatives .1 .1 .2 .1 .5: 5 + 5 + 4 of 15
    assert M.roc_auc_per_class(Y, P, K) == pytest.approx([14 / 15, 10.5 / 12, 14 / 15])
    # macro = (14/15 + 7/8 + 14/15) / 3 = 329/360
    assert M.macro_roc_auc(Y, P, K) == pytest.approx(329 / 360)


def test_hand_example_log_loss():
    # -(1/8) * sum log p(true class)
    expected = -sum(map(math.log, [0.7, 0.6, 0.3, 0.8, 0.3, 0.8, 0.6, 0.4])) / 8
    assert M.log_loss(Y, P, K) == pytest.approx(expected)


def test_hand_example_calibration():
    # 3 bins: (0, 1/3], (1/3, 2/3], (2/3, 1]
    # bin 2: rows 1 2 4 6 7, conf .6 .5 .5 .6 .5 (mean .54), correct 1 0 0 1 0 (acc .4)
    # bin 3: rows 0 3 5, conf .7 .8 .8 (mean 2.3/3), all correct (acc 1)
    curve = calibration.reliability_curve(Y, P, n_bins=3)
    assert curve["count"].tolist() == [0, 5, 3]
    assert curve["confidence"].iloc[1] == pytest.approx(0.54)
    assert curve["accuracy"].tolist()[1:] == pytest.approx([0.4, 1.0])
    # ECE = 5/8 * |.4 - .54| + 3/8 * |1 - 2.3/3| = 0.0875 + 0.0875
    assert calibration.expected_calibration_error(Y, P, n_bins=3) == pytest.approx(
        0.175
    )
    assert calibration.maximum_calibration_error(Y, P, n_bins=3) == pytest.approx(
        1 - 2.3 / 3
    )


def test_hand_example_melanoma_metrics():
    # "melanoma" = class 2: positives rows 5 6 7; p_mel = .1 .1 .2 .1 .5 .8 .6 .4
    m = clinical.melanoma_metrics(Y, P, threshold=0.4, melanoma_index=2)
    # arg-max flags rows 4 5 6: TP=2 (5, 6), FP=1 (4), FN=1 (7), TN=4
    assert m["argmax"]["sensitivity"] == pytest.approx(2 / 3)
    assert m["argmax"]["specificity"] == pytest.approx(4 / 5)
    assert m["argmax"]["nne"] == pytest.approx(3 / 2)  # (TP + FP) / TP
    # p_mel >= .4 flags rows 4 5 6 7: TP=3, FP=1 -> sens 1, spec 4/5, NNE 4/3
    assert m["threshold"]["sensitivity"] == pytest.approx(1.0)
    assert m["threshold"]["specificity"] == pytest.approx(4 / 5)
    assert m["threshold"]["nne"] == pytest.approx(4 / 3)
    assert m["auc"] == pytest.approx(14 / 15)
    # 90% sensitivity needs all 3 positives: threshold .4 -> spec 4/5
    s90 = m["specificity_at_sensitivity"]["0.90"]
    assert (s90["threshold"], s90["specificity"]) == pytest.approx((0.4, 0.8))


def test_threshold_for_sensitivity_is_the_highest_meeting_the_target():
    positive, score = Y == 2, P[:, 2]
    # 2 of 3 positives (.8, .6) at t = .6, no negative >= .6
    assert clinical.threshold_for_sensitivity(positive, score, 0.6) == pytest.approx(
        0.6
    )
    assert clinical.threshold_for_sensitivity(positive, score, 1.0) == pytest.approx(
        0.4
    )
    assert clinical.threshold_for_sensitivity(positive, score, 0.3) == pytest.approx(
        0.8
    )
    with pytest.raises(ValueError, match="target sensitivity"):
        clinical.threshold_for_sensitivity(positive, score, 0.0)


def test_nne_is_nan_when_no_melanoma_is_found():
    assert math.isnan(clinical.number_needed_to_excise([True, False], [False, True]))


# ---------------------------------------------------------------------------------------
# Agreement with scikit-learn on random 7-class data (the ISIC definitions)
# ---------------------------------------------------------------------------------------
def _random_predictions(n=400, seed=0, absent=()):
    rng = np.random.default_rng(seed)
    classes = [c for c in range(len(CLASSES)) if c not in absent]
    y = rng.choice(classes, size=n)
    logits = rng.normal(size=(n, len(CLASSES)))
    logits[np.arange(n), y] += 1.2
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def test_agrees_with_sklearn_on_all_seven_classes():
    y, p = _random_predictions()
    d = p.argmax(axis=1)
    m = M.classification_metrics(y, p)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, d))
    # the ISIC definition, written out: the mean of the per-class recalls
    recalls = [np.mean(d[y == c] == c) for c in range(7)]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert m["macro_auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, d))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, p, labels=range(7)))
    assert (
        np.array(m["confusion_matrix"]).tolist() == skm.confusion_matrix(y, d).tolist()
    )
    f1 = [row["f1"] for row in m["per_class"]]
    assert f1 == pytest.approx(skm.f1_score(y, d, average=None).tolist())
    assert m["auc_classes_defined"] == 7 and m["absent_classes"] == []


def test_absent_class_gives_nan_auc_and_macro_over_present_classes():
    y, p = _random_predictions(absent=(3,))  # no dermatofibroma
    m = M.classification_metrics(y, p)
    auc = M.roc_auc_per_class(y, p)
    assert np.isnan(auc[3]) and np.isfinite(np.delete(auc, 3)).all()
    expected = np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in range(7) if c != 3])
    assert m["macro_auc"] == pytest.approx(expected)
    assert m["auc_classes_defined"] == 6 and m["absent_classes"] == ["df"]
    d = p.argmax(axis=1)
    with pytest.warns(UserWarning):  # sklearn warns about the absent class
        ref = skm.balanced_accuracy_score(y, d)
    assert m["balanced_accuracy"] == pytest.approx(ref)
    assert math.isnan(m["per_class"][3]["recall"])


def test_one_class_model_scores_one_seventh_without_crashing():
    y = np.repeat(np.arange(7), 5)
    p = np.full((y.size, 7), 0.05)
    p[:, CLASSES.index("nv")] = 0.7  # says "nevus" to everything, identically
    m = M.classification_metrics(y, p)
    assert m["balanced_accuracy"] == pytest.approx(1 / 7, abs=1e-15)
    assert m["macro_auc"] == pytest.approx(0.5)  # every score tied
    assert m["accuracy"] == pytest.approx(1 / 7)
    mel = clinical.melanoma_metrics(y, p, threshold=0.5)
    assert mel["argmax"]["sensitivity"] == 0.0 and math.isnan(mel["argmax"]["nne"])
    ci = bootstrap.bootstrap_confidence_intervals(
        y, p, groups=np.arange(y.size), n_boot=50, seed=0
    )
    assert ci["balanced_accuracy"]["estimate"] == pytest.approx(1 / 7)
    assert ci["balanced_accuracy"]["high"] == pytest.approx(1 / 7)
    rule = decision.choose_decision_rule(y, p, train_counts=[10] * 7, groups_val=None)
    assert rule.predict(p).shape == y.shape


def test_bad_input_names_the_culprit():
    with pytest.raises(ValueError, match="outside 0..6"):
        M.balanced_accuracy([0, 9], [0, 1])
    with pytest.raises(ValueError, match="sum to 1"):
        M.macro_roc_auc([0, 1], np.full((2, 7), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        M.log_loss([0], np.full((1, 7), np.nan))
    with pytest.raises(ValueError, match="rows"):
        M.classification_metrics([0, 1, 2], np.full((2, 7), 1 / 7))


# ---------------------------------------------------------------------------------------
# Decision rules
# ---------------------------------------------------------------------------------------
def test_prior_correction_weights_by_hand():
    # train prior (10, 30, 60)/100; uniform target 1/3 -> w = (1/3)/(.1, .3, .6)
    w = decision.prior_correction_weights([10, 30, 60], classes=("a", "b", "c"))
    assert w == pytest.approx([10 / 3, 10 / 9, 5 / 9])
    with pytest.raises(ValueError, match=r"\['b'\]"):
        decision.class_prior({"a": 1, "b": 0, "c": 3}, classes=("a", "b", "c"))


def _imbalanced_validation(seed=1, n=700):
    """Posteriors of a model that learnt the training imbalance: nv dominates."""
    rng = np.random.default_rng(seed)
    train_counts = np.array([300, 500, 1000, 100, 1100, 6700, 140])
    y = np.repeat(np.arange(7), n // 7)
    logits = rng.normal(scale=1.0, size=(y.size, 7))
    logits[np.arange(y.size), y] += 1.5
    logits += np.log(train_counts / train_counts.sum())  # the training prior
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True), train_counts


def test_decision_rule_is_chosen_by_validation_balanced_accuracy():
    y, p, counts = _imbalanced_validation()
    groups = np.arange(y.size) // 2  # two images per lesion
    rule = decision.choose_decision_rule(y, p, counts, groups, n_folds=5)
    scores = {
        k: v["val_balanced_accuracy"] for k, v in rule.details["candidates"].items()
    }
    assert rule.name == max(scores, key=scores.get)
    # undoing the nv-heavy prior must beat the raw arg-max on balanced accuracy
    assert scores["prior_correction"] > scores["argmax"] + 0.05
    assert "cross-fitted" in rule.details["candidates"]["class_weights"]["scored"]
    assert M.balanced_accuracy(y, rule.predict(p)) >= scores["argmax"]
    # melanoma threshold reaches the target sensitivity on validation
    flagged = rule.flag_melanoma(p)
    assert flagged[y == MELANOMA_INDEX].mean() >= 0.90
    back = decision.DecisionRule.from_dict(rule.to_dict())
    assert back.name == rule.name and np.allclose(
        back.class_weights, rule.class_weights
    )
    assert np.array_equal(back.predict(p), rule.predict(p))


def test_fitted_class_weights_never_lower_the_fitted_balanced_accuracy():
    y, p, _ = _imbalanced_validation(seed=2)
    w = decision.fit_class_weights(y, p)
    assert M.balanced_accuracy(y, np.argmax(p * w, 1)) >= M.balanced_accuracy(
        y, p.argmax(1)
    )


# ---------------------------------------------------------------------------------------
# Lesion bootstrap
# ---------------------------------------------------------------------------------------
def test_bootstrap_moves_a_lesion_with_many_images_as_a_block():
    # lesion "big" has 10 images, 20 others have one each
    groups = np.array(["big"] * 10 + [f"l{i}" for i in range(20)])
    w = bootstrap.lesion_bootstrap_weights(groups, n_boot=300, rng=0)
    assert w.shape == (300, 30)
    assert (w[:, :10] == w[:, [0]]).all()  # the 10 images always share a weight
    # each replicate draws 21 lesions: the big one counts once per draw, not per image
    per_lesion = np.c_[w[:, [0]], w[:, 10:]]
    assert (per_lesion.sum(axis=1) == 21).all()
    assert set(np.unique(w[:, 0])) >= {0, 1, 2}


def test_weighted_replicate_equals_metric_on_the_materialised_resample():
    y, p = _random_predictions(n=300, seed=3)
    groups = np.arange(y.size) // 3  # three images per lesion
    w = bootstrap.lesion_bootstrap_weights(groups, n_boot=4, rng=7)
    got = bootstrap.weighted_metrics(y, p, w, melanoma_threshold=0.3)
    for b in range(4):
        idx = np.repeat(
            np.arange(y.size), w[b]
        )  # every image of a drawn lesion, per draw
        yb, pb, db = y[idx], p[idx], p[idx].argmax(1)
        assert got["balanced_accuracy"][b] == pytest.approx(
            skm.balanced_accuracy_score(yb, db)
        )
        assert got["macro_auc"][b] == pytest.approx(
            skm.roc_auc_score(yb, pb, multi_class="ovr")
        )
        ref = clinical.melanoma_metrics(yb, pb, threshold=0.3)
        assert got["mel_auc"][b] == pytest.approx(ref["auc"])
        for key in ("sensitivity", "specificity", "nne"):
            assert got[f"mel_{key}_argmax"][b] == pytest.approx(ref["argmax"][key])
            assert got[f"mel_{key}_threshold"][b] == pytest.approx(
                ref["threshold"][key]
            )
        for t in ("0.90", "0.95"):
            assert got[f"mel_specificity_at_sensitivity_{t}"][b] == pytest.approx(
                ref["specificity_at_sensitivity"][t]["specificity"]
            )


def test_bootstrap_interval_is_reproducible_and_brackets_the_estimate():
    y, p = _random_predictions(n=300, seed=4)
    groups = np.arange(y.size) // 2
    a = bootstrap.bootstrap_confidence_intervals(y, p, groups, n_boot=200, seed=5)
    b = bootstrap.bootstrap_confidence_intervals(y, p, groups, n_boot=200, seed=5)
    assert a == b
    ba = a["balanced_accuracy"]
    assert ba["estimate"] == pytest.approx(skm.balanced_accuracy_score(y, p.argmax(1)))
    assert ba["low"] < ba["estimate"] < ba["high"] and ba["n_valid"] == 200


def test_lesion_bootstrap_is_wider_than_image_bootstrap_for_clustered_images():
    # 40 lesions x 10 near-identical images: images are not independent evidence
    rng = np.random.default_rng(6)
    y_lesion = rng.integers(0, 7, 40)
    hit = rng.random(40) < 0.6
    y = np.repeat(y_lesion, 10)
    pred = np.repeat(np.where(hit, y_lesion, (y_lesion + 1) % 7), 10)
    p = np.full((y.size, 7), 0.02)
    p[np.arange(y.size), pred] = 0.88
    by_lesion = bootstrap.bootstrap_confidence_intervals(
        y, p, np.repeat(np.arange(40), 10), n_boot=300, seed=0
    )["balanced_accuracy"]
    by_image = bootstrap.bootstrap_confidence_intervals(
        y, p, np.arange(y.size), n_boot=300, seed=0
    )["balanced_accuracy"]
    width = lambda ci: ci["high"] - ci["low"]  # noqa: E731
    assert width(by_lesion) > 1.8 * width(by_image)


def test_bootstrap_rejects_missing_lesion_ids():
    with pytest.raises(ValueError, match="missing"):
        bootstrap.lesion_bootstrap_weights(np.array(["a", None], dtype=object), 2)


def test_metrics_dict_is_json_ready():
    import json

    y, p = _random_predictions(n=50, seed=8)
    text = json.dumps(M.classification_metrics(y, p))
    assert "balanced_accuracy" in text
    assert isinstance(
        pd.DataFrame(M.classification_metrics(y, p)["per_class"]), pd.DataFrame
    )
