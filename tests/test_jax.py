"""The study under Keras' JAX backend (what a GPU machine without TensorFlow runs), on CPU:

- data-parallel training (``train.distribution: data_parallel``) over 2 virtual CPU devices
  gives the same first epoch as one device;
- a model trained under TensorFlow is evaluated and used for prediction under JAX with the same
  numbers (``.keras`` files load across backends);
- the whole smoke pipeline (training, evaluation, reports, predict) passes under JAX.

Each case runs in a subprocess with ``KERAS_BACKEND=jax`` (the backend is fixed when Keras is
first imported). Marked ``jax``; skipped when JAX is not installed (``pip install -e .[jax]``).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ferlib import PROJECT_ROOT

from conftest import make_fer_folder

pytest.importorskip("jax")
pytestmark = [pytest.mark.jax]

TESTS = Path(__file__).resolve().parent
DEVICES = 2
TRAINED_LOSS_TOLERANCE = 1e-2  # relative, after 7 Adam steps (see the data-parallel test)


def run_jax(args, *, devices: int = 1, timeout: int = 900, env=None, retries: int = 3):
    """Run ``python args`` under the JAX backend with ``devices`` virtual CPU devices.

    XLA's in-process CPU collectives occasionally miss their 40 s rendezvous on a loaded
    2-core machine and abort the process (seen in several runs while a training shared the
    cores, not on a quiet machine); such a run is retried up to ``retries`` times and reported
    if every try fails: as a failure on a quiet machine, as an expected failure (xfail, with
    the load) when other work kept every core busy at each try."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2",
           "MPLBACKEND": "Agg", **(env or {})}
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    loads = []
    for attempt in range(retries + 1):
        loads.append(os.getloadavg()[0])
        done = subprocess.run([sys.executable, *args], cwd=PROJECT_ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0 or "rendezvous" not in done.stderr:
            return done
    cores = os.cpu_count() or 1
    if devices > 1 and min(loads) >= cores:
        # Measured: with another process busy on both cores the collective deadlocks
        # (a 600 s limit did not help); the same test passes in under a minute once that
        # process is paused. A quiet machine (CI) still fails the test on this abort.
        pytest.xfail(f"XLA's CPU collectives aborted at the rendezvous in all {retries + 1} "
                     f"tries while other work kept the {cores} cores busy (load average "
                     f"{min(loads):.1f} or more); this test needs a quiet machine")
    return done


def check(done) -> str:
    assert done.returncode == 0, (f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\n"
                                  f"stderr:\n{done.stderr[-3000:]}")
    return done.stdout


DATA_PARALLEL_SCRIPT = textwrap.dedent(f"""
    import json, sys
    sys.path.insert(0, {str(TESTS)!r})
    import keras
    import pandas as pd
    from test_train import make_params, synthetic_data
    from ferlib.train import train

    assert keras.backend.backend() == "jax"
    run_root = sys.argv[1]
    data = synthetic_data(per_split=(32, 8, 8))   # 224 training images: 7 batches of 32
    result = {{}}
    for mode in ("none", "data_parallel"):
        for name, settings in (("trained", {{"epochs": 2, "warmup_epochs": 1}}),
                               ("frozen", {{"epochs": 1, "warmup_epochs": 0,
                                           "learning_rate": 1e-12}})):
            # no dropout, no augmentation: both runs then do the same arithmetic
            params = make_params({{**settings, "deterministic": True, "distribution": mode}},
                                 augment={{"flip": False}})
            params["model_params"]["alexnet"]["dropout_rate"] = 0.0
            out = f"{{run_root}}/{{mode}}-{{name}}"
            metrics = train("alexnet", data, params, out, progress=False)
            history = pd.read_csv(f"{{out}}/models/alexnet/history.csv")
            result[f"{{mode}}-{{name}}"] = {{"distribution": metrics["distribution"],
                                          "loss": history["loss"].tolist(),
                                          "learning_rate": history["learning_rate"].tolist(),
                                          "val_loss": history["val_loss"].tolist()}}
    print("RESULT" + json.dumps(result))
""")


def test_data_parallel_first_epoch_matches_one_device(tmp_path):
    script = tmp_path / "data_parallel.py"
    script.write_text(DATA_PARALLEL_SCRIPT)
    out = check(run_jax([str(script), str(tmp_path)], devices=DEVICES, timeout=600))
    result = json.loads(out.split("RESULT", 1)[1])
    one, parallel = result["none-trained"], result["data_parallel-trained"]
    assert one["distribution"]["mode"] == "none"
    assert parallel["distribution"] == {"mode": "data_parallel", "devices": DEVICES,
                                        "global_batch_size": 32, "per_device_batch_size": 16,
                                        "learning_rate": 3e-3}
    # With the weights frozen (learning rate 1e-12), the two runs compute the same losses:
    # the same batches, batch norm over the global batch, only the reduction order differs.
    frozen_one, frozen_parallel = result["none-frozen"], result["data_parallel-frozen"]
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(frozen_parallel[key], frozen_one[key], rtol=1e-6)
    # Training, those last-bit differences grow: Adam divides each gradient by its running
    # scale, so a weight whose gradient is ~0 moves by up to the learning rate either way
    # (measured relative gaps after 7 steps: 4e-4 under jax 0.10.2, 2e-3 under 0.10.1).
    np.testing.assert_allclose(parallel["loss"][0], one["loss"][0], rtol=TRAINED_LOSS_TOLERANCE)
    np.testing.assert_allclose(parallel["val_loss"][0], one["val_loss"][0],
                               rtol=TRAINED_LOSS_TOLERANCE)
    # The per-step schedule reaches JAX's training state: warm-up ends at the base rate at the
    # end of epoch 1, and the cosine has decayed by the end of epoch 2.
    for run in (one, parallel):
        assert run["learning_rate"][0] == pytest.approx(3e-3, rel=1e-6)
        assert run["learning_rate"][1] < 3e-4


def test_model_trained_under_tensorflow_gives_the_same_numbers_under_jax(tmp_path):
    """evaluate and predict load a TensorFlow-trained .keras file under JAX: metrics agree to
    1e-4, probabilities too."""
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("trains the model under TensorFlow")
    from PIL import Image

    from ferlib.models import build_model

    data = make_fer_folder(tmp_path / "faces", per_split={"PrivateTest": ("test", 6)})
    model = build_model("alexnet", width=0.25, dense_units=16, augment={"flip": True}, seed=0)
    model.compile("adam", keras.losses.CategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    model.fit(rng.integers(0, 256, (64, 48, 48, 1), dtype=np.uint8),
              np.eye(7)[rng.integers(0, 7, 64)], epochs=1, verbose=0)
    model_file = tmp_path / "model.keras"
    model.save(model_file)
    face = tmp_path / "face.png"
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(face)

    numbers = {}
    for backend in ("tensorflow", "jax"):
        out = tmp_path / backend
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        for command in (["evaluate", "--model", str(model_file), "--data", str(data),
                         "--out", str(out), "--bootstrap", "50"],
                        ["predict", str(face), "--model", str(model_file), "--no-detect",
                         "--json", "--top", "7"]):
            done = subprocess.run([sys.executable, "-m", "ferlib", *command], cwd=PROJECT_ROOT,
                                  env=env, capture_output=True, text=True, timeout=300)
            check(done)
        evaluation = json.loads((out / "metrics.json").read_text())
        emotions = json.loads(done.stdout)[0]["faces"][0]["emotions"]
        numbers[backend] = (evaluation, {e["emotion"]: e["probability"] for e in emotions})
    (tf_eval, tf_proba), (jax_eval, jax_proba) = numbers["tensorflow"], numbers["jax"]
    tf_scores, jax_scores = tf_eval["confidence_intervals"], jax_eval["confidence_intervals"]
    assert tf_scores.keys() == jax_scores.keys() and "f1_macro" in tf_scores
    for name, interval in tf_scores.items():
        for key, value in interval.items():
            if value is not None:
                assert jax_scores[name][key] == pytest.approx(value, abs=1e-4), (name, key)
    assert jax_proba.keys() == tf_proba.keys()
    for emotion, probability in tf_proba.items():
        assert jax_proba[emotion] == pytest.approx(probability, abs=1e-4), emotion


COMPILED_STEP_SCRIPT = textwrap.dedent(f"""
    import json, sys, warnings
    sys.path.insert(0, {str(TESTS)!r})
    import keras
    import numpy as np
    from test_train import make_params
    from ferlib.config import model_settings
    from ferlib.train import compile_model, build_for_settings

    warnings.simplefilter("error", UserWarning)  # Keras warns when it falls back to eager
    params = make_params({{}}, augment={{"flip": True, "rotation": 0.05, "translation": 0.1,
                                        "zoom": 0.1}})
    settings = model_settings(params, "alexnet")
    model = build_for_settings(settings)
    compile_model(model, settings)
    generators = [layer.generator for layer in model._flatten_layers()
                  if hasattr(layer, "generator")]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 48, 48, 1), dtype=np.uint8)
    labels = np.eye(7, dtype="float32")[rng.integers(0, 7, 48)]
    states = [[int(np.asarray(g.state.value)[1]) for g in generators]]
    for _ in range(2):
        model.fit(images, labels, batch_size=16, epochs=1, verbose=0)   # 3 steps
        states.append([int(np.asarray(g.state.value)[1]) for g in generators])
    print("RESULT" + json.dumps({{"jit": bool(model.jit_compile),
                                 "jit_setting": settings["train"]["jit_compile"],
                                 "layers": len(generators), "states": states}}))
""")


def test_train_step_is_compiled_and_augmentation_stays_random(tmp_path):
    """Under JAX the train step is compiled (Keras would run it op by op for jit_compile=False
    or for a layer that declares supports_jit=False, as its random rotation, translation and
    zoom do), and every compiled step still draws new augmentation: each layer's seed state
    advances with each step, across epochs."""
    script = tmp_path / "compiled_step.py"
    script.write_text(COMPILED_STEP_SCRIPT)
    result = json.loads(check(run_jax([str(script)], timeout=600)).split("RESULT", 1)[1])
    assert result["jit"] is True and result["jit_setting"] is True
    assert result["layers"] >= 4   # flip, rotation, translation, zoom
    start, first, second = (np.array(states) for states in result["states"])
    steps = 3
    assert np.all(first > start) and np.all(second > first)
    assert np.array_equal(second - first, first - start)   # the same draws per epoch
    assert np.all((first - start) % steps == 0)            # a whole number of draws per step


# AlexNet-style and the plain ViT train, resume and load under JAX in test_gpu_study.py; here
# the other two models, so every model runs under JAX once and the pipeline costs half.
JAX_SMOKE_MODELS = ("resnet50v2", "vit_conv")


@pytest.mark.slow
def test_smoke_pipeline_under_jax(tmp_path):
    data = make_fer_folder(tmp_path / "fer2013")
    done = run_jax(["-m", "ferlib", "report", "--profile", "smoke",
                    "--set", f"models=[{','.join(JAX_SMOKE_MODELS)}]",
                    "--runs-root", str(tmp_path / "runs"),
                    "--reports-root", str(tmp_path / "reports")],
                   env={"FER2013_PATH": str(data), "FERLIB_CACHE": str(tmp_path / "cache")},
                   timeout=1500, retries=0)
    check(done)
    reports = tmp_path / "reports" / "smoke"
    for page in ("index", "01_eda", "02_preprocess", *(f"03_train_{name}" for name in
                                                      JAX_SMOKE_MODELS), "04_compare", "05_cross"):
        assert (reports / f"{page}.html").exists(), page
    run = tmp_path / "runs" / "smoke"
    for name in JAX_SMOKE_MODELS:
        metrics = json.loads((run / "models" / name / "metrics.json").read_text())
        assert "on jax" in metrics["machine"] and "accuracy" in metrics["test"]
    assert "jax" in (reports / "index.html").read_text().lower()
    assert "Traceback" not in "".join(p.read_text() for p in reports.glob("*.html"))
