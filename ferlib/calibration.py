"""Temperature scaling of trained models: fit on PublicTest, store beside the model, reuse.

``calibrate_model_dir`` reads the probabilities that ``ferlib.train`` saved in a model folder
(``predictions.npz``), fits one temperature on PublicTest by minimising the negative
log-likelihood, scores PrivateTest before and after (ECE with a bootstrap CI, class-wise ECE,
Brier score, NLL, accuracy) and writes ``calibration.json`` beside ``best.keras``.
``ferlib.apply`` then applies that temperature by default (:func:`load_temperature`). The
metrics themselves are pure functions in :mod:`ferlib.metrics`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ferlib import metrics
from ferlib.artifacts import ModelRun
from ferlib.data import file_sha256
from ferlib.runs import read_json, write_json

BINS = 15


def calibration_report(val_labels, val_proba, test_labels=None, test_proba=None, *, bins=BINS,
                       n_boot=1000, seed=0) -> dict:
    """Fit a temperature on validation predictions; score the test set before and after.

    Parameters
    ----------
    val_labels, val_proba : array_like
        PublicTest labels (N,) and probabilities (N, C): the fit set.
    test_labels, test_proba : array_like, optional
        PrivateTest labels and probabilities: the evaluation set. Without them the metrics are
        computed on the fit set and ``evaluated_on`` says so.
    bins : int
        Equal-width confidence bins of the ECE.
    n_boot : int
        Bootstrap resamples for the ECE interval.
    seed : int

    Returns
    -------
    dict
        JSON-ready: ``temperature``, ``fitted_on``, ``evaluated_on``, ``fit_images``,
        ``eval_images``, ``bins``, ``bootstrap_resamples``, ``seed`` and ``before`` /
        ``after``, each with accuracy, ece, ece_low, ece_high, classwise_ece, brier, nll.
    """
    val_labels = np.asarray(val_labels)
    temperature = metrics.fit_temperature(val_proba, val_labels, from_logits=False)
    if test_proba is None or test_labels is None or not len(test_labels):
        test_labels, test_proba = val_labels, val_proba
        evaluated_on = "PublicTest (the fit set: no PrivateTest predictions)"
    else:
        evaluated_on = "PrivateTest"
    test_labels = np.asarray(test_labels)
    after_proba = metrics.apply_temperature(test_proba, temperature)
    before = metrics.calibration_metrics(test_labels, test_proba, bins, n_boot, seed)
    after = metrics.calibration_metrics(test_labels, after_proba, bins, n_boot, seed)
    return {"temperature": temperature, "fitted_on": "PublicTest", "evaluated_on": evaluated_on,
            "fit_images": int(len(val_labels)), "eval_images": int(len(test_labels)),
            "bins": int(bins), "bootstrap_resamples": int(n_boot), "seed": int(seed),
            "before": before, "after": after}


def calibrate_model_dir(model_dir, *, bins=BINS, n_boot=1000, seed=0, force=False) -> dict:
    """Temperature-scale one trained model folder and write ``calibration.json`` into it.

    Parameters
    ----------
    model_dir : str or Path
        A folder written by ``ferlib.train`` (``runs/<profile>/models/<name>/`` or a fold):
        ``predictions.npz`` with val_proba, val_labels and, if PrivateTest was scored,
        test_proba, test_labels.
    bins, n_boot, seed
        As in :func:`calibration_report`.
    force : bool
        Recompute even if ``calibration.json`` matches the current predictions and settings.

    Returns
    -------
    dict
        :func:`calibration_report`'s result plus ``predictions_hash`` (of the
        ``predictions.npz`` it was computed from; a retrained model is recalibrated).
    """
    model_dir = Path(model_dir)
    files = ModelRun(model_dir)
    predictions_path = files.predictions
    if not predictions_path.is_file():
        raise FileNotFoundError(f"{predictions_path}: no saved predictions; train the model "
                                f"first (python -m ferlib train) or pass a folder written by "
                                f"ferlib.train")
    predictions_hash = file_sha256(predictions_path)[:16]
    existing = read_json(files.calibration)
    if (not force and existing and existing.get("predictions_hash") == predictions_hash
            and (existing.get("bins"), existing.get("bootstrap_resamples"),
                 existing.get("seed")) == (bins, n_boot, seed)):
        return existing
    with np.load(predictions_path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    missing = [key for key in ("val_proba", "val_labels") if key not in arrays]
    if missing:
        raise ValueError(f"{predictions_path}: missing {', '.join(missing)}; expected the "
                         f"arrays ferlib.train saves (val_proba, val_labels, test_proba, "
                         f"test_labels)")
    report = calibration_report(arrays["val_labels"], arrays["val_proba"],
                                arrays.get("test_labels"), arrays.get("test_proba"),
                                bins=bins, n_boot=n_boot, seed=seed)
    report["predictions_hash"] = predictions_hash
    write_json(files.calibration, report)
    return report


def load_temperature(model_path) -> float | None:
    """The temperature stored in ``calibration.json`` beside a ``.keras`` model, if any.

    Parameters
    ----------
    model_path : str or Path
        The model file (``.../best.keras``) or its folder.

    Returns
    -------
    float or None
        None when the folder has no ``calibration.json``.
    """
    model_path = Path(model_path)
    folder = model_path if model_path.is_dir() else model_path.parent
    path = ModelRun(folder).calibration
    if not path.is_file():
        return None
    try:
        temperature = float(read_json(path)["temperature"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: expected a JSON object with a positive number under "
                         f"'temperature' (written by ferlib.calibration.calibrate_model_dir); "
                         f"delete it or recalibrate ({type(error).__name__}: {error})") from error
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{path}: temperature must be a positive number; got {temperature}")
    return temperature
