"""Shared test helpers."""

from pathlib import Path

import numpy as np
from PIL import Image

import json

import pytest

from ferlib import EMOTIONS

TEMPERATURE = 2.0
"""The temperature in the calibration.json of ``trained_model``."""


@pytest.fixture(scope="session", autouse=True)
def training_code_of_the_real_functions():
    """Fingerprint the training code once, before any test replaces a training function.

    ``ferlib.train.training_code`` is computed once per process and is part of every training's
    key. Were it first computed while a test had monkeypatched ``train`` (to make it fail), every
    later training in this pytest process would carry that fingerprint, and a child process
    resuming one of them would find it stale and start over."""
    from ferlib.train import training_code

    training_code()


def make_fer_folder(root: Path, per_split=None, seed: int = 0) -> Path:
    """A small FER-style image folder (``train/<emotion>/``, ``test/<emotion>/``) with the
    official split in the file names and a class-specific bright band a tiny model learns."""
    rng = np.random.default_rng(seed)
    counts = per_split or {"Training": ("train", 24), "PublicTest": ("test", 8),
                           "PrivateTest": ("test", 8)}
    for prefix, (folder, per_class) in counts.items():
        for label, emotion in enumerate(EMOTIONS):
            directory = root / folder / emotion
            directory.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                image = rng.integers(0, 60, (48, 48)).astype(np.uint8)
                image[6 * label:6 * label + 8, 10:38] = 220  # a class-specific bright band
                Image.fromarray(image).save(directory / f"{prefix}_{label}{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    """runs/demo/models/alexnet/best.keras with calibration.json, settings.json and the run's
    manifest.json, as ferlib.train and the report pipeline leave them."""
    import keras

    from ferlib.models import build_model

    keras.utils.set_random_seed(3)
    run = tmp_path_factory.mktemp("runs") / "demo"
    folder = run / "models" / "alexnet"
    folder.mkdir(parents=True)
    model = build_model("alexnet", width=0.25, dense_units=16,
                        augment={"flip": True, "rotation": 0.05, "zoom": 0.1}, seed=1)
    model.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 48, 48, 1), dtype=np.uint8)
    labels = keras.utils.to_categorical(rng.integers(0, 7, 64), 7)
    model.fit(images, labels, batch_size=16, epochs=1, verbose=0)
    path = folder / "best.keras"
    model.save(path)
    (folder / "calibration.json").write_text(json.dumps({"temperature": TEMPERATURE}))
    (folder / "settings.json").write_text(json.dumps({"model": "alexnet"}))
    (folder / "state.json").write_text(json.dumps({"history": [{}, {}, {}]}))
    (run / "manifest.json").write_text(json.dumps({
        "profile": "demo", "data": {"sha256": "ab" * 32},
        "provenance": {"dataset": "fer2013.zip", "git_commit": "c0ffee", "git_dirty": False}}))
    return path
