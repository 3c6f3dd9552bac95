"""Evaluation metrics over plain numpy arrays: scores, confidence intervals, paired tests, TTA.

Everything here is framework-free (no TensorFlow, no plotting) and returns JSON-ready Python
types or pandas frames, so metrics can be recomputed from saved test probabilities alone.
"""

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

from ferlib import EMOTIONS, NUM_CLASSES


def softmax(logits, axis=-1):
    """Numerically stable softmax (models output logits).

    Parameters
    ----------
    logits : array_like
        Unnormalised scores, classes along `axis`.
    axis : int
        Class axis.

    Returns
    -------
    numpy.ndarray
        Probabilities summing to 1 along `axis`.
    """
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def _check_inputs(y_true, proba):
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[0] != len(y_true):
        raise ValueError(
            f"proba must have shape (N, num_classes) with N = len(y_true) = {len(y_true)}; "
            f"got {proba.shape}"
        )
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= proba.shape[1]):
        raise ValueError(f"y_true must hold class indices in [0, {proba.shape[1] - 1}]")
    return y_true, proba


def _auc_one_vs_rest(y_true, proba):
    """Per-class one-vs-rest ROC AUC; None where the class (or its complement) is absent."""
    aucs = []
    for k in range(proba.shape[1]):
        positive = y_true == k
        if positive.all() or not positive.any():
            aucs.append(None)
        else:
            aucs.append(float(roc_auc_score(positive, proba[:, k])))
    return aucs


def classification_metrics(y_true, proba):
    """Accuracy, top-2 accuracy, macro/weighted precision, recall, F1 and one-vs-rest AUC.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
        True class indices.
    proba : array_like, shape (N, C)
        Class probabilities; the prediction is their argmax.

    Returns
    -------
    dict
        Plain Python floats: accuracy, top2_accuracy, precision_macro, recall_macro, f1_macro,
        precision_weighted, recall_weighted, f1_weighted, auc_macro, and auc_per_class
        (class name -> float, or None for a class absent from `y_true`). Precision, recall and
        F1 average over all C classes (zero_division=0); auc_macro averages only the classes
        whose AUC is defined, and is None when none is.
    """
    y_true, proba = _check_inputs(y_true, proba)
    num_classes = proba.shape[1]
    labels = list(range(num_classes))
    y_pred = proba.argmax(axis=1)
    top2 = np.argsort(-proba, axis=1)[:, :2]

    scores = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "top2_accuracy": float((top2 == y_true[:, None]).any(axis=1).mean()),
    }
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0
        )
        scores[f"precision_{average}"] = float(precision)
        scores[f"recall_{average}"] = float(recall)
        scores[f"f1_{average}"] = float(f1)

    aucs = _auc_one_vs_rest(y_true, proba)
    defined = [auc for auc in aucs if auc is not None]
    scores["auc_macro"] = float(np.mean(defined)) if defined else None
    names = EMOTIONS if num_classes == NUM_CLASSES else [str(k) for k in labels]
    scores["auc_per_class"] = dict(zip(names, aucs))
    return scores


def per_class_report(y_true, y_pred, class_names=EMOTIONS):
    """Precision, recall, F1 and support per class.

    Parameters
    ----------
    y_true, y_pred : array_like of int, shape (N,)
        True and predicted class indices.
    class_names : sequence of str
        One name per class, in index order.

    Returns
    -------
    pandas.DataFrame
        Index: class names; columns: precision, recall, f1, support.
    """
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(class_names))), zero_division=0
    )
    frame = pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(int)},
        index=pd.Index(list(class_names), name="class"),
    )
    return frame


def confusion(y_true, y_pred, num_classes=NUM_CLASSES, normalize=False):
    """Confusion matrix, rows = true class, columns = predicted class.

    Parameters
    ----------
    y_true, y_pred : array_like of int, shape (N,)
        True and predicted class indices.
    num_classes : int
        Matrix size.
    normalize : bool
        If True, return percentages of each true class (rows sum to 100; rows of classes
        with no samples stay 0).

    Returns
    -------
    numpy.ndarray, shape (num_classes, num_classes)
        int64 counts, or float64 percentages.
    """
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    counts = np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2)
    counts = counts.reshape(num_classes, num_classes)
    if not normalize:
        return counts
    row_totals = counts.sum(axis=1, keepdims=True)
    return 100.0 * counts / np.maximum(row_totals, 1)


def _scores_from_confusion(cm):
    """Accuracy and macro/weighted P/R/F1 from a batch of confusion matrices (B, C, C).

    Matches scikit-learn's definitions with zero_division=0, so bootstrap resamples agree
    with `classification_metrics` on the full set.
    """
    cm = cm.astype(np.float64)
    true_positive = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    total = support.sum(axis=1)

    def ratio(numerator, denominator):
        return np.divide(numerator, denominator, out=np.zeros_like(numerator),
                         where=denominator > 0)

    precision = ratio(true_positive, predicted)
    recall = ratio(true_positive, support)
    f1 = ratio(2 * true_positive, predicted + support)
    weights = support / np.maximum(total, 1)[:, None]
    return {
        "accuracy": true_positive.sum(axis=1) / np.maximum(total, 1),
        "precision_macro": precision.mean(axis=1),
        "recall_macro": recall.mean(axis=1),
        "f1_macro": f1.mean(axis=1),
        "precision_weighted": (precision * weights).sum(axis=1),
        "recall_weighted": (recall * weights).sum(axis=1),
        "f1_weighted": (f1 * weights).sum(axis=1),
    }


def _weighted_auc_macro(weights, y_true, proba):
    """Macro one-vs-rest AUC for many resamples at once.

    A bootstrap resample is the full set with integer weights (how often each sample was
    drawn). Sorting each class's scores once and summing weights per tied-score group gives
    the Mann-Whitney AUC of every resample without re-sorting, ties counted as 1/2, exactly
    as scikit-learn would on the resampled arrays.

    Parameters
    ----------
    weights : ndarray, shape (B, N)
        Draw counts per resample and sample.
    """
    aucs = np.full((weights.shape[0], proba.shape[1]), np.nan)
    for k in range(proba.shape[1]):
        order = np.argsort(proba[:, k], kind="stable")
        sorted_scores = proba[order, k]
        group_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
        positive = (y_true[order] == k)
        sorted_weights = weights[:, order]
        positive_weight = np.add.reduceat(sorted_weights * positive, group_starts, axis=1)
        negative_weight = np.add.reduceat(sorted_weights * ~positive, group_starts, axis=1)
        negatives_below = np.cumsum(negative_weight, axis=1) - negative_weight
        wins = (positive_weight * (negatives_below + 0.5 * negative_weight)).sum(axis=1)
        pairs = positive_weight.sum(axis=1) * negative_weight.sum(axis=1)
        defined = pairs > 0
        aucs[defined, k] = wins[defined] / pairs[defined]
    num_defined = np.isfinite(aucs).sum(axis=1)
    return np.where(num_defined > 0, np.nansum(aucs, axis=1) / np.maximum(num_defined, 1), np.nan)


def _group_index(groups, num_samples):
    """Group labels (any hashable per sample) -> integer codes, or None."""
    if groups is None:
        return None
    groups = np.asarray(groups)
    if len(groups) != num_samples:
        raise ValueError(f"groups: {len(groups)} labels for {num_samples} samples")
    return np.unique(groups, return_inverse=True)[1].ravel()


def _resample_weights(rng, size, num_samples, groups=None):
    """(size, N) draw counts of ``size`` bootstrap resamples: of the samples, or, with
    ``groups`` (integer codes per sample), of whole groups (a cluster bootstrap: every image of
    a drawn subject or sequence comes with it, so correlated images are not counted as
    independent evidence)."""
    if groups is None:
        draws = rng.integers(0, num_samples, size=(size, num_samples))
        offsets = np.arange(size)[:, None] * num_samples
        weights = np.bincount((draws + offsets).ravel(), minlength=size * num_samples)
        return weights.reshape(size, num_samples).astype(np.float64)
    num_groups = int(groups.max()) + 1
    draws = rng.integers(0, num_groups, size=(size, num_groups))
    offsets = np.arange(size)[:, None] * num_groups
    counts = np.bincount((draws + offsets).ravel(), minlength=size * num_groups)
    return counts.reshape(size, num_groups)[:, groups].astype(np.float64)


def bootstrap_ci(y_true, proba, n_boot=1000, seed=0, confidence=0.95,
                 metric_names=("accuracy", "precision_macro", "recall_macro", "f1_macro",
                               "auc_macro"), groups=None):
    """Percentile bootstrap confidence intervals by resampling the test set.

    Every resample is represented by its draw counts, so all metrics come from matrix
    products (a confusion matrix per resample) and one sort per class for AUC; 1,000
    resamples of 3,600 samples take about a second. All `n_boot` resamples are used for
    every metric, AUC included.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
    proba : array_like, shape (N, C)
    n_boot : int
        Number of resamples.
    seed : int
        Seed of the numpy Generator drawing the resamples.
    confidence : float
        Central interval mass, e.g. 0.95.
    metric_names : sequence of str
        Any of accuracy, top2_accuracy, precision/recall/f1 _macro/_weighted, auc_macro.
    groups : array_like, shape (N,), optional
        A group label per sample (subject, sequence): resample whole groups.

    Returns
    -------
    pandas.DataFrame
        Columns metric, value (on the full set), low, high. An accuracy of exactly 0 or 1
        (ungrouped) gets the exact Clopper-Pearson interval instead of the bootstrap's point
        interval, e.g. [0.884, 1] for 30 of 30.
    """
    y_true, proba = _check_inputs(y_true, proba)
    num_samples, num_classes = proba.shape
    groups = _group_index(groups, num_samples)
    point = classification_metrics(y_true, proba)
    unknown = [name for name in metric_names if name not in point or name == "auc_per_class"]
    if unknown:
        allowed = sorted(key for key in point if key != "auc_per_class")
        raise ValueError(f"unknown metric(s) {unknown}; allowed: {allowed}")

    y_pred = proba.argmax(axis=1)
    cell = np.eye(num_classes**2)[y_true * num_classes + y_pred]  # (N, C*C) one-hot cell
    top2_hit = (np.argsort(-proba, axis=1)[:, :2] == y_true[:, None]).any(axis=1)
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in metric_names}
    # Chunks bound the (chunk, N) weight matrix to a few tens of MB for any N.
    chunk_size = max(1, 2_000_000 // max(num_samples, 1))
    for start in range(0, n_boot, chunk_size):
        size = min(chunk_size, n_boot - start)
        weights = _resample_weights(rng, size, num_samples, groups)
        cm = (weights @ cell).reshape(size, num_classes, num_classes)
        chunk = _scores_from_confusion(cm)
        chunk["top2_accuracy"] = weights @ top2_hit / weights.sum(axis=1)
        if "auc_macro" in metric_names:
            chunk["auc_macro"] = _weighted_auc_macro(weights, y_true, proba)
        for name in metric_names:
            samples[name].append(chunk[name])

    tail = 100 * (1 - confidence) / 2
    rows = []
    for name in metric_names:
        values = np.concatenate(samples[name])
        low, high = (np.nanpercentile(values, [tail, 100 - tail])
                     if np.isfinite(values).any() else (np.nan, np.nan))
        value = point[name]
        if name == "accuracy" and groups is None and value in (0.0, 1.0):
            # Every resample of an all-right (or all-wrong) test set scores the same, so the
            # percentile interval is the point [1, 1]; the exact binomial interval is not.
            hits = int(round(value * num_samples))
            low, high = stats.binomtest(hits, num_samples).proportion_ci(confidence, "exact")
        rows.append({"metric": name, "value": np.nan if value is None else value,
                     "low": float(low), "high": float(high)})
    return pd.DataFrame(rows)


def mcnemar(y_true, pred_a, pred_b):
    """McNemar's test of two classifiers evaluated on the same samples.

    Parameters
    ----------
    y_true, pred_a, pred_b : array_like of int, shape (N,)
        True labels and the two models' predictions.

    Returns
    -------
    dict
        b (A right, B wrong), c (A wrong, B right), statistic, p_value, method. With fewer
        than 25 discordant pairs the exact two-sided binomial test is used (statistic =
        min(b, c)); otherwise chi-square with continuity correction, (|b - c| - 1)^2 / (b + c).
    """
    y_true = np.asarray(y_true).ravel()
    right_a = np.asarray(pred_a).ravel() == y_true
    right_b = np.asarray(pred_b).ravel() == y_true
    b = int((right_a & ~right_b).sum())
    c = int((~right_a & right_b).sum())
    discordant = b + c
    if discordant == 0:
        return {"b": b, "c": c, "statistic": 0.0, "p_value": 1.0, "method": "exact binomial"}
    if discordant < 25:
        p_value = stats.binomtest(b, discordant, 0.5, alternative="two-sided").pvalue
        return {"b": b, "c": c, "statistic": float(min(b, c)), "p_value": float(p_value),
                "method": "exact binomial"}
    statistic = (abs(b - c) - 1) ** 2 / discordant
    return {"b": b, "c": c, "statistic": float(statistic),
            "p_value": float(stats.chi2.sf(statistic, df=1)),
            "method": "chi-square with continuity correction"}


def paired_bootstrap_accuracy_diff(y_true, pred_a, pred_b, n_boot=1000, seed=0,
                                   confidence=0.95):
    """Accuracy of A minus accuracy of B, with a paired percentile bootstrap interval.

    Both models are scored on the same resampled indices, so the interval reflects the
    per-sample correlation between them rather than two independent intervals.

    Parameters
    ----------
    y_true, pred_a, pred_b : array_like of int, shape (N,)
    n_boot : int
    seed : int
    confidence : float

    Returns
    -------
    dict
        diff, low, high as Python floats.
    """
    y_true = np.asarray(y_true).ravel()
    difference = ((np.asarray(pred_a).ravel() == y_true).astype(np.float64)
                  - (np.asarray(pred_b).ravel() == y_true))
    num_samples = len(difference)
    rng = np.random.default_rng(seed)
    chunk_size = max(1, 2_000_000 // max(num_samples, 1))
    resampled = []
    for start in range(0, n_boot, chunk_size):
        size = min(chunk_size, n_boot - start)
        resampled.append(difference[rng.integers(0, num_samples, (size, num_samples))].mean(1))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(np.concatenate(resampled), [tail, 100 - tail])
    return {"diff": float(difference.mean()), "low": float(low), "high": float(high)}


# (dy, dx) pixel shifts for TTA crops, in the order they are used.
_CROP_SHIFTS = ((0, -2), (0, 2), (-2, 0), (2, 0), (-2, -2), (2, 2), (-2, 2), (2, -2))


def tta_probabilities(predict_proba, images, flip=True, crops=0):
    """Test-time augmentation: average predictions over flipped and shifted copies.

    Parameters
    ----------
    predict_proba : callable
        Maps an image batch shaped like `images` to (N, C) probabilities.
    images : numpy.ndarray
        uint8 batch, (N, 48, 48) or (N, 48, 48, 1).
    flip : bool
        Add the horizontally flipped batch (faces are roughly left-right symmetric).
    crops : int
        Number of extra views shifted by 2 px (reflection padding keeps the size), at most 8.

    Returns
    -------
    numpy.ndarray, shape (N, C)
        Mean probabilities over the views.
    """
    images = np.asarray(images)
    if not 0 <= crops <= len(_CROP_SHIFTS):
        raise ValueError(f"crops must be between 0 and {len(_CROP_SHIFTS)}; got {crops}")
    views = [images]
    if flip:
        views.append(images[:, :, ::-1])
    if crops:
        pad = 2
        spatial_pad = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (images.ndim - 3)
        padded = np.pad(images, spatial_pad, mode="reflect")
        height, width = images.shape[1:3]
        for dy, dx in _CROP_SHIFTS[:crops]:
            views.append(padded[:, pad + dy:pad + dy + height, pad + dx:pad + dx + width])
    total = sum(np.asarray(predict_proba(np.ascontiguousarray(view)), dtype=np.float64)
                for view in views)
    return total / len(views)


# ----------------------------------------------------------------------------- calibration

def _top_label(y_true, proba):
    y_true, proba = _check_inputs(y_true, proba)
    return y_true, proba.max(axis=1), (proba.argmax(axis=1) == y_true).astype(np.float64)


def _bin_index(confidence, bins):
    """Equal-width bins ((m-1)/M, m/M], m = 1..M, as in Guo et al. (2017); 0 goes to the first."""
    if bins < 1:
        raise ValueError(f"bins must be a positive integer; got {bins}")
    return np.clip(np.ceil(np.asarray(confidence) * bins).astype(np.int64) - 1, 0, bins - 1)


def _binned_gap(confidence, outcome, bins):
    """Binned calibration gap of scores against 0/1 outcomes: sum over bins of
    |sum(outcome - confidence)| / N."""
    if not len(confidence):
        return float("nan")
    gaps = np.bincount(_bin_index(confidence, bins), weights=outcome - confidence,
                       minlength=bins)
    return float(np.abs(gaps).sum() / len(confidence))


def expected_calibration_error(y_true, proba, bins=15):
    """Top-label expected calibration error with equal-width confidence bins.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
    proba : array_like, shape (N, C)
    bins : int
        Number of equal-width bins over [0, 1] (15, as in Guo et al. 2017).

    Returns
    -------
    float
        Sum over bins of (bin size / N) x |accuracy in bin - mean confidence in bin|; the
        confidence is the top probability and "correct" means the top class is the label.
    """
    _, confidence, correct = _top_label(y_true, proba)
    return _binned_gap(confidence, correct, bins)


def classwise_ece(y_true, proba, bins=15):
    """Class-wise ECE (Kull et al. 2019): every class's probability binned against its frequency.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
    proba : array_like, shape (N, C)
    bins : int

    Returns
    -------
    float
        Mean over the C classes of the binned |frequency of the class - mean probability|.
    """
    y_true, proba = _check_inputs(y_true, proba)
    return float(np.mean([_binned_gap(proba[:, k], (y_true == k).astype(np.float64), bins)
                          for k in range(proba.shape[1])]))


def brier_score(y_true, proba):
    """Multiclass Brier score: mean over samples of the squared distance to the one-hot label.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
    proba : array_like, shape (N, C)

    Returns
    -------
    float
        In [0, 2]; 0 for certain, correct predictions.
    """
    y_true, proba = _check_inputs(y_true, proba)
    one_hot = np.eye(proba.shape[1])[y_true]
    return float(((proba - one_hot) ** 2).sum(axis=1).mean())


def negative_log_likelihood(y_true, proba, eps=1e-12):
    """Mean negative log probability of the true class (probabilities clipped at `eps`).

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
    proba : array_like, shape (N, C)
    eps : float

    Returns
    -------
    float
    """
    y_true, proba = _check_inputs(y_true, proba)
    return float(-np.log(np.clip(proba[np.arange(len(y_true)), y_true], eps, 1)).mean())


def ece_bootstrap_ci(y_true, proba, n_boot=1000, seed=0, bins=15, confidence=0.95,
                     groups=None):
    """Top-label ECE with a percentile bootstrap interval over resampled test sets.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
    proba : array_like, shape (N, C)
    n_boot : int
        Number of resamples.
    seed : int
        Seed of the numpy Generator drawing the resamples.
    bins : int
    confidence : float
        Central interval mass.
    groups : array_like, shape (N,), optional
        A group label per sample: resample whole groups (see :func:`bootstrap_ci`).

    Returns
    -------
    dict
        value (ECE on the full set), low, high as Python floats.
    """
    _, scores, correct = _top_label(y_true, proba)
    num_samples = len(scores)
    groups = _group_index(groups, num_samples)
    value = _binned_gap(scores, correct, bins)
    if n_boot <= 0 or not num_samples:
        return {"value": value, "low": float("nan"), "high": float("nan")}
    # A resample's ECE is sum over bins of |sum of its weights x (correct - confidence)| / N:
    # one matrix product per chunk of resamples.
    cell = np.eye(bins)[_bin_index(scores, bins)] * (correct - scores)[:, None]   # (N, bins)
    rng = np.random.default_rng(seed)
    chunk_size = max(1, 2_000_000 // max(num_samples, 1))
    values = []
    for start in range(0, n_boot, chunk_size):
        size = min(chunk_size, n_boot - start)
        weights = _resample_weights(rng, size, num_samples, groups)
        values.append(np.abs(weights @ cell).sum(axis=1) / weights.sum(axis=1))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(np.concatenate(values), [tail, 100 - tail])
    return {"value": value, "low": float(low), "high": float(high)}


def reliability_bins(y_true, proba, bins=15):
    """Per confidence bin: mean top-label confidence, accuracy and count (a reliability diagram).

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
    proba : array_like, shape (N, C)
    bins : int

    Returns
    -------
    pandas.DataFrame
        One row per bin, empty bins included: bin (0-based), lower, upper (edges),
        confidence and accuracy (NaN for an empty bin), count.
    """
    _, scores, correct = _top_label(y_true, proba)
    index = _bin_index(scores, bins)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=scores, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    edges = np.linspace(0, 1, bins + 1)
    return pd.DataFrame({"bin": np.arange(bins), "lower": edges[:-1], "upper": edges[1:],
                         "confidence": mean_confidence, "accuracy": accuracy,
                         "count": count.astype(int)})


def _log_probabilities(logits_or_proba, from_logits=None):
    """Log-probabilities from logits or probabilities (rows of non-negative numbers summing to
    1 are taken as probabilities unless `from_logits` says otherwise)."""
    values = np.asarray(logits_or_proba, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"expected an (N, num_classes) array of logits or probabilities; got "
                         f"shape {values.shape}")
    if from_logits is None:
        from_logits = not (values.min() >= 0 and np.allclose(values.sum(axis=1), 1, atol=1e-4))
    if from_logits:
        shifted = values - values.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return np.log(np.clip(values, np.finfo(np.float64).tiny, None))


def apply_temperature(proba, temperature, from_logits=False):
    """Temperature scaling: softmax(log p / T), the same as dividing the logits by T.

    Parameters
    ----------
    proba : array_like, shape (N, C)
        Probabilities (or logits with ``from_logits=True``).
    temperature : float
        T > 0; T > 1 softens over-confident predictions. The argmax, and so the accuracy,
        does not change.
    from_logits : bool

    Returns
    -------
    numpy.ndarray, shape (N, C)
        Probabilities.
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number; got {temperature}")
    return softmax(_log_probabilities(proba, from_logits) / temperature)


def fit_temperature(logits_or_proba, y_true, bounds=(0.05, 20.0), from_logits=None):
    """The temperature minimising the negative log-likelihood (Guo et al. 2017).

    Fit it on validation data (PublicTest here), never on the data it is evaluated on.

    Parameters
    ----------
    logits_or_proba : array_like, shape (N, C)
        Logits or probabilities (detected: non-negative rows summing to 1 are probabilities;
        ``from_logits`` overrides).
    y_true : array_like of int, shape (N,)
    bounds : tuple of float
        Search interval for T (searched on log T).
    from_logits : bool, optional

    Returns
    -------
    float
        T; a value at a bound means the optimum lies beyond it.
    """
    from scipy.optimize import minimize_scalar

    log_proba = _log_probabilities(logits_or_proba, from_logits)
    y_true, log_proba = _check_inputs(y_true, log_proba)
    if not len(y_true):
        raise ValueError("fit_temperature: no samples to fit on")
    true_class = log_proba[np.arange(len(y_true)), y_true]

    def nll(log_temperature):
        scaled = log_proba / np.exp(log_temperature)
        top = scaled.max(axis=1)
        log_normaliser = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
        return float(np.mean(log_normaliser - true_class / np.exp(log_temperature)))

    low, high = np.log(bounds[0]), np.log(bounds[1])
    result = minimize_scalar(nll, bounds=(low, high), method="bounded",
                             options={"xatol": 1e-6})
    return float(np.exp(result.x))


def calibration_metrics(y_true, proba, bins=15, n_boot=1000, seed=0):
    """Accuracy, top-label ECE with its bootstrap CI, class-wise ECE, Brier score and NLL.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
    proba : array_like, shape (N, C)
    bins : int
    n_boot : int
        Resamples for the ECE interval; 0 gives NaN bounds.
    seed : int

    Returns
    -------
    dict
        accuracy, ece, ece_low, ece_high, classwise_ece, brier, nll (Python floats).
    """
    y_true, proba = _check_inputs(y_true, proba)
    ece = ece_bootstrap_ci(y_true, proba, n_boot=n_boot, seed=seed, bins=bins)
    return {"accuracy": float((proba.argmax(axis=1) == y_true).mean()),
            "ece": ece["value"], "ece_low": ece["low"], "ece_high": ece["high"],
            "classwise_ece": classwise_ece(y_true, proba, bins),
            "brier": brier_score(y_true, proba), "nll": negative_log_likelihood(y_true, proba)}
