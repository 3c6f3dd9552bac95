"""Tests for ferlib.finetune (``python -m ferlib finetune``): a tiny AlexNet-style model trained
for one epoch on synthetic FER data is fine-tuned on a generated 3-class folder (happy, sad and
a class FER2013 lacks, so a new head) with a frozen phase; the run is killed with ``kill -9``
mid-way and resumed, and the folder it leaves works with evaluate, predict and export. Bad
input gives one line and exit code 2."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ferlib import PROJECT_ROOT
from ferlib.__main__ import main
from ferlib.config import validate
from ferlib.data import FERData
from ferlib.runs import read_json

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

CLASSES = ("happy", "sad", "pain")
PER_CLASS = 16
TUNED_EPOCHS = 3


def band_images(rng, label, count):
    """Noise with a bright band at a height of its own per class (a tiny model learns it)."""
    batch = rng.normal(70, 25, (count, 48, 48))
    batch[:, 3 + 6 * label:8 + 6 * label, 4:44] += 140
    return np.clip(np.rint(batch), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 1-epoch tiny AlexNet-style model from ferlib.train (settings.json beside it)."""
    from ferlib.train import train

    rng = np.random.default_rng(0)
    images, labels, split = [], [], []
    for name, count in (("train", 12), ("val", 4), ("test", 4)):
        for label in range(7):
            images.append(band_images(rng, label, count))
            labels += [label] * count
            split += [name] * count
    data = FERData(images=np.concatenate(images), labels=np.array(labels), split=np.array(split),
                   source_ids=np.array([f"row{i}" for i in range(len(labels))]),
                   source="synthetic.csv", source_hash="synthetic-finetune")
    params = validate({"seed": 0, "models": ["alexnet"],
                       "train": {"epochs": 1, "batch_size": 16, "learning_rate": 3e-3,
                                 "warmup_epochs": 0, "early_stopping_patience": None,
                                 "tta": False},
                       "augment": {"flip": False},
                       "model_params": {"alexnet": {"width": 0.25, "dense_units": 16}}})
    run = tmp_path_factory.mktemp("source")
    train("alexnet", data, params, run, progress=False)
    return run / "models" / "alexnet" / "best.keras"


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """<class>/*.png (60x60 RGB, the band at a class's height) and one unreadable file."""
    root = tmp_path_factory.mktemp("faces") / "my_faces"
    rng = np.random.default_rng(1)
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        # the source model's rows for happy (3) and sad (4) fit these bands' heights
        for index, image in enumerate(band_images(rng, (3, 4, 6)[label], PER_CLASS)):
            Image.fromarray(image).convert("RGB").resize((60, 60)).save(folder / f"{index}.png")
    (root / "sad" / "broken.jpg").write_bytes(b"not an image")
    return root


SCRIPT = textwrap.dedent("""
    import sys, time

    import keras

    import ferlib.train
    from ferlib.__main__ import main

    ferlib.train.training_code()  # fingerprinted as it is, not with the slowing wrapper
    make_callbacks = ferlib.train._make_callbacks

    class Slow(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(0.4)

    ferlib.train._make_callbacks = lambda *a, **k: [*make_callbacks(*a, **k), Slow()]
    sys.exit(main(sys.argv[1:]))
""")


def finetune_args(model, data, out, *extra):
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out),
            "--epochs", str(TUNED_EPOCHS), "--freeze-epochs", "1", "--batch-size", "8",
            "--val-fraction", "0.25", "--test-fraction", "0.25", *extra]


@pytest.fixture(scope="module")
def finetuned(source, faces, tmp_path_factory):
    """The fine-tune run in a subprocess, killed with SIGKILL after the frozen phase and one
    epoch of the tuned phase, then the same command again in this process (it resumes)."""
    tmp = tmp_path_factory.mktemp("finetune")
    out = tmp / "out"
    tuned_state = out / "work" / "models" / "alexnet" / "tuned" / "state.json"
    (tmp / "slow.py").write_text(SCRIPT)
    log = tmp / "child.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as handle:
        child = subprocess.Popen([sys.executable, str(tmp / "slow.py"),
                                  *finetune_args(source, faces, out)], cwd=PROJECT_ROOT,
                                 env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            deadline, done = time.time() + 240, 0
            while time.time() < deadline and child.poll() is None and done < 1:
                try:
                    done = len(read_json(tuned_state, {}).get("history", []))
                except json.JSONDecodeError:
                    pass
                time.sleep(0.05)
            assert child.poll() is None, f"ended before the kill:\n{log.read_text()[-3000:]}"
            os.kill(child.pid, signal.SIGKILL)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=60)
    killed = read_json(tuned_state)
    assert 1 <= len(killed["history"]) < TUNED_EPOCHS and not killed["finished"]
    assert not (out / "best.keras").exists()
    return {"out": out, "killed_after": len(killed["history"]), "child_log": log.read_text()}


@pytest.fixture(scope="module")
def resumed(finetuned, source, faces):
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(finetune_args(source, faces, finetuned["out"]))
    assert code == 0, printed.getvalue()
    return {**finetuned, "printed": printed.getvalue()}


@pytest.mark.train
def test_finetune_resumes_after_kill_9_and_says_which_head(resumed):
    out, printed = resumed["out"], resumed["printed"]
    assert printed.startswith("new head: 3 outputs (happy, sad, pain), rows of happy, sad "
                              "started from the source's")
    assert "already trained" in printed  # the frozen phase finished before the kill
    assert f"resuming after epoch {resumed['killed_after']}" in printed
    history = pd.read_csv(out / "history.csv")
    assert history["phase"].tolist()[0] == "frozen"
    tuned = history[history["phase"] == "tuned"]
    assert len(tuned) == read_json(out / "metrics.json")["epochs_run"] <= TUNED_EPOCHS
    assert history["epoch"].tolist() == list(range(1, len(history) + 1))  # each epoch once
    record = read_json(out / "finetune.json")
    assert record["head"]["same_head"] is False and record["head_classes"] == list(CLASSES)
    assert record["data"]["skipped"] == 1  # broken.jpg: counted, not fatal
    assert "slice" in record["splits"]["val"] and "slice" in record["splits"]["test"]
    per_class = record["data"]["per_class"]
    assert all(per_class[name]["test"] == 4 and per_class[name]["val"] == 4 for name in CLASSES)
    # the test split is scored once: by the tuned phase only (the frozen phase never sees it)
    ledger = read_json(out / "work" / "privatetest_scorings.json")
    assert [entry["part"] for entry in ledger] == ["tuned"]
    assert record["baseline"]["accuracy"] is None and "pain" in record["baseline"]["note"]


@pytest.mark.train
def test_finetuned_folder_works_with_evaluate_predict_and_export(resumed, faces, tmp_path,
                                                                 capsys):
    model = resumed["out"] / "best.keras"
    assert json.loads((resumed["out"] / "classes.json").read_text()) == list(CLASSES)
    assert main(["evaluate", "--model", str(model), "--data", str(faces), "--out",
                 str(tmp_path / "evaluation"), "--bootstrap", "50"]) == 0
    evaluation = read_json(tmp_path / "evaluation" / "metrics.json")
    assert evaluation["classes"] == list(CLASSES) and evaluation["images"] == 3 * PER_CLASS
    assert evaluation["temperature"] == read_json(resumed["out"] / "calibration.json")[
        "temperature"]
    capsys.readouterr()
    assert main(["predict", str(faces / "pain" / "0.png"), "--model", str(model),
                 "--no-detect", "--json"]) == 0
    [prediction] = json.loads(capsys.readouterr().out)
    assert {e["emotion"] for e in prediction["faces"][0]["emotions"]} == set(CLASSES)
    exported = tmp_path / "exported"
    assert main(["export", "--model", str(model), "--format", "saved_model", "--out",
                 str(exported), "--synthetic", "--images", "32"]) == 0
    labels = read_json(exported / "labels.json")
    assert labels["parity"]["passed"] and labels["emotions"] == list(CLASSES)
    assert labels["output"]["shape"] == [None, 3]
    assert (exported / "MODEL_CARD.md").read_text() == (
        resumed["out"] / "MODEL_CARD.md").read_text()


@pytest.mark.train
def test_finetune_report_page(resumed):
    page = (resumed["out"] / "report.html").read_text()
    assert page.count("<img") == 2 and "data:image/png;base64," in page
    assert "new head: 3 outputs (happy, sad, pain)" in page
    assert "not applicable: the source model has no output for pain" in page
    assert "ferlib-provenance" in page and str(resumed["out"]) not in page
    accuracy = read_json(resumed["out"] / "metrics.json")["test"]["accuracy"]
    assert f"<td>{accuracy:.3f}</td>" in page
    card = (resumed["out"] / "MODEL_CARD.md").read_text()
    assert "(fine-tuned)" in card and f"| accuracy | {accuracy:.3f} [" in card


def test_a_same_head_plan_and_its_baseline_classes():
    from ferlib import EMOTIONS
    from ferlib.finetune import plan_head

    found = {name: [name] for name in EMOTIONS}
    assert plan_head(found, EMOTIONS)["message"].startswith("same head")
    subset = {"happy": ["Joy"], "sad": ["sad"]}
    kept = plan_head(subset, EMOTIONS, keep_head=True)
    assert kept["classes"] == EMOTIONS and "angry" in kept["message"]
    assert plan_head(subset, EMOTIONS)["classes"] == ("happy", "sad")


@pytest.mark.parametrize("layout, extra, message", [
    ({"happy": 6}, (), "one class only (happy)"),
    ({"pain": 6, "relief": 6}, ("--keep-head",), "--keep-head: no class in common"),
    ({"happy": 6, "sad": 2}, (), "class 'sad' has 2 image(s) to share"),
    ({"happy": 6, "sad": 6}, ("--classes", "happy,fear"), "--classes: fear not in the dataset"),
])
def test_bad_input_is_one_line_and_exit_code_2(source, tmp_path, capsys, layout, extra,
                                               message):
    for name, count in layout.items():
        (tmp_path / "data" / name).mkdir(parents=True)
        for index in range(count):
            Image.new("L", (48, 48), 30 * index).save(tmp_path / "data" / name / f"{index}.png")
    code = main(["finetune", "--model", str(source), "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "out"), *extra])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("error: ") and error.count("\n") == 1, error
    assert message in error
    assert not (tmp_path / "out").exists()
