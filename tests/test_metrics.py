"""Tests for ferlib.metrics: hand-computed cases, agreement with scikit-learn, statistics."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

from ferlib import EMOTIONS
from ferlib import metrics
from ferlib.metrics import (bootstrap_ci, classification_metrics, confusion, mcnemar,
                            paired_bootstrap_accuracy_diff, per_class_report, softmax,
                            tta_probabilities)

# 6 samples, 3 classes. Predictions 0,1,1,1,2,0 give the confusion matrix
# [[1,1,0],[0,2,0],[1,0,1]]: precision 1/2, 2/3, 1; recall 1/2, 1, 1/2; F1 1/2, 4/5, 2/3.
HAND_Y = np.array([0, 0, 1, 1, 2, 2])
HAND_PROBA = np.array([
    [0.7, 0.2, 0.1],
    [0.3, 0.6, 0.1],
    [0.2, 0.7, 0.1],
    [0.1, 0.5, 0.4],
    [0.1, 0.2, 0.7],
    [0.5, 0.4, 0.1],  # the only top-2 miss
])


def random_case(num_samples=400, num_classes=7, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_classes, num_samples)
    logits = rng.normal(size=(num_samples, num_classes))
    logits[np.arange(num_samples), y_true] += signal
    return y_true, softmax(np.round(logits, 1))  # rounding creates score ties


def test_softmax_is_stable_and_normalised():
    proba = softmax(np.array([[1000.0, 1000.0, -1000.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_allclose(proba[0], [0.5, 0.5, 0.0])


def test_classification_metrics_hand_computed():
    scores = classification_metrics(HAND_Y, HAND_PROBA)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["top2_accuracy"] == pytest.approx(5 / 6)
    assert scores["precision_macro"] == pytest.approx(13 / 18)
    assert scores["recall_macro"] == pytest.approx(2 / 3)
    assert scores["f1_macro"] == pytest.approx(59 / 90)
    assert scores["f1_weighted"] == pytest.approx(59 / 90)  # equal supports
    # Class 0: 7 of 8 positive/negative pairs ranked right; class 2: 5.5 of 8 (three ties).
    assert scores["auc_per_class"] == pytest.approx({"0": 7 / 8, "1": 7 / 8, "2": 5.5 / 8})
    assert scores["auc_macro"] == pytest.approx(0.8125)
    json.dumps(scores)
    assert all(type(value) is float for key, value in scores.items() if key != "auc_per_class")


def test_classification_metrics_match_sklearn():
    y_true, proba = random_case()
    y_pred = proba.argmax(axis=1)
    scores = classification_metrics(y_true, proba)
    assert scores["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    for average in ("macro", "weighted"):
        expected = precision_recall_fscore_support(y_true, y_pred, average=average,
                                                   zero_division=0)
        assert scores[f"precision_{average}"] == pytest.approx(expected[0])
        assert scores[f"recall_{average}"] == pytest.approx(expected[1])
        assert scores[f"f1_{average}"] == pytest.approx(expected[2])
    assert scores["auc_macro"] == pytest.approx(roc_auc_score(y_true, proba, multi_class="ovr"))
    assert set(scores["auc_per_class"]) == set(EMOTIONS)


def test_auc_skips_absent_class():
    y_true, proba = random_case(num_classes=3)
    present = y_true != 2
    scores = classification_metrics(y_true[present], proba[present])
    assert scores["auc_per_class"]["2"] is None
    expected = np.mean([roc_auc_score(y_true[present] == k, proba[present, k]) for k in (0, 1)])
    assert scores["auc_macro"] == pytest.approx(expected)


def test_bad_shapes_are_explained():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics([0, 1], np.ones((3, 2)) / 2)


def test_per_class_report_hand_computed():
    report = per_class_report(HAND_Y, HAND_PROBA.argmax(axis=1), class_names=("a", "b", "c"))
    assert list(report.index) == ["a", "b", "c"]
    np.testing.assert_allclose(report["precision"], [1 / 2, 2 / 3, 1])
    np.testing.assert_allclose(report["recall"], [1 / 2, 1, 1 / 2])
    np.testing.assert_allclose(report["f1"], [1 / 2, 4 / 5, 2 / 3])
    assert list(report["support"]) == [2, 2, 2]


def test_confusion_counts_and_percent():
    y_pred = HAND_PROBA.argmax(axis=1)
    np.testing.assert_array_equal(confusion(HAND_Y, y_pred, num_classes=3),
                                  [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    percent = confusion(HAND_Y, y_pred, num_classes=4, normalize=True)
    np.testing.assert_allclose(percent.sum(axis=1), [100, 100, 100, 0])  # class 3 absent
    np.testing.assert_allclose(percent[1], [0, 100, 0, 0])


def test_confusion_scores_match_sklearn_including_absent_classes():
    # The bootstrap computes P/R/F1 from confusion matrices; they must equal sklearn's.
    y_true, proba = random_case(num_samples=200, seed=3)
    y_pred = proba.argmax(axis=1)
    y_pred[y_pred == 4] = 0  # class 4 never predicted
    keep = y_true != 5  # class 5 never true
    y_true, y_pred = y_true[keep], y_pred[keep]
    scores = metrics._scores_from_confusion(confusion(y_true, y_pred)[None])
    for average in ("macro", "weighted"):
        expected = precision_recall_fscore_support(y_true, y_pred, labels=range(7),
                                                   average=average, zero_division=0)
        for name, value in zip(("precision", "recall", "f1"), expected[:3]):
            assert scores[f"{name}_{average}"][0] == pytest.approx(value)


def test_weighted_auc_equals_sklearn_on_a_resample():
    y_true, proba = random_case(num_samples=300, seed=4)
    draws = np.random.default_rng(0).integers(0, len(y_true), len(y_true))
    weights = np.bincount(draws, minlength=len(y_true))[None].astype(float)
    expected = roc_auc_score(y_true[draws], proba[draws], multi_class="ovr")
    assert metrics._weighted_auc_macro(weights, y_true, proba)[0] == pytest.approx(expected)


def test_bootstrap_ci_contains_estimate_and_is_reproducible():
    y_true, proba = random_case(num_samples=500)
    first = bootstrap_ci(y_true, proba, n_boot=200, seed=1)
    assert list(first.columns) == ["metric", "value", "low", "high"]
    assert list(first["metric"]) == ["accuracy", "precision_macro", "recall_macro",
                                     "f1_macro", "auc_macro"]
    assert (first["low"] <= first["value"]).all() and (first["value"] <= first["high"]).all()
    assert (first["high"] - first["low"] > 0).all()
    assert first.equals(bootstrap_ci(y_true, proba, n_boot=200, seed=1))
    assert not first.equals(bootstrap_ci(y_true, proba, n_boot=200, seed=2))
    with pytest.raises(ValueError, match="allowed"):
        bootstrap_ci(y_true, proba, n_boot=10, metric_names=("kappa",))


def test_bootstrap_ci_of_a_perfect_or_hopeless_score_is_the_exact_binomial_interval():
    """Every resample of 30 right answers scores 1, so the percentile interval would be [1, 1];
    the exact (Clopper-Pearson) one is [0.8843, 1]: 0.025 ** (1 / 30) = 0.8843."""
    y_true = np.arange(30) % 7
    right, wrong = np.eye(7)[y_true], np.eye(7)[(y_true + 1) % 7]
    perfect = bootstrap_ci(y_true, right, n_boot=100).set_index("metric").loc["accuracy"]
    assert perfect["value"] == 1.0 and perfect["high"] == 1.0
    assert perfect["low"] == pytest.approx(0.025 ** (1 / 30), abs=1e-9)
    hopeless = bootstrap_ci(y_true, wrong, n_boot=100).set_index("metric").loc["accuracy"]
    assert hopeless["low"] == 0.0 and hopeless["high"] == pytest.approx(1 - 0.025 ** (1 / 30))
    # Grouped resampling keeps the bootstrap's own interval.
    grouped = bootstrap_ci(y_true, right, n_boot=100, groups=np.arange(30) // 3)
    assert grouped.set_index("metric").loc["accuracy", "low"] == 1.0


def mcnemar_case(b, c, both_right=20, both_wrong=5):
    """Labels and predictions with exactly b (A right, B wrong) and c (A wrong, B right)."""
    y_true = np.zeros(b + c + both_right + both_wrong, dtype=int)
    right_a = np.r_[np.ones(b), np.zeros(c), np.ones(both_right), np.zeros(both_wrong)]
    right_b = np.r_[np.zeros(b), np.ones(c), np.ones(both_right), np.zeros(both_wrong)]
    return y_true, np.where(right_a == 1, 0, 1), np.where(right_b == 1, 0, 2)


def test_mcnemar_exact_small_table():
    result = mcnemar(*mcnemar_case(10, 2))
    assert (result["b"], result["c"]) == (10, 2)
    assert result["method"] == "exact binomial"
    # Two-sided: 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    assert result["p_value"] == pytest.approx(158 / 4096)
    assert round(result["p_value"], 4) == 0.0386


def test_mcnemar_chi_square_large_table():
    result = mcnemar(*mcnemar_case(30, 15))
    assert result["method"].startswith("chi-square")
    # (|30 - 15| - 1)^2 / 45 = 196 / 45; chi-square(1) survival = erfc(sqrt(x / 2)) ~ 0.0369.
    assert result["statistic"] == pytest.approx(196 / 45)
    assert result["p_value"] == pytest.approx(math.erfc(math.sqrt(196 / 90)))
    assert mcnemar(*mcnemar_case(0, 0))["p_value"] == 1.0


def test_paired_bootstrap_diff_sign():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 7, 500)
    good = np.where(rng.random(500) < 0.8, y_true, (y_true + 1) % 7)
    poor = np.where(rng.random(500) < 0.4, y_true, (y_true + 1) % 7)
    better = paired_bootstrap_accuracy_diff(y_true, good, poor, n_boot=300)
    assert 0 < better["low"] <= better["diff"] <= better["high"]
    assert better["diff"] == pytest.approx((good == y_true).mean() - (poor == y_true).mean())
    worse = paired_bootstrap_accuracy_diff(y_true, poor, good, n_boot=300)
    assert worse["high"] < 0


def symmetric_predictor(images):
    # Depends only on intensity statistics, so flipping cannot change it.
    images = images.reshape(len(images), -1).astype(float) / 255
    return softmax(np.stack([images.mean(1), images.std(1), images.max(1)], axis=1))


def left_right_predictor(images):
    assert images.dtype == np.uint8
    images = images.astype(float) / 255
    left, right = images[:, :, :24].mean(axis=(1, 2)), images[:, :, 24:].mean(axis=(1, 2))
    return softmax(np.stack([4 * left, 4 * right], axis=1))


def test_tta_flip_invariant_and_not():
    images = np.random.default_rng(0).integers(0, 256, (5, 48, 48), dtype=np.uint8)
    np.testing.assert_allclose(tta_probabilities(symmetric_predictor, images),
                               symmetric_predictor(images))
    plain = left_right_predictor(images)
    averaged = tta_probabilities(left_right_predictor, images)
    flipped = left_right_predictor(images[:, :, ::-1])
    assert not np.allclose(averaged, plain)
    np.testing.assert_allclose(averaged, (plain + flipped) / 2)


def test_tta_crops_keep_shape_dtype_and_channels():
    images = np.random.default_rng(1).integers(0, 256, (3, 48, 48, 1), dtype=np.uint8)
    seen = []

    def predictor(batch):
        seen.append((batch.shape, batch.dtype))
        return np.full((len(batch), 7), 1 / 7)

    result = tta_probabilities(predictor, images, flip=True, crops=4)
    assert result.shape == (3, 7)
    assert seen == [((3, 48, 48, 1), np.uint8)] * 6
    with pytest.raises(ValueError, match="crops"):
        tta_probabilities(predictor, images, crops=9)


# ----------------------------------------------------------------------------- calibration

# Top-label confidences 0.9 (right), 0.75 (wrong), 0.55 (right), 0.7 (right) in 5 bins:
# (0.8, 1]: 0.9 vs 1 -> gap 0.1, weight 1/4; (0.6, 0.8]: mean 0.725 vs accuracy 1/2 -> gap
# 0.225, weight 2/4; (0.4, 0.6]: 0.55 vs 1 -> gap 0.45, weight 1/4. ECE = 0.025 + 0.1125 +
# 0.1125 = 0.25.
CALIBRATION_Y = np.array([0, 1, 0, 1])
CALIBRATION_PROBA = np.array([[0.9, 0.1], [0.75, 0.25], [0.55, 0.45], [0.3, 0.7]])


def test_ece_hand_computed():
    assert metrics.expected_calibration_error(CALIBRATION_Y, CALIBRATION_PROBA, bins=5) == \
        pytest.approx(0.25)
    bins = metrics.reliability_bins(CALIBRATION_Y, CALIBRATION_PROBA, bins=5)
    assert list(bins.columns) == ["bin", "lower", "upper", "confidence", "accuracy", "count"]
    assert list(bins["count"]) == [0, 0, 1, 2, 1]
    assert bins.loc[3, "confidence"] == pytest.approx(0.725) and bins.loc[3, "accuracy"] == 0.5
    assert np.isnan(bins.loc[0, "accuracy"])
    # Class 0's probabilities 0.9, 0.75, 0.55, 0.3 against outcomes 1, 0, 1, 0 in 5 bins:
    # gaps 0.1, 0.75, 0.45, 0.3 of one sample each -> 1.6 / 4; class 1 is the mirror image.
    assert metrics.classwise_ece(CALIBRATION_Y, CALIBRATION_PROBA, bins=5) == pytest.approx(0.4)


def test_brier_and_nll_hand_computed():
    # Squared distances: 0.02, 2 * 0.75**2, 2 * 0.45**2, 2 * 0.3**2.
    expected = (0.02 + 1.125 + 0.405 + 0.18) / 4
    assert metrics.brier_score(CALIBRATION_Y, CALIBRATION_PROBA) == pytest.approx(expected)
    expected_nll = -np.mean(np.log([0.9, 0.25, 0.55, 0.7]))
    assert metrics.negative_log_likelihood(CALIBRATION_Y, CALIBRATION_PROBA) == \
        pytest.approx(expected_nll)
    assert metrics.brier_score([0, 1], [[1.0, 0.0], [0.0, 1.0]]) == 0


def test_ece_is_near_zero_for_calibrated_predictions():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.full(7, 0.5), size=100_000)
    labels = (rng.random((len(proba), 1)) > proba.cumsum(axis=1)).sum(axis=1)  # y ~ proba
    assert metrics.expected_calibration_error(labels, proba) < 0.01
    assert metrics.classwise_ece(labels, proba) < 0.01
    overconfident = metrics.apply_temperature(proba, 0.5)
    assert metrics.expected_calibration_error(labels, overconfident) > 0.05


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, size=(20_000, 7))
    true_temperature = 2.0
    labels = (rng.random((len(logits), 1))
              > softmax(logits / true_temperature).cumsum(axis=1)).sum(axis=1)
    fitted = metrics.fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    # From probabilities (as saved by training) the same temperature comes back.
    assert metrics.fit_temperature(softmax(logits), labels) == pytest.approx(fitted, rel=1e-4)
    calibrated = metrics.apply_temperature(softmax(logits), fitted)
    assert np.allclose(calibrated, softmax(logits / fitted), atol=1e-9)
    assert (calibrated.argmax(1) == logits.argmax(1)).all()       # accuracy cannot change
    assert metrics.negative_log_likelihood(labels, calibrated) < \
        metrics.negative_log_likelihood(labels, softmax(logits))
    with pytest.raises(ValueError, match="positive number"):
        metrics.apply_temperature(calibrated, 0)


def test_ece_bootstrap_interval_and_summary():
    y_true, proba = random_case(num_samples=500, seed=3)
    interval = metrics.ece_bootstrap_ci(y_true, proba, n_boot=300, seed=0)
    assert interval["low"] <= interval["value"] <= interval["high"]
    assert interval == metrics.ece_bootstrap_ci(y_true, proba, n_boot=300, seed=0)
    # The vectorised resampling equals the ECE of an explicitly resampled set.
    rng = np.random.default_rng(5)
    draw = rng.integers(0, len(y_true), len(y_true))
    weights = np.bincount(draw, minlength=len(y_true)).astype(float)
    _, scores, correct = metrics._top_label(y_true, proba)
    cell = np.eye(15)[metrics._bin_index(scores, 15)] * (correct - scores)[:, None]
    assert np.abs(weights @ cell).sum() / len(y_true) == pytest.approx(
        metrics.expected_calibration_error(y_true[draw], proba[draw]))
    summary = metrics.calibration_metrics(y_true, proba, n_boot=0)
    assert set(summary) == {"accuracy", "ece", "ece_low", "ece_high", "classwise_ece",
                            "brier", "nll"}
    assert math.isnan(summary["ece_low"])
    json.dumps(summary)
