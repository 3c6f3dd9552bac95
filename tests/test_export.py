"""Tests for ferlib.export (ONNX, LiteRT, SavedModel with parity). The model is conftest's
``trained_model``: a tiny AlexNet-style model, fitted a few steps so BatchNormalization has real
moving statistics, with augmentation layers, as the trained models have."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ferlib import EMOTIONS, export
from ferlib.__main__ import main

from conftest import TEMPERATURE


def export_args(model, out, fmt, *extra):
    return ["export", "--model", str(model), "--format", fmt, "--out", str(out),
            "--synthetic", "--images", "64", *extra]


@pytest.mark.train
@pytest.mark.parametrize("fmt", ["onnx", "litert", "saved_model"])
def test_export_passes_parity_and_writes_labels(trained_model, tmp_path, capsys, fmt):
    if fmt == "onnx":
        pytest.importorskip("tf2onnx")
        pytest.importorskip("onnxruntime")
    out = tmp_path / fmt

    code = main(export_args(trained_model, out, fmt))

    printed = capsys.readouterr().out
    assert code == 0, printed
    labels = json.loads((out / "labels.json").read_text())
    assert (out / labels["artifact"]).exists()
    assert labels["format"] == fmt and labels["emotions"] == list(EMOTIONS)
    assert labels["input"]["dtype"] == "uint8" and labels["input"]["shape"] == [None, 48, 48, 1]
    assert labels["output"]["shape"] == [None, 7] and "probabilit" in labels["output"]["meaning"]
    assert labels["temperature"] == TEMPERATURE and labels["calibrated"] is True
    source = labels["source"]
    assert (source["profile"], source["model"], source["dataset_sha256"], source["git_commit"],
            source["trained_epochs"]) == ("demo", "alexnet", "ab" * 32, "c0ffee", 3)
    assert len(source["sha256"]) == 64
    parity = labels["parity"]
    assert parity["passed"] and parity["images"] == 64
    assert parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    assert "synthetic" in parity["data"]
    assert "PASS" in printed and "max |difference|" in printed


@pytest.mark.train
def test_exported_probabilities_are_the_calibrated_inference_ones(trained_model, tmp_path):
    """The artifact runs BatchNormalization on its moving statistics (not on the batch) and
    divides the logits by the stored temperature, unless --no-calibration."""
    from ferlib.inference import Predictor

    images = export.synthetic_faces(16, seed=5)
    out = tmp_path / "plain"
    labels = export.export_model(trained_model, out, "saved_model", calibration=False,
                                 synthetic=True, images=16)
    plain = export.run_saved_model(out / labels["artifact"], images)
    calibrated = export.export_model(trained_model, tmp_path / "calibrated", "saved_model",
                                     synthetic=True, images=16)

    assert labels["temperature"] is None and calibrated["temperature"] == TEMPERATURE
    np.testing.assert_allclose(plain, Predictor(trained_model, calibration=False)
                               .probabilities(images[..., 0]), atol=1e-5)
    np.testing.assert_allclose(
        export.run_saved_model(tmp_path / "calibrated" / "saved_model", images),
        Predictor(trained_model).probabilities(images[..., 0]), atol=1e-5)
    one = export.run_saved_model(out / labels["artifact"], images[:1])
    np.testing.assert_allclose(one, plain[:1], atol=1e-6)  # no batch statistics


def test_repair_onnx_replaces_erfc_and_drops_unused_inputs(tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper
    from scipy.special import erfc

    graph = helper.make_graph(
        [helper.make_node("Erfc", ["image"], ["out"], name="gelu/Erfc")], "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3]),
         helper.make_tensor_value_info("captured:0", TensorProto.INT32, [1, 65])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 3])])
    path = tmp_path / "erfc.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)

    assert export.repair_onnx(path) == ["1 Erfc node(s) -> 1 - Erf",
                                        "1 unused input(s) (captured constants) dropped"]
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(4, 3)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [entry.name for entry in session.get_inputs()] == ["image"]
    np.testing.assert_allclose(session.run(None, {"image": x})[0], erfc(x), atol=1e-6)
    assert export.repair_onnx(path) == []


def test_vit_exports_to_onnx(tmp_path):
    """The ViT needs both ONNX repairs (exact GELU, captured position ids)."""
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    from ferlib.models import build_model

    path = tmp_path / "vit.keras"
    build_model("vit", patch_size=12, num_layers=1, num_heads=2, hidden_dim=16,
                mlp_dim=16).save(path)

    labels = export.export_model(path, tmp_path / "out", "onnx", synthetic=True, images=32)

    assert labels["parity"]["passed"], labels["parity"]
    assert any("Erfc" in repair for repair in labels["exported"]["graph_repairs"])


@pytest.mark.train
def test_onnx_runs_without_tensorflow_or_keras(trained_model, tmp_path):
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    export.export_model(trained_model, out, "onnx", synthetic=True, images=32)
    images = export.synthetic_faces(32, seed=9)
    np.save(tmp_path / "images.npy", images)
    script = f"""
import sys
for name in ("tensorflow", "keras", "tf_keras", "jax", "torch"):
    sys.modules[name] = None  # any import of them now raises ImportError
import numpy as np
import onnxruntime
session = onnxruntime.InferenceSession({str(out / 'model.onnx')!r},
                                       providers=["CPUExecutionProvider"])
images = np.load({str(tmp_path / 'images.npy')!r})
np.save({str(tmp_path / 'onnx.npy')!r}, session.run(None, {{"image": images}})[0])
assert "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None
"""
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=120)

    assert finished.returncode == 0, finished.stderr
    from ferlib.inference import Predictor

    np.testing.assert_allclose(np.load(tmp_path / "onnx.npy"),
                               Predictor(trained_model).probabilities(images[..., 0]), atol=1e-4)


@pytest.mark.train
def test_missing_runtime_names_the_extra(trained_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError

    code = main(export_args(trained_model, tmp_path / "out", "onnx"))

    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1 and "Traceback" not in error
    assert 'pip install -e ".[export]"' in error
    # onnxruntime here; tf2onnx, checked first, where the extra is not installed at all
    assert re.search(r"needs (onnxruntime|tf2onnx), which is not installed", error)
    assert not (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.train
def test_failed_parity_keeps_the_artifact_and_exits_1(trained_model, tmp_path, monkeypatch,
                                                      capsys):
    real = export.RUNNERS["litert"]
    monkeypatch.setitem(export.RUNNERS, "litert",
                        lambda path, images: np.roll(real(path, images), 1, axis=1))
    out = tmp_path / "litert"

    code = main(export_args(trained_model, out, "litert"))

    captured = capsys.readouterr()
    assert code == 1
    assert "parity check failed" in captured.err and "FAIL" in captured.out
    labels = json.loads((out / "labels.json").read_text())
    assert labels["parity"]["passed"] is False and labels["parity"]["top1_agreement"] < 1
    assert (out / "model.tflite").is_file()


@pytest.mark.train
def test_provenance_of_a_lone_model_file_is_null(tmp_path, trained_model):
    import shutil

    lone = Path(shutil.copy(trained_model, tmp_path / "model.keras"))
    source = export.source_provenance(lone)
    assert source["file"] == "model.keras" and len(source["sha256"]) == 64
    assert all(source[key] is None for key in ("model", "profile", "dataset_sha256",
                                               "git_commit", "trained_epochs"))


def test_synthetic_faces_are_deterministic():
    first, second = export.synthetic_faces(8), export.synthetic_faces(8)
    assert first.shape == (8, 48, 48, 1) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)
    assert first.std() > 20 and len({image.tobytes() for image in first}) == 8


@pytest.mark.train
def test_export_errors_name_the_option(trained_model, tmp_path):
    with pytest.raises(ValueError, match="--format: unknown format 'coreml'"):
        export.export_model(trained_model, tmp_path, "coreml")
    with pytest.raises(FileNotFoundError, match="--data"):
        export.export_model(trained_model, tmp_path, "litert", data=tmp_path / "missing.zip")
    with pytest.raises(FileNotFoundError, match="no such model file"):
        export.export_model(tmp_path / "missing.keras", tmp_path, "litert")


@pytest.mark.train
def test_export_on_another_backend_says_which_one_it_needs(trained_model, tmp_path, monkeypatch):
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError, match="needs the TensorFlow backend.*runs on jax"):
        export.export_model(trained_model, tmp_path, "onnx")
