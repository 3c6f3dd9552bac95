"""Benchmark helpers that act on other work or stand in for other frameworks: pausing a
running training, and the plain PyTorch twins of ferlib's networks."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
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
