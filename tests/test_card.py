"""Tests for ferlib.card: ferlib.train leaves MODEL_CARD.md in the model folder, its numbers are
the artifacts' (metrics.json, predictions.npz, calibration.json, dataset.json), the optional
sections fill from their files, ``python -m ferlib card`` writes it again and ``export`` copies
it beside the artifact."""

import json
import re

import numpy as np
import pytest

from ferlib import metrics
from ferlib.__main__ import main
from ferlib.config import validate
from ferlib.data import FERData
from ferlib.runs import read_json

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from ferlib.train import train

    rng = np.random.default_rng(0)
    images, labels, split = [], [], []
    for name, count in (("train", 10), ("val", 4), ("test", 6)):
        for label in range(7):
            batch = rng.normal(70, 25, (count, 48, 48))
            batch[:, 3 + 6 * label:8 + 6 * label, 4:44] += 140
            images.append(np.clip(np.rint(batch), 0, 255).astype(np.uint8))
            labels += [label] * count
            split += [name] * count
    data = FERData(images=np.concatenate(images), labels=np.array(labels), split=np.array(split),
                   source_ids=np.array([f"row{i}" for i in range(len(labels))]),
                   source="/somewhere/fer2013.csv", source_hash="ab" * 32)
    params = validate({"seed": 7, "models": ["alexnet"],
                       "train": {"epochs": 2, "batch_size": 16, "learning_rate": 3e-3,
                                 "warmup_epochs": 0, "early_stopping_patience": None,
                                 "tta": False},
                       "model_params": {"alexnet": {"width": 0.25, "dense_units": 16}}})
    run = tmp_path_factory.mktemp("card")
    train("alexnet", data, params, run, progress=False)
    return run / "models" / "alexnet"


def cell(card: str, row: str) -> str:
    """The second column of the Markdown table row starting with ``row``."""
    match = re.search(rf"^\| {re.escape(row)} \| ([^|]+) \|", card, re.MULTILINE)
    assert match, f"no row {row!r} in the card"
    return match.group(1).strip()


@pytest.mark.train
def test_training_writes_a_card_whose_numbers_are_the_artifacts(folder):
    card = (folder / "MODEL_CARD.md").read_text()
    result = read_json(folder / "metrics.json")
    calibration = read_json(folder / "calibration.json")
    with np.load(folder / "predictions.npz") as archive:
        labels, proba = archive["test_labels"], archive["test_proba"]
    # drawn with the run's seed, as 04_compare's summary table draws: the same intervals
    intervals = metrics.bootstrap_ci(labels, proba, n_boot=1000, seed=7).set_index("metric")

    assert cell(card, "accuracy").startswith(f"{result['test']['accuracy']:.3f} [")
    assert cell(card, "f1_macro") == (f"{result['test']['f1_macro']:.3f} "
                                      f"[{intervals.loc['f1_macro', 'low']:.3f}, "
                                      f"{intervals.loc['f1_macro', 'high']:.3f}]")
    report = metrics.per_class_report(labels, proba.argmax(1))
    for name, row in report.iterrows():
        line = rf"^\| {name} \| [0-9.]+ \| [0-9.]+ \| {row.f1:.3f} \| {int(row.support)} \|"
        assert re.search(line, card, re.MULTILINE), name
    assert f"Temperature T = {calibration['temperature']:.3f}" in card
    assert cell(card, "before temperature scaling").startswith(
        f"{calibration['before']['ece']:.3f} [")
    assert f"sha256 `{'ab' * 32}`" in card and "`fer2013.csv`" in card
    assert "/somewhere" not in card  # the file name only, never a machine path
    assert "trained on Training" in card and "PrivateTest scored once" in card
    assert f"Epochs: {result['epochs_run']} " in card and result["machine"] in card
    for phrase in ("hiring", "surveillance", "internal states", "posed", "demographics",
                   "label noise"):
        assert phrase in card.lower(), phrase


@pytest.mark.train
def test_the_card_command_fills_the_optional_sections_and_export_copies_it(folder, tmp_path):
    (folder / "cross_dataset.json").write_text(json.dumps(
        [{"dataset": "my_faces.zip", "images": 40, "accuracy": 0.625, "f1_macro": 0.5}]))
    (folder / "saliency_check.json").write_text(json.dumps(
        {"method": "grad_cam", "images": 8, "spearman": 0.125, "passes": True}))
    try:
        assert main(["card", "--model", str(folder / "best.keras")]) == 0
        card = (folder / "MODEL_CARD.md").read_text()
        assert "| my_faces.zip | 40 | 0.625 | n/a | 0.500 |" in card
        assert "randomising the weights 0.125; passes" in card
        assert main(["export", "--model", str(folder / "best.keras"), "--format", "saved_model",
                     "--out", str(tmp_path / "exported"), "--synthetic", "--images", "16"]) == 0
        assert (tmp_path / "exported" / "MODEL_CARD.md").read_text() == card
        assert read_json(tmp_path / "exported" / "labels.json")["model_card"] == "MODEL_CARD.md"
    finally:
        (folder / "cross_dataset.json").unlink()
        (folder / "saliency_check.json").unlink()


def test_the_card_command_needs_a_finished_folder(tmp_path, capsys):
    assert main(["card", "--model", str(tmp_path)]) == 2
    assert "no finished training" in capsys.readouterr().err
