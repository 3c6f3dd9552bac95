"""Tests for ferlib.export (ONNX, LiteRT, SavedModel with parity) and ferlib.video (predict on
a video). A tiny AlexNet-style model, fitted a few steps so BatchNormalization has real moving
statistics, with augmentation layers, as the trained models have."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ferlib import EMOTIONS, export, video
from ferlib.__main__ import main

TEMPERATURE = 2.0


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


def export_args(model, out, fmt, *extra):
    return ["export", "--model", str(model), "--format", fmt, "--out", str(out),
            "--synthetic", "--images", "64", *extra]


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


def test_exported_probabilities_are_the_calibrated_inference_ones(trained_model, tmp_path):
    """The artifact runs BatchNormalization on its moving statistics (not on the batch) and
    divides the logits by the stored temperature, unless --no-calibration."""
    from ferlib.apply import Predictor

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
    from ferlib.apply import Predictor

    np.testing.assert_allclose(np.load(tmp_path / "onnx.npy"),
                               Predictor(trained_model).probabilities(images[..., 0]), atol=1e-4)


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


def test_export_errors_name_the_option(trained_model, tmp_path):
    with pytest.raises(ValueError, match="--format: unknown format 'coreml'"):
        export.export_model(trained_model, tmp_path, "coreml")
    with pytest.raises(FileNotFoundError, match="--data"):
        export.export_model(trained_model, tmp_path, "litert", data=tmp_path / "missing.zip")
    with pytest.raises(FileNotFoundError, match="no such model file"):
        export.export_model(tmp_path / "missing.keras", tmp_path, "litert")


def test_export_on_another_backend_says_which_one_it_needs(trained_model, tmp_path, monkeypatch):
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError, match="needs the TensorFlow backend.*runs on jax"):
        export.export_model(trained_model, tmp_path, "onnx")


# ----------------------------------------------------------------------------- video

@pytest.fixture(scope="module")
def portrait_video(tmp_path_factory):
    """2 s at 10 fps of matplotlib's sample portrait, panning slowly to the right."""
    import cv2
    from matplotlib import cbook
    from PIL import Image

    try:
        portrait = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    except (OSError, ValueError):
        pytest.skip("matplotlib's sample portrait is not installed")
    frame = np.asarray(Image.open(portrait).convert("RGB"))[:, :, ::-1]
    height, width = frame.shape[:2]
    path = tmp_path_factory.mktemp("video") / "portrait.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (width, height))
    for index in range(20):
        writer.write(np.ascontiguousarray(np.roll(frame, 2 * index, axis=1)))
    writer.release()
    return path


def test_predict_video_writes_a_row_per_sampled_frame(trained_model, portrait_video, tmp_path,
                                                      capsys):
    import csv

    import cv2

    rows_path, annotated = tmp_path / "rows.csv", tmp_path / "annotated.mp4"

    code = main(["predict", str(portrait_video), "--model", str(trained_model), "--every", "2",
                 "--out", str(rows_path), "--annotate-video", str(annotated), "--smooth", "3"])

    printed = capsys.readouterr().out
    assert code == 0
    with open(rows_path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(row["frame"]) for row in rows] == list(range(0, 20, 2))  # one face per frame
    assert [float(row["time_s"]) for row in rows] == pytest.approx(np.arange(0, 2, 0.2))
    assert {row["track"] for row in rows} == {"1"}
    for row in rows:
        assert 100 < int(row["x"]) < 250 and 150 < int(row["w"]) < 300
        assert sum(float(row[emotion]) for emotion in EMOTIONS) == pytest.approx(1, abs=1e-4)
        assert row["emotion"] == max(EMOTIONS, key=lambda emotion: float(row[emotion]))
    assert "20 frames at 10.0 fps (2.0 s), 1 frame in 2: 10 sampled, 10 with a face" in printed
    assert "1 track" in printed and "share of face time by most likely emotion" in printed
    capture = cv2.VideoCapture(str(annotated))
    assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == 10 and capture.get(cv2.CAP_PROP_FPS) == 5
    capture.release()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["annotated.mp4", "rows.csv"]


def test_predict_video_json_lines_and_summary(trained_model, portrait_video, tmp_path):
    out = tmp_path / "rows.jsonl"
    summary = video.predict_video(portrait_video, [trained_model, trained_model], every=5,
                                  out=out, progress=False)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["frame"] for row in rows] == [0, 5, 10, 15]
    assert summary["frames_sampled"] == 4 and summary["tracks"] == 1 and summary["faces"] == 4
    assert summary["temperature"] == [TEMPERATURE, TEMPERATURE]  # an ensemble of two
    assert sum(summary["emotion_share"].values()) == pytest.approx(1)
    assert summary["seconds"] == pytest.approx(2.0)


def test_unreadable_video_is_a_clear_error_without_output(trained_model, tmp_path, capsys):
    fake = tmp_path / "x.mp4"
    fake.write_text("not a video\n")
    out = tmp_path / "rows.csv"

    code = main(["predict", str(fake), "--model", str(trained_model), "--out", str(out)])

    error = capsys.readouterr().err
    assert code == 1
    assert error.strip().splitlines() == [f"error: {fake}: OpenCV cannot read this video (not a "
                                          f"video, damaged, or a codec this OpenCV build lacks)"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["x.mp4"]


def test_videos_are_recognised_by_suffix_or_by_opening_them(portrait_video, tmp_path):
    import shutil

    odd = Path(shutil.copy(portrait_video, tmp_path / "clip.data"))  # no video suffix
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video\n")
    assert video.is_video(portrait_video) and video.is_video(odd)
    assert video.is_video(tmp_path / "missing.mov")  # then reported as missing, exit 1
    assert not video.is_video(notes) and not video.is_video(tmp_path / "photo.jpg")


def test_missing_camera_is_a_clear_error(trained_model, capsys):
    code = main(["predict", "--camera", "97", "--model", str(trained_model)])

    assert code == 1
    assert capsys.readouterr().err.startswith("error: --camera 97: no camera could be opened")


def test_video_output_is_removed_when_classification_fails(portrait_video, tmp_path,
                                                           monkeypatch):
    from ferlib import apply

    def broken(self, images, tta=False):
        raise RuntimeError("model failure")

    monkeypatch.setattr(apply.Predictor, "__init__", lambda self, paths, calibration: None)
    monkeypatch.setattr(apply.Predictor, "probabilities", broken)
    model = tmp_path / "m.keras"
    model.write_bytes(b"")
    with pytest.raises(RuntimeError, match="model failure"):
        video.predict_video(portrait_video, model, every=10, out=tmp_path / "rows.csv",
                            annotate_video=tmp_path / "a.mp4", progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.keras"]


def test_video_options_are_checked(trained_model, tmp_path, portrait_video, capsys):
    assert main(["predict", str(portrait_video), "--model", str(trained_model),
                 "--out", str(tmp_path / "rows.txt")]) == 2
    assert "expected a .csv or .jsonl file" in capsys.readouterr().err
    assert main(["predict", str(portrait_video), "--model", str(trained_model),
                 "--annotate", str(tmp_path)]) == 2
    assert "--annotate-video" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--model", str(trained_model), "--every", "2"]) == 2
    assert "only for a video or --camera" in capsys.readouterr().err
    assert main(["predict", "--model", str(trained_model)]) == 2
    assert main(["predict", str(portrait_video), "--model", str(trained_model),
                 "--every", "0"]) == 2
    assert "--every must be at least 1" in capsys.readouterr().err


def test_tracker_follows_overlapping_boxes_and_starts_new_tracks():
    tracker = video.IoUTracker()
    assert tracker.update([(0, 0, 10, 10), (50, 50, 10, 10)], 0) == [1, 2]
    assert tracker.update([(52, 51, 10, 10), (1, 1, 10, 10)], 1) == [2, 1]
    assert tracker.update([(30, 30, 10, 10)], 2) == [3]  # IoU 0 with both: a new face
    assert tracker.update([(1, 0, 10, 10)], 9) == [4]  # track 1 ended after 5 missed frames
    smoother = video.Smoother(2)
    smoother(1, [1, 0])
    smoother(1, [0, 1])
    np.testing.assert_allclose(smoother(1, [0, 0]), [0, 0.5])
