"""The cross-dataset step (ferlib.cross): every trained model and the ensemble scored on the
profile's extra datasets, missing datasets listed with the reason, subject groups widening the
intervals, and each model's summary written for its model card."""

import shutil

import numpy as np
import pytest

from conftest import make_fer_folder
from ferlib import cross, metrics
from ferlib.config import load_params, validate
from ferlib.runs import read_json

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def test_a_cluster_bootstrap_is_wider_for_copies_and_equal_for_singletons():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    proba = rng.dirichlet(np.ones(3), 60)
    proba[np.arange(60)[:30], labels[:30]] += 1.0  # half of them right
    proba /= proba.sum(1, keepdims=True)
    plain = metrics.bootstrap_ci(labels, proba, n_boot=300, metric_names=("accuracy",))
    single = metrics.bootstrap_ci(labels, proba, n_boot=300, metric_names=("accuracy",),
                                  groups=np.arange(60))
    assert np.allclose(plain[["low", "high"]], single[["low", "high"]])
    # Each image ten times: as independent samples the interval shrinks about sqrt(10)-fold;
    # grouped by the original image it stays as wide as for the 60 originals.
    copies = metrics.bootstrap_ci(np.repeat(labels, 10), np.repeat(proba, 10, 0), n_boot=300,
                                  metric_names=("accuracy",))
    grouped = metrics.bootstrap_ci(np.repeat(labels, 10), np.repeat(proba, 10, 0), n_boot=300,
                                   metric_names=("accuracy",), groups=np.repeat(np.arange(60), 10))
    width = lambda table: float(table.high[0] - table.low[0])  # noqa: E731
    assert width(grouped) > 2 * width(copies)
    assert width(grouped) == pytest.approx(width(plain), rel=0.35)
    ece = metrics.ece_bootstrap_ci(np.repeat(labels, 10), np.repeat(proba, 10, 0), n_boot=200,
                                   groups=np.repeat(np.arange(60), 10))
    assert ece["low"] <= ece["value"] <= ece["high"]


@pytest.mark.parametrize("entry, message", [
    ({"bad name": "/x"}, "a dataset name is letters"),
    ({"a": 3}, "expected a path or a mapping"),
    ({"a": {"path": "/x", "groups": "y"}}, "unknown key 'cross_datasets.a.groups'"),
    ({"a": {"path": "/x", "group_pattern": "("}}, "not a regular expression"),
])
def test_a_bad_cross_dataset_entry_is_one_error_naming_it(entry, message):
    with pytest.raises(ValueError, match=message):
        validate({"cross_datasets": entry})


def test_every_trained_model_and_the_ensemble_are_scored_and_missing_data_is_listed(
        trained_model, tmp_path, monkeypatch):
    run = tmp_path / "run"
    for name in ("alexnet", "vit"):  # two "trained" models: the same network twice
        shutil.copytree(trained_model.parent, run / "models" / name)
        (run / "models" / name / "metrics.json").write_text("{}")
        (run / "models" / name / "calibration.json").unlink()  # the fixture's is partial
    faces = make_fer_folder(tmp_path / "faces", {"S010": ("test", 2), "S011": ("test", 2),
                                                 "S012": ("test", 2)})
    monkeypatch.delenv("NO_SUCH_DATASET", raising=False)
    params = load_params("smoke")
    params["models"] = ["alexnet", "vit"]
    params["cross_datasets"] = {
        "faces": {"path": str(faces), "group_pattern": r"^(S\d+)_"},
        "elsewhere": "$NO_SUCH_DATASET/faces.zip", "gone": str(tmp_path / "gone")}
    listed = {d["name"]: d["missing"] for d in cross.datasets(params)}
    assert listed["faces"] is None
    assert "environment variable is not set" in listed["elsewhere"]
    assert "no such file" in listed["gone"]

    scored = cross.evaluate_all(params, run, n_boot=50, progress=False)
    assert list(scored) == ["faces"] and list(scored["faces"]) == ["alexnet", "vit", "ensemble"]
    result = scored["faces"]["alexnet"]
    assert result["images"] == 42 and result["groups"] == 3
    assert result["confusion_matrix"]["counts"]
    table = cross.summary_table(scored)
    assert len(table) == 3 and table["accuracy 95% CI"].str.match(r"\[\d\.\d{3}, \d\.\d{3}\]").all()
    assert set(cross.recall_table(scored).columns) >= {"dataset", "model", "happy"}
    summary = read_json(run / "models" / "vit" / "cross_dataset.json")
    assert summary["faces"]["accuracy"]["value"] == result["accuracy"]
    assert (run / "cross" / "faces" / "ensemble" / "metrics.json").exists()
    card = (run / "models" / "vit" / "MODEL_CARD.md").read_text()  # rewritten with them
    accuracy = summary["faces"]["accuracy"]
    assert f"| faces | 42 | {accuracy['value']:.3f} [{accuracy['low']:.3f}, " in card
