"""Tests for ferlib.calibration and results.calibration_table: temperature fitted on PublicTest,
stored beside the model, scored on PrivateTest, accuracy unchanged."""

import json

import numpy as np
import pandas as pd
import pytest

from ferlib import calibration
from ferlib.metrics import softmax
from ferlib.artifacts import ModelResult
from ferlib.results import calibration_table

TEMPERATURE = 2.5


def overconfident(num_samples, seed):
    """Labels drawn from softmax(logits / 2.5) but probabilities softmax(logits): T = 2.5."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(num_samples, 7))
    labels = (rng.random((num_samples, 1))
              > softmax(logits / TEMPERATURE).cumsum(axis=1)).sum(axis=1)
    return labels, softmax(logits)


def write_predictions(folder, with_test=True):
    folder.mkdir(parents=True, exist_ok=True)
    val_labels, val_proba = overconfident(4000, seed=0)
    arrays = {"val_proba": val_proba, "val_labels": val_labels}
    if with_test:
        test_labels, test_proba = overconfident(3000, seed=1)
        arrays.update(test_proba=test_proba, test_labels=test_labels)
    np.savez_compressed(folder / "predictions.npz", **arrays)
    return arrays


def test_calibrate_model_dir_writes_and_reuses(tmp_path):
    folder = tmp_path / "models" / "vit"
    write_predictions(folder)

    report = calibration.calibrate_model_dir(folder, n_boot=100)

    saved = json.loads((folder / "calibration.json").read_text())
    assert saved == report
    assert report["temperature"] == pytest.approx(TEMPERATURE, rel=0.1)
    assert report["evaluated_on"] == "PrivateTest" and report["fit_images"] == 4000
    before, after = report["before"], report["after"]
    assert before["accuracy"] == after["accuracy"]
    assert after["ece"] < before["ece"] and after["nll"] < before["nll"]
    assert after["brier"] < before["brier"]
    assert before["ece_low"] <= before["ece"] <= before["ece_high"]
    assert calibration.load_temperature(folder / "best.keras") == report["temperature"]

    (folder / "calibration.json").write_text(json.dumps({**saved, "temperature": 9.0}))
    assert calibration.calibrate_model_dir(folder, n_boot=100)["temperature"] == 9.0  # current
    assert calibration.calibrate_model_dir(folder, n_boot=50)["bootstrap_resamples"] == 50
    write_predictions(folder, with_test=False)                          # retrained: stale
    refreshed = calibration.calibrate_model_dir(folder, n_boot=50)
    assert refreshed["evaluated_on"].startswith("PublicTest (the fit set")


def test_load_temperature_errors(tmp_path):
    assert calibration.load_temperature(tmp_path / "best.keras") is None
    (tmp_path / "calibration.json").write_text('{"temperature": -1}')
    with pytest.raises(ValueError, match="positive number"):
        calibration.load_temperature(tmp_path / "best.keras")
    (tmp_path / "calibration.json").write_text("{}")
    with pytest.raises(ValueError, match="calibration.json: expected a JSON object"):
        calibration.load_temperature(tmp_path)
    with pytest.raises(FileNotFoundError, match="predictions.npz: no saved predictions"):
        calibration.calibrate_model_dir(tmp_path / "empty")


def test_calibration_table_for_split_and_cross_validated_results(tmp_path):
    folder = tmp_path / "models" / "alexnet"
    arrays = write_predictions(folder)
    empty = pd.DataFrame()

    def result(name, directory, folds=None):
        return ModelResult(name=name, directory=directory, history=empty, timing=empty,
                           metrics={}, settings={}, predictions=arrays, folds=folds)

    results = {"alexnet": result("alexnet", folder),
               "vit": result("vit", tmp_path / "models" / "vit", folds=[])}
    results["vit"].folds = [results["alexnet"]]   # cross-validated: computed from predictions

    table = calibration_table(results, n_boot=50)

    assert list(table["model"]) == ["AlexNet (Alex CNN)", "ViT"]
    assert (folder / "calibration.json").exists()
    assert not (tmp_path / "models" / "vit" / "calibration.json").exists()
    row = table.iloc[0]
    assert row["temperature"] == pytest.approx(TEMPERATURE, rel=0.1)
    assert row["ece_after"] < row["ece_before"]
    assert row["ece_before_ci"].startswith("[") and row["evaluated_on"] == "PrivateTest"
    assert {"brier_before", "brier_after", "nll_before", "nll_after", "classwise_ece_before",
            "accuracy"} <= set(table.columns)
    assert table.loc[0, "temperature"] == table.loc[1, "temperature"]
