"""The benchmarks' harness and registry, without running a benchmark: run_all registers every
``bench_*.py``, the scripts use ferlib's public names only, the shared child-process and
random-data helpers, pausing a running training, and the plain PyTorch twins of ferlib's
networks."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS_DIR))
import common  # noqa: E402  (benchmarks/common.py)

linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _state(pid: int, expect: str = "TSR") -> str:
    """The one-letter process state from /proc (T = stopped), after waiting up to 5 s for one
    of ``expect`` (signals are delivered asynchronously)."""
    deadline = time.monotonic() + 5
    while True:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in expect or time.monotonic() > deadline:
            return state
        time.sleep(0.01)


@pytest.fixture
def fake_training():
    """A sleeping process whose command line reads like ``python ... -m ferlib train``."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                "-m", "ferlib", "train"])
    deadline = time.monotonic() + 10
    while process.pid not in common.training_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield process
    process.kill()
    process.wait()


@pytest.mark.train
@linux_only
def test_training_pids_finds_a_ferlib_training(fake_training):
    assert fake_training.pid in common.training_pids()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "ferlib"])
    try:
        time.sleep(0.3)
        assert other.pid not in common.training_pids()
    finally:
        other.kill()
        other.wait()


@pytest.mark.train
@linux_only
def test_paused_training_stops_then_resumes_even_on_error(fake_training):
    pid = fake_training.pid
    with common.paused_training(settle_seconds=0, pids=[pid]) as paused:
        assert paused == [pid]
        assert _state(pid, "T") == "T"
    assert _state(pid, "SR") in "SR"
    with pytest.raises(KeyboardInterrupt):
        with common.paused_training(settle_seconds=0, pids=[pid]):
            assert _state(pid, "T") == "T"
            raise KeyboardInterrupt
    assert _state(pid, "SR") in "SR"
    with common.paused_training(enabled=False, pids=[pid]) as paused:
        assert paused == [] and _state(pid, "SR") in "SR"
    load = common.machine_load([pid])
    assert load["paused_training_pids"] == [pid] and "paused" in load["note"]


@pytest.mark.parametrize("name", ["alexnet", "resnet50v2", "vit"])
def test_torch_twins_match_ferlib_networks(name):
    """The PyTorch twins train the same networks: same trainable parameters, same output."""
    torch = pytest.importorskip("torch", reason="PyTorch is optional (benchmarks only)")
    import keras
    import numpy as np
    import torch_models

    from ferlib.config import load_params, model_settings
    from ferlib.train import build_for_settings

    settings = model_settings(load_params("full"), name)
    keras_model = build_for_settings(settings)
    trainable = int(sum(np.prod(v.shape) for v in keras_model.trainable_variables))
    twin = torch_models.build(name, settings["model_params"])
    assert torch_models.parameter_count(twin) == trainable
    assert tuple(twin.eval()(torch.zeros(2, 3, 48, 48)).shape) == (2, 7)
    keras.backend.clear_session()


def test_gpu_benchmark_keeps_order_budget_and_errors(tmp_path, monkeypatch, capsys):
    """bench_gpu measures cases in order until its budget is spent, skips bfloat16 off GPUs,
    records a failing case (out of memory, say) without losing the rest, and rewrites its
    results file after each case."""
    import bench_gpu

    calls = []

    def measure(profile, model, overrides, precision, repeats):
        calls.append((profile, model, precision))
        if model == "resnet50v2":
            raise MemoryError("out of memory")
        return {"images_per_second": 100.0, "training_epoch_seconds": 287.1, "epoch_cap": 30,
                "hours_at_cap": 2.4, "first_fit_seconds": 1.0}

    monkeypatch.setattr(bench_gpu, "measure", measure)
    monkeypatch.setattr(bench_gpu, "accelerator", lambda: "cpu")
    output = tmp_path / "gpu.json"
    section = bench_gpu.run(quick=True, results_file=output)
    assert calls == [("smoke", name, "float32") for name in ("alexnet", "resnet50v2", "vit")]
    assert [row.get("error") for row in section["rows"]] == [
        None, "MemoryError: out of memory", None]
    assert {case["why"] for case in section["skipped"]} == {"bfloat16 is measured on GPUs only"}
    written = common.read_section("gpu", quick=True, output=output)
    assert len(written["rows"]) == 3 and written["device"] == "cpu"

    bench_gpu.print_row({**section["rows"][0], "jit_compile": False})
    assert "jit_compile off" in capsys.readouterr().out  # an uncompiled JAX step is named

    calls.clear()
    monkeypatch.setattr(bench_gpu, "accelerator", lambda: "gpu: test")
    section = bench_gpu.run(quick=True, results_file=output, budget_seconds=0)
    assert calls == [] and len(section["skipped"]) == len(bench_gpu.QUICK_CASES)
    assert section["budget_seconds"] == 0


# ----------------------------------------------------------------------------- registry

def test_run_all_registers_every_benchmark_script():
    """A new bench_*.py cannot be forgotten: run_all runs each one (or says why it skips it),
    and each has the interface run_all calls."""
    import run_all

    scripts = sorted(path.name for path in BENCHMARKS_DIR.glob("bench_*.py"))
    registered = sorted(Path(module.__file__).name for module in run_all.BENCHMARKS.values())
    missing = sorted(set(scripts) - set(registered))
    assert not missing, f"add to run_all.BENCHMARKS (with a SKIP_UNLESS reason if need be): " \
                        f"{missing}"
    assert registered == scripts
    for name, module in run_all.BENCHMARKS.items():
        assert module.NAME == name
        inspect.signature(module.run).bind(quick=True, context={})  # run_all's call
        assert callable(module.print_section)
    assert set(run_all.SKIP_UNLESS) <= set(run_all.BENCHMARKS)
    assert {name for needed in run_all.NEEDS.values() for name in needed} <= set(
        run_all.BENCHMARKS)


def test_run_all_records_a_skipped_benchmark(tmp_path, monkeypatch, capsys):
    import bench_gpu
    import run_all

    monkeypatch.setattr(bench_gpu, "accelerator", lambda: "cpu")
    monkeypatch.setattr(bench_gpu, "run", lambda **_: pytest.fail("gpu ran without a GPU"))
    output = tmp_path / "results.json"
    assert run_all.main(["--only", "gpu", "--output", str(output)]) == 0
    section = common.read_section("gpu", quick=False, output=output)
    assert "needs a GPU" in section["skipped"] and "cpu" in section["skipped"]
    assert "skipped: gpu" in capsys.readouterr().out


def test_benchmarks_import_public_ferlib_names_only():
    private = []
    for path in sorted(BENCHMARKS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ferlib"):
                module_path = node.module.split(".")
                private += [f"{path.name}:{node.lineno} from {node.module} import {alias.name}"
                            for alias in node.names if alias.name.startswith("_")
                            or any(part.startswith("_") for part in module_path)]
            elif isinstance(node, ast.Import):
                private += [f"{path.name}:{node.lineno} import {alias.name}"
                            for alias in node.names if alias.name.startswith("ferlib")
                            and any(part.startswith("_") for part in alias.name.split("."))]
    assert private == []


# ----------------------------------------------------------------------------- harness

def _script(tmp_path, body: str) -> Path:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_run_child_returns_the_last_json_line(tmp_path):
    script = _script(tmp_path, """
        import json, os, sys
        print("libraries log here first")
        print(json.dumps({"argv": sys.argv[1:], "backend": os.environ["KERAS_BACKEND"],
                          "cwd": os.getcwd()}))
    """)
    result = common.run_child(script, ["jax"], quick=True, backend="jax")
    assert result == {"argv": ["--child", "jax", "--quick"], "backend": "jax",
                      "cwd": str(common.BENCHMARKS_DIR)}
    assert common.run_child(script)["argv"] == ["--child"]


def test_run_child_failures_name_the_child_and_keep_its_traceback(tmp_path):
    failing = _script(tmp_path, """
        raise SystemExit("out of memory in the child")
    """)
    with pytest.raises(common.ChildFailed, match="the jax child failed") as caught:
        common.run_child(failing, what="the jax child")
    assert "out of memory in the child" in caught.value.stderr_tail
    silent = _script(tmp_path, "print('no json here')\n")
    with pytest.raises(common.ChildFailed, match="no json here"):
        common.run_child(silent)


def test_random_training_data_is_the_data_the_benchmarks_fitted():
    """Same values as the per-script code it replaced: images from seed 0, labels from
    default_rng(label_seed).integers, one-hot float32 (keras.utils.to_categorical)."""
    import keras
    import numpy as np

    from ferlib import NUM_CLASSES

    images, targets = common.random_training_data(50)
    assert images.shape == (50, 48, 48, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, common.random_images(50))
    old = np.random.default_rng(1).integers(0, NUM_CLASSES, size=50)
    assert targets.dtype == np.float32
    np.testing.assert_array_equal(targets, keras.utils.to_categorical(old, NUM_CLASSES))
    np.testing.assert_array_equal(common.random_labels(50, one_hot=False), old)
    _, second = common.random_training_data(50, label_seed=2)
    assert not np.array_equal(targets, second)
    stream = np.random.default_rng(1)  # a generator keeps advancing between calls
    first, next_ = common.random_labels(50, stream), common.random_labels(50, stream)
    np.testing.assert_array_equal(first, targets)
    assert not np.array_equal(first, next_)


def test_fit_images_per_second_times_arrays_and_datasets():
    """bench_pipeline's tf.data feed goes through the same timer as the arrays."""
    import keras
    import bench_train

    tf = pytest.importorskip("tensorflow")
    images, targets = common.random_training_data(64)
    model = keras.Sequential([keras.Input((48, 48, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(7)])
    model.compile(optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    assert bench_train.fit_images_per_second(model, images, targets, 16) > 0
    dataset = tf.data.Dataset.from_tensor_slices((images, targets)).batch(16)
    assert bench_train.fit_images_per_second(model, dataset, None, 16) > 0
    with pytest.raises(ValueError, match="at least 2 batches"):
        bench_train.fit_images_per_second(model, images[:16], targets[:16], 16)


@pytest.mark.train
def test_time_to_accuracy_trains_old_and_new_recipes_and_sums_epoch_minutes(tmp_path,
                                                                            monkeypatch, capsys):
    """Both recipes of the smoke profile (the old one from git HEAD) train on a generated
    folder; the minutes to a threshold are the epoch seconds summed up to the first epoch at
    or above it, and an unreachable threshold says so."""
    import json

    import pandas as pd

    import bench_time_to_accuracy as bench
    from conftest import make_fer_folder

    monkeypatch.setenv("FER2013_PATH", str(make_fer_folder(tmp_path / "fer")))
    monkeypatch.setenv("FERLIB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "tta.json"
    section = bench.run(old_ref="HEAD", profile="smoke", models=["alexnet"],
                        thresholds=(0.0, 1.01), cap_minutes=5, out=out, root=tmp_path / "runs")
    assert json.loads(out.read_text()) == section
    # A later run of other models keeps these rows (same profile, commit, thresholds and
    # machine only); the caps live in the rows.
    header = {key: section[key] for key in ("profile", "old_ref", "thresholds", "machine")}
    assert header == {"profile": "smoke", "old_ref": "HEAD", "thresholds": [0.0, 1.01],
                      "machine": section["machine"]}
    assert "cap_minutes" not in section
    assert bench.earlier_rows(out, header) == section["models"]
    assert bench.earlier_rows(out, {**header, "thresholds": [0.0]}) == {}
    assert bench.earlier_rows(out, {**header, "machine": "another machine"}) == {}
    assert bench.earlier_rows(tmp_path / "absent.json", header) == {}
    for label in ("old", "new"):
        row = section["models"]["alexnet"][label]
        timing = pd.read_csv(tmp_path / "runs" / label / "models" / "alexnet" / "timing.csv")
        assert row["minutes_to"]["0.00"] == round(timing.seconds.iloc[0] / 60, 1)
        assert row["minutes_to"]["1.01"] is None and row["epochs"] == len(timing)
        assert row["cap_minutes"] == 5
    assert not list((tmp_path / "runs").rglob("privatetest_scorings.json"))
    # A reachable highest threshold stops the training there, and a rerun trains nothing more.
    for _ in range(2):
        reached = bench.run(old_ref="HEAD", profile="smoke", models=["alexnet"],
                            thresholds=(0.0,), out=out, root=tmp_path / "stops")
        assert reached["models"]["alexnet"]["new"]["epochs"] == 1
        assert reached["models"]["alexnet"]["new"]["stopped"] == "reached 0%"
    bench.print_section(section)
    assert "training minutes to PublicTest accuracy" in capsys.readouterr().out
    monkeypatch.delenv(bench.OLD_REF_VARIABLE, raising=False)
    assert "FERLIB_OLD_RECIPES_REF" in bench.skip_reason()
