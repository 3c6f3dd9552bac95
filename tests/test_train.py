"""Tests for ferlib.train: a short training writes every artifact and lowers the loss, reruns
skip, runs killed with ``kill -9`` resume, an interrupted deterministic run resumes exactly,
every epoch has its own order and every random layer its own stream, changed settings or code
restart, budget / early stopping / schedule, the PrivateTest ledger, cross-validation and
MixUp / CutMix.

The data are synthetic FER-format arrays with a signal a tiny AlexNet learns in an epoch: each
class is a bright horizontal band at its own height (left-right flips keep it) over noise.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

import ferlib.train
from ferlib import NUM_CLASSES, PROJECT_ROOT
from ferlib.config import validate
from ferlib.data import FERData
from ferlib.models import augmentation_layers, build_model
from ferlib.runs import read_json
from ferlib.artifacts import Run
from ferlib.inference import predict_proba
from ferlib.train import (epoch_order, learning_rate_at, reseed_generators,
                          train, train_cv)

# Keras' TensorFlow backend calls np.array(tensor, copy=False) internally (NumPy 2 warns).
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

TINY_ALEXNET = {"width": 0.25, "dense_units": 16}
BASE_TRAIN = {"epochs": 2, "batch_size": 32, "learning_rate": 3e-3, "warmup_epochs": 0,
              "early_stopping_patience": None}
HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"]


def synthetic_data(per_split=(40, 10, 10), seed=0, blank=False) -> FERData:
    """``per_split`` images per class for train, val, test; optionally all-black images (a
    model that cannot tell classes apart)."""
    rng = np.random.default_rng(seed)
    images, labels, split = [], [], []
    for name, count in zip(("train", "val", "test"), per_split):
        for label in range(NUM_CLASSES):
            batch = rng.normal(70, 25, (count, 48, 48))
            row = 3 + 6 * label
            batch[:, row:row + 5, 4:44] += 140
            batch = np.clip(np.rint(batch), 0, 255).astype(np.uint8)
            images.append(np.zeros_like(batch) if blank else batch)
            labels += [label] * count
            split += [name] * count
    return FERData(images=np.concatenate(images), labels=np.array(labels, dtype=np.int64),
                   split=np.array(split), source_ids=np.array([f"row{i}" for i in
                                                               range(len(labels))]),
                   source="synthetic", source_hash=f"synthetic-{seed}-{blank}")


def make_params(train_settings=None, augment=None, data=None, **top) -> dict:
    return validate({"seed": 0, "models": ["alexnet"],
                     "data": data or {},
                     "train": {**BASE_TRAIN, **(train_settings or {})},
                     "augment": augment or {},
                     "model_params": {"alexnet": TINY_ALEXNET}, **top})


def history_of(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "history.csv")


@pytest.fixture(scope="module")
def data():
    return synthetic_data()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """One 2-epoch training shared by the artifact, skip and stale-settings tests."""
    run_dir = tmp_path_factory.mktemp("trained")
    params = make_params()
    started = time.time()
    result = train("alexnet", data, params, run_dir, progress=False)
    return {"run_dir": run_dir, "out": run_dir / "models" / "alexnet", "params": params,
            "result": result, "seconds": time.time() - started}


# ----------------------------------------------------------------------------- artifacts

@pytest.mark.train
def test_two_epochs_lower_the_training_loss(trained):
    history = history_of(trained["out"])
    # Epoch means of the training loss; with this signal epoch 2 is ~0.25 lower (seeds 0-3).
    assert history["loss"].iloc[1] < history["loss"].iloc[0]


@pytest.mark.train
def test_training_writes_every_artifact(trained, data):
    out, result = trained["out"], trained["result"]
    history = history_of(out)
    assert list(history.columns) == HISTORY_COLUMNS
    assert history["epoch"].tolist() == [1, 2]
    assert np.isfinite(history.drop(columns="epoch").to_numpy()).all()

    timing = pd.read_csv(out / "timing.csv")
    assert {"seconds", "images_per_second"} <= set(timing.columns) and len(timing) == 2
    # `ferlib train` alone leaves a complete model folder: calibrated on PublicTest too.
    calibration = read_json(out / "calibration.json")
    assert calibration["fitted_on"] == "PublicTest" and calibration["temperature"] > 0
    assert (timing[["seconds", "images_per_second"]] > 0).all().all()

    x_val, y_val = data.subset("val")
    x_test, y_test = data.subset("test")
    with np.load(out / "predictions.npz") as saved:
        predictions = dict(saved)
    assert {"val_proba", "val_labels", "test_proba", "test_labels", "test_ids",
            "test_proba_tta"} <= set(predictions)
    for key in ("val_proba", "test_proba", "test_proba_tta"):
        assert predictions[key].shape == (len(predictions[key.split("_")[0] + "_labels"]),
                                          NUM_CLASSES)
        np.testing.assert_allclose(predictions[key].sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(predictions["val_labels"], y_val)
    np.testing.assert_array_equal(predictions["test_labels"], y_test)
    np.testing.assert_array_equal(predictions["test_ids"], data.source_ids[data.split == "test"])

    metrics = read_json(out / "metrics.json")
    assert metrics["stopped_reason"] == "completed" and metrics["epochs_run"] == 2
    best_epoch = int(history["epoch"][history["val_accuracy"].idxmax()])
    assert metrics["best_epoch"] == best_epoch
    assert metrics["val"]["accuracy"] == pytest.approx(history["val_accuracy"].max())
    for part in ("val", "test", "test_tta"):
        assert 0 <= metrics[part]["accuracy"] <= 1
    assert metrics["test"]["accuracy"] == pytest.approx(
        float((predictions["test_proba"].argmax(1) == y_test).mean()))
    assert metrics["privatetest_scorings"] == 1
    assert result["best_epoch"] == metrics["best_epoch"]
    assert result["test"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])

    settings = read_json(out / "settings.json")
    assert settings == json.loads(json.dumps(settings))  # plain JSON
    assert settings["model"] == "alexnet" and settings["train"]["learning_rate"] == 3e-3
    assert settings["model_params"] == trained["params"]["model_params"]["alexnet"]

    best = keras.models.load_model(out / "best.keras")
    np.testing.assert_allclose(predict_proba(best, x_test), predictions["test_proba"],
                               atol=1e-5)
    assert not list(out.glob("checkpoint-*.keras")) and not list(out.glob("best-*.weights.h5"))
    assert read_json(out / "state.json")["finished"] is True


@pytest.mark.train
def test_second_call_skips(trained, data):
    out = trained["out"]
    before = {path.name: (path.stat().st_mtime_ns, path.read_bytes())
              for path in out.iterdir() if path.is_file()}
    started = time.time()
    again = train("alexnet", data, trained["params"], trained["run_dir"], progress=False)
    elapsed = time.time() - started
    assert again == read_json(out / "metrics.json")
    assert again["best_epoch"] == trained["result"]["best_epoch"]
    assert again["test"]["accuracy"] == pytest.approx(trained["result"]["test"]["accuracy"])
    after = {path.name: (path.stat().st_mtime_ns, path.read_bytes())
             for path in out.iterdir() if path.is_file()}
    assert after == before, "a finished run must not be touched"
    assert elapsed < max(2.0, trained["seconds"] / 2), f"skipping took {elapsed:.1f}s"


@pytest.mark.train
def test_changed_settings_move_the_old_run_aside(trained, data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained["run_dir"], run_dir)
    models = run_dir / "models"
    old_metrics = read_json(models / "alexnet" / "metrics.json")
    params = make_params({"learning_rate": 1e-3})
    result = train("alexnet", data, params, run_dir, progress=True)
    # The log names what changed, with both values, and nothing that did not.
    log = capsys.readouterr().out
    assert ("changed since the last run: train.learning_rate: 0.003 -> 0.001. Training the "
            "new run in alexnet.next") in log
    assert "replaced the earlier run (kept as alexnet.stale-" in log
    assert not (models / "alexnet.next").exists()

    [stale] = models.glob("alexnet.stale-*")
    assert read_json(stale / "metrics.json") == old_metrics
    assert read_json(stale / "settings.json")["train"]["learning_rate"] == 3e-3
    out = models / "alexnet"
    assert read_json(out / "settings.json")["train"]["learning_rate"] == 1e-3
    assert history_of(out)["epoch"].tolist() == [1, 2]
    assert read_json(out / "metrics.json") == result
    assert result["stopped_reason"] == "completed"
    # The replaced run's look at PrivateTest still counts.
    assert result["privatetest_scorings"] == 2 == Run(run_dir).count_test_scorings("alexnet")


@pytest.mark.train
def test_changed_training_code_moves_the_old_run_aside(trained, data, tmp_path, monkeypatch,
                                                      capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained["run_dir"], run_dir)
    monkeypatch.setattr(ferlib.train, "training_code", lambda: "changed-code")
    train("alexnet", data, trained["params"], run_dir, progress=True)
    assert len(list((run_dir / "models").glob("alexnet.stale-*"))) == 1
    log = capsys.readouterr().out
    assert ("changed since the last run: the training code (a function that train() runs). "
            "Training") in log


@pytest.mark.train
def test_a_failed_retrain_leaves_the_finished_run_live_and_resumes_later(
        trained, data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(trained["run_dir"], run_dir)
    live = run_dir / "models" / "alexnet"
    before = {path.name: path.read_bytes() for path in live.iterdir() if path.is_file()}
    params = make_params({"learning_rate": 1e-3})
    ferlib.train.training_code()  # fingerprint the real code before the writer is broken
    real_save = ferlib.train._save_checkpoint

    def disk_full(state, model, out, epoch):
        if epoch == 2:
            raise OSError(28, "No space left on device", str(out / "state.json"))
        real_save(state, model, out, epoch)

    monkeypatch.setattr(ferlib.train, "_save_checkpoint", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train("alexnet", data, params, run_dir, progress=False)
    after = {path.name: path.read_bytes() for path in live.iterdir() if path.is_file()}
    assert after == before  # the finished run is live and untouched
    assert not list((run_dir / "models").glob("alexnet.stale-*"))
    assert read_json(run_dir / "models" / "alexnet.next" / "state.json")["history"]
    monkeypatch.setattr(ferlib.train, "_save_checkpoint", real_save)
    result = train("alexnet", data, params, run_dir, progress=False)  # resumes epoch 2
    assert read_json(live / "settings.json")["train"]["learning_rate"] == 1e-3
    assert history_of(live)["epoch"].tolist() == [1, 2] and result["epochs_run"] == 2
    [stale] = (run_dir / "models").glob("alexnet.stale-*")
    assert (stale / "metrics.json").read_bytes() == before["metrics.json"]


def test_a_change_is_described_setting_by_setting():
    parts = {"settings": "s", "data": "d", "code": "c"}
    settings = {"train": {"epochs": 30, "batch_size": 64}, "model_params": {"width": 1.0}}
    old = {"train": {"epochs": 20, "batch_size": 64}, "model_params": {}}
    assert ferlib.train.describe_change(old, parts, settings, parts) == (
        "model_params.width: '(unset)' -> 1.0; train.epochs: 20 -> 30")
    assert ferlib.train.describe_change(settings, {**parts, "data": "x"}, settings,
                                        parts) == "the data or its split"
    # runs from before the key parts were stored cannot tell data from code
    assert ferlib.train.describe_change(settings, None, settings, parts) == (
        "the data, its split or the training code")


# ----------------------------------------------------------------------------- resume after kill -9

RESUME_SCRIPT = textwrap.dedent("""
    import json, sys, time

    import keras
    import numpy as np

    import ferlib.train
    from ferlib.data import FERData

    arrays_file, params_file, run_dir = sys.argv[1:4]
    with np.load(arrays_file) as arrays:
        data = FERData(images=arrays["images"], labels=arrays["labels"], split=arrays["split"],
                       source_ids=arrays["source_ids"], source="synthetic",
                       source_hash=str(arrays["source_hash"]))
    with open(params_file) as handle:
        params = json.load(handle)

    # Slow every batch down (sleeping costs no CPU) so that the parent can kill this process
    # in the middle of training, whatever the machine's speed. The training code is
    # fingerprinted first, as it is, not with the slowing wrapper in it.
    ferlib.train.training_code()
    make_callbacks = ferlib.train._make_callbacks

    class Slow(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(0.2)

    ferlib.train._make_callbacks = lambda *args, **kwargs: [*make_callbacks(*args, **kwargs),
                                                            Slow()]
    ferlib.train.train("alexnet", data, params, run_dir)
    print("FINISHED", flush=True)
""")


RESUME_EPOCHS = 6


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, data):
    """A 6-epoch training in a subprocess, killed with SIGKILL after >= 2 committed epochs,
    then resumed in this process with the same run folder, data and params."""
    tmp_path = tmp_path_factory.mktemp("resume")
    params = make_params({"epochs": RESUME_EPOCHS})
    arrays_file, params_file = tmp_path / "data.npz", tmp_path / "params.json"
    np.savez(arrays_file, images=data.images, labels=data.labels, split=data.split,
             source_ids=data.source_ids, source_hash=np.array(data.source_hash))
    params_file.write_text(json.dumps(params))
    (tmp_path / "resume.py").write_text(RESUME_SCRIPT)
    run_dir = tmp_path / "run"
    out = run_dir / "models" / "alexnet"
    log = tmp_path / "child.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "MPLBACKEND": "Agg"}

    with open(log, "w") as log_handle:
        child = subprocess.Popen(
            [sys.executable, str(tmp_path / "resume.py"), str(arrays_file), str(params_file),
             str(run_dir)], cwd=PROJECT_ROOT, env=env, stdout=log_handle, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            done = 0
            while time.time() < deadline and child.poll() is None:
                try:
                    done = len(read_json(out / "state.json", {}).get("history", []))
                except json.JSONDecodeError:
                    done = 0
                if done >= 2:
                    break
                time.sleep(0.05)
            if child.poll() is not None:
                pytest.fail(f"the training subprocess ended (exit code {child.returncode}) "
                            f"before it could be killed after 2 epochs; its log:\n"
                            f"{log.read_text()[-3000:]}")
            if done < 2:
                pytest.fail(f"no 2 completed epochs within 300 s; log:\n{log.read_text()[-3000:]}")
            os.kill(child.pid, signal.SIGKILL)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert "FINISHED" not in log.read_text()

    before = read_json(out / "state.json")
    assert 2 <= len(before["history"]) < RESUME_EPOCHS and not before["finished"], before
    assert not (out / "metrics.json").exists()

    result = train("alexnet", data, json.loads(params_file.read_text()), run_dir, progress=False)
    return {"out": out, "before": before, "result": result}


@pytest.mark.train
def test_resume_after_kill_9_lists_every_epoch_once(resumed):
    out, before = resumed["out"], resumed["before"]
    completed = len(before["history"])
    assert not list(out.parent.glob("alexnet.stale-*")), "resume must not restart the run"
    history = history_of(out)
    assert sorted(history.columns) == sorted(HISTORY_COLUMNS)
    assert history["epoch"].tolist() == list(range(1, RESUME_EPOCHS + 1))
    # The epochs committed before the kill are kept as they were, not trained again.
    kept = pd.DataFrame(before["history"])[HISTORY_COLUMNS]
    pd.testing.assert_frame_equal(history[HISTORY_COLUMNS].iloc[:completed], kept,
                                  check_dtype=False, rtol=1e-12)
    assert pd.read_csv(out / "timing.csv")["epoch"].tolist() == list(range(1, RESUME_EPOCHS + 1))
    metrics = read_json(out / "metrics.json")
    assert metrics == resumed["result"]
    assert metrics["stopped_reason"] == "completed" and metrics["epochs_run"] == RESUME_EPOCHS
    assert not list(out.glob("checkpoint-*.keras"))
    assert keras.models.load_model(out / "best.keras") is not None


@pytest.mark.train
def test_tensorboard_logs_of_a_resumed_run_hold_every_epoch_once(resumed):
    """Read back with TensorBoard's own loader: each scalar has one value per epoch, equal to
    the run's history, although the run was killed and resumed; the confusion matrices of the
    best epoch and (on TensorFlow) the model graph are there too."""
    from collections import Counter

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ferlib import tensorboard_logs

    out = resumed["out"]
    scalars = tensorboard_logs.read_scalars(out)
    counts = Counter((tag, step) for tag, step, _ in scalars)
    assert set(counts.values()) == {1}, [key for key, n in counts.items() if n > 1]
    history = history_of(out)
    for tag, column in tensorboard_logs.SCALARS.items():
        logged = sorted((step, value) for name, step, value in scalars if name == tag)
        assert [step for step, _ in logged] == list(range(1, RESUME_EPOCHS + 1)), tag
        np.testing.assert_allclose([value for _, value in logged], history[column], rtol=1e-6)
    board = EventAccumulator(str(tensorboard_logs.log_dir(out)))
    board.Reload()
    images = board.Images("confusion_matrix/PublicTest")
    assert [image.step for image in images] == [read_json(out / "metrics.json")["best_epoch"]]
    assert board.Tags()["graph"] == (keras.backend.backend() == "tensorflow")


class _Died(BaseException):
    """Stands for a kill: not an Exception, so nothing in ferlib catches it."""


@pytest.mark.train
def test_an_epoch_committed_just_before_a_kill_gets_its_logs_on_resume(tmp_path, data,
                                                                        monkeypatch):
    from ferlib import tensorboard_logs

    writer = tensorboard_logs.log_epochs

    def dies_before_logging(model_dir, history, timing, only_missing=False):
        if not only_missing:
            raise _Died  # after the epoch's commit point, before its event file
        return writer(model_dir, history, timing, only_missing)

    monkeypatch.setattr(tensorboard_logs, "log_epochs", dies_before_logging)
    with pytest.raises(_Died):
        ferlib.train.train("alexnet", data, make_params(), tmp_path, progress=False)
    out = tmp_path / "models" / "alexnet"
    assert len(read_json(out / "state.json")["history"]) == 1
    assert not tensorboard_logs.epoch_file(out, 1).exists()
    monkeypatch.setattr(tensorboard_logs, "log_epochs", writer)
    ferlib.train.train("alexnet", data, make_params(), tmp_path, progress=False)
    steps = sorted(step for tag, step, _ in tensorboard_logs.read_scalars(out)
                   if tag == "loss/train")
    assert steps == [1, 2]


@pytest.mark.train
def test_resumed_history_keeps_the_column_order(resumed, trained):
    out = resumed["out"]
    assert list(history_of(out).columns) == HISTORY_COLUMNS
    fresh_timing = pd.read_csv(trained["out"] / "timing.csv")
    assert list(pd.read_csv(out / "timing.csv").columns) == list(fresh_timing.columns)


# ----------------------------------------------------------------------------- stopping

@pytest.mark.train
def test_budget_stops_after_one_epoch(tmp_path, data):
    params = make_params({"epochs": 5, "budget_minutes": 0.002})
    result = train("alexnet", data, params, tmp_path, progress=False)
    out = tmp_path / "models" / "alexnet"
    metrics = read_json(out / "metrics.json")
    assert metrics == result
    assert metrics["stopped_reason"] == "budget"
    assert metrics["epochs_run"] == 1 and metrics["budget_minutes"] == 0.002
    assert history_of(out)["epoch"].tolist() == [1]


@pytest.mark.train
def test_early_stopping_when_validation_stops_improving(tmp_path):
    # Black images: every image gets the same logits, so whichever class wins, validation
    # accuracy is that class's share (1/7, every class has 10 images) in every epoch. It never
    # improves after epoch 1, and patience 1 stops after epoch 2. (A learning rate of 0 is
    # rejected by the profile's ranges; a negligible one keeps the weights all but still.)
    data = synthetic_data(blank=True)
    params = make_params({"epochs": 5, "learning_rate": 1e-12, "early_stopping_patience": 1})
    result = train("alexnet", data, params, tmp_path, progress=False)
    out = tmp_path / "models" / "alexnet"
    assert read_json(out / "metrics.json") == result
    assert result["stopped_reason"] == "early_stopping"
    assert result["epochs_run"] == 2 and result["best_epoch"] == 1
    history = history_of(out)
    assert history["epoch"].tolist() == [1, 2]
    assert (history["learning_rate"] <= 1e-12).all()


# ----------------------------------------------------------------------------- schedule

def schedule(**overrides) -> dict:
    return validate({"train": {"learning_rate": 1e-3, "warmup_epochs": 1,
                               "min_learning_rate": 1e-5, **overrides}})["train"]


def test_learning_rate_warmup_then_cosine():
    train_settings = schedule()
    at = lambda step: learning_rate_at(step, 10, 5, train_settings)  # noqa: E731
    assert at(0) == pytest.approx(1e-4)     # (0 + 1) / 10 of the base
    assert at(4) == pytest.approx(5e-4)
    assert at(9) == pytest.approx(1e-3)
    assert at(10) == pytest.approx(1e-3)    # warm-up done: top of the cosine
    assert at(30) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # halfway through 40 steps
    assert at(50) == pytest.approx(1e-5)    # the end: min_learning_rate
    assert at(80) == pytest.approx(1e-5)    # past the plan stays at the floor
    steps = [at(step) for step in range(10, 51)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))


def test_learning_rate_without_warmup_plateau_and_constant():
    assert learning_rate_at(0, 10, 5, schedule(warmup_epochs=0)) == pytest.approx(1e-3)
    plateau = schedule(schedule="plateau")
    assert learning_rate_at(20, 10, 5, plateau, plateau_scale=0.25) == pytest.approx(2.5e-4)
    assert learning_rate_at(4, 10, 5, plateau, plateau_scale=0.25) == pytest.approx(5e-4)
    constant = schedule(schedule="constant", warmup_epochs=0)
    assert learning_rate_at(37, 10, 5, constant) == pytest.approx(1e-3)


# ----------------------------------------------------------------------------- randomness

def test_every_epoch_has_its_own_order_and_the_seed_fixes_them():
    first, second = epoch_order(500, seed=7, epoch=0), epoch_order(500, seed=7, epoch=1)
    assert sorted(first) == list(range(500))
    assert (first != second).mean() > 0.9
    np.testing.assert_array_equal(first, epoch_order(500, seed=7, epoch=0))
    assert (first != epoch_order(500, seed=8, epoch=0)).mean() > 0.9


def test_fit_sees_the_epoch_order(data, monkeypatch):
    images, labels = data.subset("train")
    onehot = keras.utils.to_categorical(labels, NUM_CLASSES).astype("float32")
    x0, _ = ferlib.train._batches(images, onehot, 32, {}, seed=3, epoch=0)
    x1, _ = ferlib.train._batches(images, onehot, 32, {}, seed=3, epoch=1)
    np.testing.assert_array_equal(x0, images[epoch_order(len(images), 3, 0)])
    assert not np.array_equal(x0, x1)


def test_augmentation_layers_draw_independently():
    flip, rotation, translation, zoom = augmentation_layers(
        {"flip": True, "rotation": 0.1, "translation": 0.1, "zoom": 0.1}, seed=42)
    batch = np.zeros((2000, 8, 8, 1), "float32")
    flipped = keras.ops.convert_to_numpy(
        flip.get_random_transformation(batch)["flips"]).reshape(-1).astype(float)
    angle = keras.ops.convert_to_numpy(
        rotation.get_random_transformation(batch)["angle"]).reshape(-1)
    zoom_factor = np.asarray(keras.ops.convert_to_numpy(
        zoom.get_random_transformation(batch)["height_zoom"])).reshape(-1)
    # With one shared seed: corr(flip, rotation) = -0.87 and corr(rotation, zoom) = 1.00.
    assert abs(np.corrcoef(flipped, angle)[0, 1]) < 0.1
    assert abs(np.corrcoef(angle, zoom_factor)[0, 1]) < 0.1
    assert len({layer.seed for layer in (flip, rotation, translation, zoom)}) == 4


def test_reseeding_sets_every_generator_from_seed_and_epoch():
    model = build_model("alexnet", augment={"flip": True, "rotation": 0.1}, seed=0,
                        **TINY_ALEXNET)
    states = lambda: [keras.ops.convert_to_numpy(v).tolist() for v in model.variables  # noqa
                      if v.path.endswith("seed_generator_state")]
    count = reseed_generators(model, seed=5, epoch=3)
    assert count == 4  # flip, rotation and the two dropout layers
    epoch3 = states()
    assert len({tuple(state) for state in epoch3}) == count  # no shared stream
    reseed_generators(model, seed=5, epoch=4)
    assert states() != epoch3
    reseed_generators(model, seed=5, epoch=3)
    assert states() == epoch3


@pytest.mark.train
def test_interrupted_deterministic_run_resumes_exactly(tmp_path, data, monkeypatch):
    """Stopped after epoch 2 and started again, a run gives the per-epoch losses of the run
    that was never interrupted: same orders, augmentations, dropout masks and optimizer."""
    params = make_params({"epochs": 4, "deterministic": True},
                         augment={"flip": True, "rotation": 0.05, "translation": 0.1})
    train("alexnet", data, params, tmp_path / "straight", progress=False)
    straight = history_of(tmp_path / "straight" / "models" / "alexnet")

    log_epoch = ferlib.train._log_epoch

    def interrupt_after_epoch_2(say, state, *args):
        log_epoch(say, state, *args)
        if len(state["history"]) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ferlib.train, "_log_epoch", interrupt_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train("alexnet", data, params, tmp_path / "interrupted", progress=False)
    monkeypatch.setattr(ferlib.train, "_log_epoch", log_epoch)
    keras.utils.set_random_seed(123)  # a new process would not share the global RNG state
    train("alexnet", data, params, tmp_path / "interrupted", progress=False)
    resumed = history_of(tmp_path / "interrupted" / "models" / "alexnet")
    assert resumed["epoch"].tolist() == [1, 2, 3, 4]
    columns = ["loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"]
    np.testing.assert_allclose(resumed[columns].to_numpy(), straight[columns].to_numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.train
def test_a_slow_first_epoch_does_not_change_the_plan(tmp_path, data, monkeypatch):
    """Profiles fix epochs: the cosine plan and the number of epochs trained do not depend
    on how fast the machine is (here the first epoch pretends to take 20 minutes)."""
    real_time = time.time
    clock = {"offset": 0.0, "fits": 0}
    fit = keras.Model.fit

    def slow_fit(self, *args, **kwargs):
        clock["fits"] += 1
        if clock["fits"] == 1:
            clock["offset"] += 1200.0
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", slow_fit)
    monkeypatch.setattr(ferlib.train.time, "time", lambda: real_time() + clock["offset"])
    result = train("alexnet", data, make_params({"epochs": 3}), tmp_path, progress=False)
    state = read_json(tmp_path / "models" / "alexnet" / "state.json")
    assert state["planned_epochs"] == 3 and result["epochs_run"] == 3
    assert result["stopped_reason"] == "completed"
    assert state["timing"][0]["seconds"] >= 1200


# ----------------------------------------------------------------------------- cross-validation

@pytest.mark.train
def test_train_cv_two_folds(tmp_path, data):
    params = make_params({"epochs": 1}, cv_folds=2)
    summary = train_cv("alexnet", data, params, tmp_path, progress=False)
    model_dir = tmp_path / "models" / "alexnet"
    folds = [read_json(model_dir / f"fold{k}" / "metrics.json") for k in (1, 2)]
    assert all(fold["stopped_reason"] == "completed" for fold in folds)
    assert read_json(model_dir / "cv_metrics.json") == json.loads(json.dumps(summary))
    assert summary["folds"] == 2
    accuracies = [fold["val"]["accuracy"] for fold in folds]
    assert summary["val"]["mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert summary["val"]["std"]["accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
    assert "accuracy" in summary["test"]["mean"] and "accuracy" in summary["test"]["std"]

    # The folds' validation sets split train+val between them; test stays PrivateTest.
    val_ids = []
    for k in (1, 2):
        with np.load(model_dir / f"fold{k}" / "predictions.npz") as predictions:
            val_ids.append(set(predictions["val_ids"].tolist()))
            np.testing.assert_array_equal(predictions["test_ids"],
                                          data.source_ids[data.split == "test"])
    assert not val_ids[0] & val_ids[1]
    assert val_ids[0] | val_ids[1] == set(data.source_ids[data.split != "test"].tolist())

    # Pooled out-of-fold predictions: each train+val image once, by the model that did not
    # train on it; PrivateTest gets every fold's probabilities and their mean.
    with np.load(model_dir / "cv_predictions.npz") as pooled:
        pooled = dict(pooled)
    pool = data.split != "test"
    np.testing.assert_array_equal(pooled["oof_ids"], data.source_ids[pool])
    np.testing.assert_array_equal(pooled["oof_labels"], data.labels[pool])
    for k in (1, 2):
        with np.load(model_dir / f"fold{k}" / "predictions.npz") as predictions:
            rows = np.isin(pooled["oof_ids"], predictions["val_ids"])
            np.testing.assert_allclose(pooled["oof_proba"][rows], predictions["val_proba"])
            assert (pooled["oof_fold"][rows] == k).all()
            np.testing.assert_allclose(pooled["fold_test_proba"][k - 1],
                                       predictions["test_proba"])
    np.testing.assert_allclose(pooled["test_proba"], pooled["fold_test_proba"].mean(axis=0))
    assert [row["fold"] for row in summary["per_fold"]] == [1, 2]
    assert summary["per_fold"][0]["val_accuracy"] == pytest.approx(accuracies[0])
    assert summary["oof"]["accuracy"] == pytest.approx(
        float((pooled["oof_proba"].argmax(1) == pooled["oof_labels"]).mean()))


# ----------------------------------------------------------------------------- MixUp / CutMix

def test_mixup_cutmix_batches_mix_labels(data):
    images, labels = data.subset("train")
    onehot = keras.utils.to_categorical(labels, NUM_CLASSES).astype("float32")
    batches, targets = ferlib.train._batches(images, onehot, 32, {"mixup": 1.0, "cutmix": 1.0},
                                             seed=0, epoch=0)
    assert targets is None and len(batches) == int(np.ceil(len(images) / 32))
    x, y = batches[0]
    assert x.dtype == np.uint8 and x.shape[1:3] == (48, 48) and len(x) == len(y) == 32
    assert x.shape[3:] in ((), (1,))  # what the models take
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)
    assert (y.max(axis=1) < 1 - 1e-6).any(), "MixUp / CutMix should mix the labels"


@pytest.mark.train
def test_mixup_cutmix_training_runs(tmp_path, data):
    params = make_params({"epochs": 1}, augment={"mixup": 1.0, "cutmix": 1.0})
    result = train("alexnet", data, params, tmp_path, progress=False)
    out = tmp_path / "models" / "alexnet"
    assert result["stopped_reason"] == "completed" and result["epochs_run"] == 1
    history = history_of(out)
    assert history["epoch"].tolist() == [1] and np.isfinite(history["loss"]).all()


# ----------------------------------------------------------------------------- profile runner, folds, devices

def write_challenge_csv(path: Path, data: FERData) -> Path:
    """``data`` as the challenge's ``emotion,pixels,Usage`` CSV (what FER2013_PATH may name)."""
    usage = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}
    rows = [f"{label},{' '.join(map(str, image.ravel()))},{usage[split]}"
            for image, label, split in zip(data.images, data.labels, data.split)]
    path.write_text("emotion,pixels,Usage\n" + "\n".join(rows) + "\n")
    return path


def cli_training(tmp_path: Path, epochs: int):
    """A tiny AlexNet-style profile on a generated challenge CSV, and the ``python -m ferlib
    train`` command and environment that train it: (profile, run_dir, model folder, command,
    env)."""
    csv = write_challenge_csv(tmp_path / "fer2013.csv", synthetic_data(per_split=(60, 10, 10)))
    profile = tmp_path / "tiny.yaml"
    profile.write_text(textwrap.dedent(f"""
        seed: 0
        models: [alexnet]
        train: {{epochs: {epochs}, batch_size: 16, learning_rate: 0.003, warmup_epochs: 0,
                 early_stopping_patience: null, tta: false}}
        model_params: {{alexnet: {{width: 0.25, dense_units: 16}}}}
    """))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "ferlib", "train", "--profile", str(profile),
               "--run-dir", str(run_dir)]
    env = {**os.environ, "FER2013_PATH": str(csv), "TF_CPP_MIN_LOG_LEVEL": "2",
           "FERLIB_CACHE": str(tmp_path / "cache")}
    return profile, run_dir, run_dir / "models" / "alexnet", command, env


@pytest.mark.train
def test_profile_runner_resumes_after_kill_mid_epoch(tmp_path):
    """``python -m ferlib train --profile P`` killed with SIGKILL during an epoch and started
    again continues from its last completed epoch: every epoch once in history.csv."""
    epochs = 8
    profile, run_dir, out, command, env = cli_training(tmp_path, epochs)
    log = tmp_path / "first.log"
    with open(log, "w") as handle:
        child = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=handle,
                                 stderr=subprocess.STDOUT)
        try:
            deadline, done = time.time() + 300, 0
            while time.time() < deadline and child.poll() is None and done < 2:
                try:
                    done = len(read_json(out / "state.json", {}).get("history", []))
                except json.JSONDecodeError:
                    pass
                time.sleep(0.02)
            assert child.poll() is None, f"finished before the kill:\n{log.read_text()[-2000:]}"
            os.kill(child.pid, signal.SIGKILL)  # during epoch 3 (or its checkpoint)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=60)
    killed_at = len(read_json(out / "state.json")["history"])
    assert 2 <= killed_at < epochs and not (out / "metrics.json").exists()

    second = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"resuming after epoch {killed_at}" in second.stdout
    assert history_of(out)["epoch"].tolist() == list(range(1, epochs + 1))
    assert read_json(out / "metrics.json")["epochs_run"] == epochs
    assert not list(out.parent.glob("alexnet.stale-*"))

    status = subprocess.run([sys.executable, "-m", "ferlib", "status", "--profile", str(profile),
                             "--run-dir", str(run_dir)], cwd=PROJECT_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert f"{epochs}/{epochs}" in status.stdout and "finished: epoch cap" in status.stdout


@pytest.mark.train
def test_cv_folds_can_train_separately_and_merge_when_all_are_done(tmp_path, data):
    params = make_params({"epochs": 1}, cv_folds=2)
    assert train_cv("alexnet", data, params, tmp_path, progress=False, folds=[2]) is None
    model_dir = tmp_path / "models" / "alexnet"
    assert (model_dir / "fold2" / "metrics.json").exists()
    assert not (model_dir / "fold1").exists() and not (model_dir / "cv_metrics.json").exists()
    summary = train_cv("alexnet", data, params, tmp_path, progress=False, folds=[1])
    assert summary["folds"] == 2 and (model_dir / "cv_metrics.json").exists()
    assert [row["fold"] for row in summary["per_fold"]] == [1, 2]
    # fold 2 was not trained again by the second call
    assert read_json(model_dir / "fold2" / "state.json")["finished"]
    with pytest.raises(ValueError, match="fold: 3 is not one of the 2 folds"):
        train_cv("alexnet", data, params, tmp_path, progress=False, folds=[3])


def test_distribution_on_tensorflow_is_one_device_or_a_clear_error():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("checks the TensorFlow backend")
    assert ferlib.train.resolve_distribution("none")["mode"] == "none"
    assert ferlib.train.resolve_distribution("auto")["mode"] == "none"
    with pytest.raises(ValueError, match="data_parallel needs KERAS_BACKEND=jax"):
        ferlib.train.resolve_distribution("data_parallel")


def test_data_parallel_batches_drop_only_the_incomplete_last_batch(data):
    images, onehot = data.images[:100], np.eye(NUM_CLASSES, dtype="float32")[data.labels[:100]]
    x, _ = ferlib.train._batches(images, onehot, 32, {}, seed=1, epoch=0, drop_remainder=True)
    assert len(x) == 96
    full, _ = ferlib.train._batches(images, onehot, 32, {}, seed=1, epoch=0)
    np.testing.assert_array_equal(x, full[:96])  # same order, the tail left out
    other, _ = ferlib.train._batches(images, onehot, 32, {}, seed=1, epoch=1, drop_remainder=True)
    assert not np.array_equal(np.sort(x.reshape(96, -1), 0), np.sort(other.reshape(96, -1), 0))


def _tiny_compiled(train_settings):
    from ferlib.config import load_params, model_settings
    from ferlib.train import build_for_settings, compile_model

    params = load_params("smoke")
    settings = model_settings(params, "alexnet")
    settings["model_params"] = {"width": 0.25, "dense_units": 16}
    settings["train"].update(train_settings)
    model = build_for_settings(settings)
    compile_model(model, settings)
    return model


def test_weight_averaging_keeps_training_the_raw_weights_and_scores_the_average(data):
    """With ``ema_momentum`` the optimizer keeps an average; Keras' end-of-fit overwrite is
    disabled (ferlib fits once per epoch), and ``averaged_weights`` swaps it in and back."""
    from ferlib.train import averaged_weights

    model = _tiny_compiled({"ema_momentum": 0.5, "optimizer": "adamw"})
    x, y = data.subset("train")
    onehot = keras.utils.to_categorical(y, NUM_CLASSES)
    for _ in range(2):
        model.fit(x, onehot, epochs=1, batch_size=32, verbose=0)
    kernel = model.trainable_variables[0]
    index = [v.path for v in model.optimizer._trainable_variables].index(kernel.path)
    average = keras.ops.convert_to_numpy(model.optimizer._model_variables_moving_average[index])
    raw = keras.ops.convert_to_numpy(kernel)
    assert not np.allclose(raw, average)  # fit did not reset the weights to their average
    with averaged_weights(model):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(kernel), average)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(kernel), raw)


def test_no_decay_on_biases_and_norms_survives_a_checkpoint(tmp_path, data):
    model = _tiny_compiled({"decay_all_weights": False, "weight_decay": 0.05})
    x, y = data.subset("train")
    model.fit(x, keras.utils.to_categorical(y, NUM_CLASSES), epochs=1, batch_size=32, verbose=0)
    model.save(tmp_path / "checkpoint.keras")
    from ferlib.train import _optimizers

    _optimizers()
    loaded = keras.models.load_model(tmp_path / "checkpoint.keras")
    def as_the_optimizer_sees_it(variable):  # TensorFlow's: "conv1_bn/gamma:0"
        return variable.value if keras.backend.backend() == "tensorflow" else variable

    for network in (model, loaded):
        decayed = {(v.name, network.optimizer._use_weight_decay(as_the_optimizer_sees_it(v)))
                   for v in network.trainable_variables}
        assert ("kernel", True) in decayed and ("bias", False) in decayed
        assert ("gamma", False) in decayed and ("bias", True) not in decayed


@pytest.mark.train
def test_ten_crop_tta_is_chosen_on_publictest_and_reported_apart(tmp_path, data):
    result = ferlib.train.train("alexnet", data, make_params({"tta": True, "tta_crops": 8}),
                                tmp_path, progress=False)
    choice = result["tta_choice"]
    assert set(choice["publictest_accuracy"]) == {"flip", "flip+8 crops"}
    best = max(choice["publictest_accuracy"].values())
    assert choice["publictest_accuracy"][choice["chosen"]] == best
    assert "test_tta" in result and "test" in result  # the plain score stays beside it
