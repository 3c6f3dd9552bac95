"""The lent-GPU session (benchmarks/gpu_study.sh, ferlib.device) as a dry run on this CPU:
the device's stages run under Keras' JAX backend with a local folder standing in for ``$OUT``,
the merge and the result loading here under the default backend.

Two device sessions on a zip of a tiny image folder: the first has no time left after its
first epoch, so it stops AlexNet-style there and never starts the ViT; its resume state comes
back, is merged, and travels to the second session, which resumes AlexNet-style from epoch 2
and trains the ViT. Each return must keep to the device's limits (8 files, 16 MiB each, 64 MiB
in all). Then: ferlib's result loading reads the merged run, the training fingerprints here
equal the device's (``make report`` would only render), best.keras (float16 weights) predicts
what the device predicted, the ledger and the session records are merged, and the page header
says where the models were trained, read from the run and not from this machine.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_fer_folder

from ferlib import PROJECT_ROOT, device

pytest.importorskip("jax")
pytestmark = [pytest.mark.jax, pytest.mark.train]

SCRIPT = PROJECT_ROOT / "benchmarks" / "gpu_study.sh"
# jit_compile is on under JAX whatever the profile says; set here too, so both machines
# compute the same settings (params/gpu.yaml sets it in the file).
SETTINGS = ["--set", "models=[alexnet,vit]", "--set", "train.jit_compile=true"]


def zip_folder(folder: Path, target: Path) -> Path:
    """The folder as a zip of stored entries, like data/fer2013.zip."""
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(folder).as_posix())
    return target


def run(command, env, timeout=600):
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          check=False,
                          timeout=timeout)
    assert done.returncode == 0, (f"{command}: exit {done.returncode}\nstdout:\n"
                                  f"{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}")
    return done.stdout


def returned_files(out: Path) -> list[Path]:
    files = sorted(path for path in out.rglob("*") if path.is_file())
    sizes = [path.stat().st_size for path in files]
    assert 1 <= len(files) <= 8, files
    assert max(sizes) <= 16 * 2**20 and sum(sizes) <= 64 * 2**20, sizes
    return files


def test_pack_train_return_merge_and_load_round_trip(tmp_path):
    faces = make_fer_folder(tmp_path / "faces", per_split={
        "Training": ("train", 6), "PublicTest": ("test", 3), "PrivateTest": ("test", 3)})
    source = zip_folder(faces, tmp_path / "fer2013.zip")
    gpu, runs = tmp_path / "gpu", tmp_path / "runs"
    here = {**os.environ, "FER2013_PATH": str(source), "FERLIB_CACHE": str(tmp_path / "cache"),
            "TF_CPP_MIN_LOG_LEVEL": "2"}
    run([sys.executable, "-m", "ferlib", "gpu-pack-data", str(source), "--to",
         str(gpu / "data")], here)
    manifest = json.loads((gpu / "data" / device.DATA_MANIFEST).read_text())
    assert [part["file"] for part in manifest["parts"]] == ["fer2013.zip.xz.1",
                                                           "fer2013.zip.xz.2"]
    assert manifest["sha256"] == device.sha256_file(source)

    # The device: its own environment (no FER2013_PATH: the script rebuilds the data).
    there = {key: value for key, value in os.environ.items()
             if key not in ("FER2013_PATH", "FERLIB_CACHE")}
    there.update(GPU_DIR=str(gpu), PYTHON=sys.executable, KERAS_BACKEND="jax")
    setup = run(["bash", str(SCRIPT), "setup"], there)
    assert '"keras_backend": "jax"' in setup and "parts present [1, 2] of 2" in setup

    # Session 1: no time left after the first epoch (reserve = budget).
    device_run = tmp_path / "device1" / "smoke"
    out1 = tmp_path / "out1"
    log1 = run(["bash", str(SCRIPT), "train", "smoke", "300", "--run-dir", str(device_run),
                "--reserve-seconds", "300", *SETTINGS], {**there, "OUT": str(out1)})
    assert "alexnet: stopped after epoch 1" in log1 and "vit: not started" in log1
    assert device.sha256_file(gpu / "dataset" / "fer2013.zip") == manifest["sha256"]
    returned_files(out1)
    back1 = json.loads((out1 / device.RESULTS_MANIFEST).read_text())
    assert back1["session"]["alexnet"]["outcome"] == "stopped"
    assert back1["session"]["vit"]["outcome"] == "not started"
    assert back1["models"]["alexnet"]["outcome"] == "unfinished" and not back1["left_out"]

    merge = [sys.executable, "-m", "ferlib", "gpu-merge", "--profile", "smoke",
             "--run-dir", str(runs / "smoke")]
    # Other settings than the device's: refused in one line naming the setting.
    refused = subprocess.run([*merge, "--from", str(out1), "--set", "models=[alexnet,vit]"],
                             cwd=PROJECT_ROOT, env=here, capture_output=True, text=True,
                             timeout=300, check=False)
    assert refused.returncode == 2 and "device -> here: train.jit_compile: True -> False" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "alexnet unfinished" in run([*merge, "--from", str(out1), *SETTINGS], here)
    partial = json.loads((runs / "smoke/models/alexnet/state.json").read_text())
    assert not partial["finished"] and len(partial["history"]) == 1
    assert (runs / "smoke/models/alexnet" / partial["checkpoint"]).exists()

    # Session 2 on a fresh machine, the partial run carried to it.
    device_run = tmp_path / "device2" / "smoke"
    shutil.copytree(runs / "smoke/models/alexnet", device_run / "models/alexnet")
    out2 = tmp_path / "out2"
    log2 = run(["bash", str(SCRIPT), "train", "smoke", "600", "--run-dir", str(device_run),
                *SETTINGS], {**there, "OUT": str(out2)})
    assert "resuming after epoch 1" in log2
    returned_files(out2)
    merged = run([*merge, "--from", str(out2), *SETTINGS], here)
    assert "alexnet finished" in merged and "vit finished" in merged

    # Here (the default backend): what the reports read.
    import keras

    from ferlib import artifacts, pipeline
    from ferlib import runs as run_records
    from ferlib.config import load_params, parse_overrides
    from ferlib.data import load_dataset
    from ferlib.inference import predict_proba
    from ferlib.train import finished_result

    os.environ["FER2013_PATH"] = str(source)
    os.environ["FERLIB_CACHE"] = str(tmp_path / "cache")
    try:
        params = load_params("smoke", parse_overrides(SETTINGS[1::2]))
        data = load_dataset(params)
    finally:
        del os.environ["FER2013_PATH"], os.environ["FERLIB_CACHE"]
    run_dir = runs / "smoke"
    results = artifacts.load_results(run_dir, ["alexnet", "vit"])
    alexnet = results["alexnet"]
    assert alexnet.history.epoch.tolist() == [1, 2]
    assert alexnet.history.loss.iloc[0] == pytest.approx(partial["history"][0]["loss"])
    assert "on jax" in alexnet.metrics["machine"]
    from ferlib import tensorboard_logs  # every merged epoch in the TensorBoard logs, once

    assert sorted(step for tag, step, _ in tensorboard_logs.read_scalars(alexnet.directory)
                  if tag == "loss/train") == [1, 2]
    for name, result in results.items():
        assert finished_result(name, data, params, run_dir) == result.metrics, name
        model = keras.models.load_model(result.model_file)
        proba = predict_proba(model, data.subset("val")[0])
        np.testing.assert_allclose(proba, result.predictions["val_proba"], atol=1e-2)
    scorings = artifacts.Run(run_dir).test_scorings()
    assert sorted(entry["model"] for entry in scorings) == ["alexnet", "vit"]
    sessions = json.loads(artifacts.Run(run_dir).device_sessions.read_text())
    assert [list(s["models"]) for s in sessions] == [["alexnet", "vit"], ["alexnet", "vit"]]

    assert keras.backend.backend() != "jax"
    origin = pipeline.with_training_machine(
        run_records.provenance(params, source, data.source_hash), run_dir, params)
    assert origin["trained_on"] == artifacts.training_machine(alexnet.metrics["machine"])
    assert origin["trained_on"].endswith("(JAX)")
    pipeline.write_index(params, run_dir, tmp_path / "reports", pipeline.plan(params), origin)
    page = (tmp_path / "reports" / "index.html").read_text()
    assert f"<b>trained on</b> {origin['trained_on']}" in page


def test_results_that_do_not_fit_are_left_out_and_parts_are_checked(tmp_path):
    """The return limits choose what comes back (in order), and a damaged part is named."""
    run_dir = tmp_path / "run"
    for name, size in (("alexnet", 300_000), ("vit", 900_000)):
        folder = run_dir / "models" / name
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps(
            {"finished": False, "history": [{}], "checkpoint": "checkpoint-001.keras",
             "best_weights": None}))
        (folder / "checkpoint-001.keras").write_bytes(os.urandom(size))
    limits = device.ReturnLimits(files=3, file_bytes=2**20, total_bytes=3 * 2**20)
    manifest = device.pack_results(run_dir, tmp_path / "out", limits=limits)
    assert manifest["models"]["alexnet"]["returned_bytes"] > 300_000
    assert list(manifest["left_out"]) == ["vit"]   # 1.2 MB would pass the 1 MiB left
    files = sorted((tmp_path / "out").iterdir())
    assert len(files) <= 3 and all(path.stat().st_size <= 2**20 for path in files)
    part = tmp_path / "out" / manifest["parts"][0]["file"]
    part.write_bytes(part.read_bytes()[:-1] + b"?")
    with pytest.raises(device.DeviceError, match="results: part 1 of 1 .* is damaged"):
        device.merge_results(tmp_path / "out", {"cv_folds": 0, "profile": "custom"},
                             tmp_path / "merged")
