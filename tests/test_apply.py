"""Tests for ferlib.apply: the evaluate and predict commands on a tiny model and made-up images."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferlib import EMOTIONS, apply, faces, inference
from ferlib.__main__ import main

RNG = np.random.default_rng(0)


def write_images(folder, count, size=(60, 60), mode="RGB"):
    """``count`` random images of ``size`` in ``folder``, as JPEG and PNG alternately."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        channels = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        pixels = RNG.integers(0, 256, channels, dtype=np.uint8)
        path = folder / f"image{index}.{'jpg' if index % 2 else 'png'}"
        Image.fromarray(pixels, mode).save(path)
        paths.append(path)
    return paths


def make_dataset(root, class_folders, per_class=4):
    for name in class_folders:
        write_images(root / name, per_class)
    return root


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from ferlib.models import build_model

    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    build_model("alexnet", width=0.25, dense_units=16).save(path)
    return path


@pytest.fixture
def crops(tmp_path):
    return write_images(tmp_path / "crops", 3, size=(48, 48), mode="L")


def test_parse_class_map():
    assert apply.parse_class_map("contempt=disgust, joy = happy") == {
        "contempt": "disgust", "joy": "happy"}
    assert apply.parse_class_map(None) is None
    with pytest.raises(ValueError, match="FOLDER=EMOTION"):
        apply.parse_class_map("contempt")


def test_evaluate_reports_absent_classes(model_path, tmp_path, capsys):
    data = make_dataset(tmp_path / "faces", ["happy", "Sad", "surprised"])
    out = tmp_path / "evaluation"

    code = main(["evaluate", "--model", str(model_path), "--data", str(data),
                 "--out", str(out), "--bootstrap", "50"])

    printed = capsys.readouterr().out
    assert code == 0
    assert "12 images used (train 0, val 0, test 12)" in printed
    assert "absent classes: angry, disgust, fear, neutral" in printed
    assert "accuracy (absent masked)" in printed and "95% CI" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["absent_classes"] == ["angry", "disgust", "fear", "neutral"]
    assert saved["classes"] == ["happy", "sad", "surprise"]
    assert 0 <= saved["accuracy"] <= saved["accuracy_masked"] <= 1
    interval = saved["confidence_intervals"]["f1_macro"]
    assert interval["low"] <= interval["value"] <= interval["high"]
    assert sum(row["support"] for row in saved["per_class"].values()) == 12
    assert np.asarray(saved["confusion_matrix"]["counts"]).shape == (3, 3)
    assert saved["converted"] == 12
    assert (out / "confusion_matrix.png").stat().st_size > 0


def test_evaluate_unknown_folder_needs_a_class_map(model_path, tmp_path, capsys):
    data = make_dataset(tmp_path / "faces", ["happy", "contempt"], per_class=2)

    code = main(["evaluate", "--model", str(model_path), "--data", str(data),
                 "--out", str(tmp_path / "evaluation")])

    error = capsys.readouterr().err
    assert code == 2
    assert "unknown class folder 'contempt'" in error and "--class-map" in error
    result = apply.evaluate(model_path, data, class_map={"contempt": "disgust"}, tta=True,
                            n_boot=0)
    assert result["classes"] == ["disgust", "happy"]
    assert result["confidence_intervals"]["accuracy"]["low"] is None
    with pytest.raises(ValueError, match="allowed values"):
        apply.evaluate(model_path, data, class_map={"contempt": "smug"})


def test_evaluate_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model file"):
        apply.evaluate(tmp_path / "missing.keras", tmp_path)


def test_predict_without_detection_classifies_whole_images(model_path, crops, tmp_path):
    results = apply.predict(crops, model_path, detect=False, top=3,
                            annotate=tmp_path / "annotated")

    assert [result["path"] for result in results] == [str(path) for path in crops]
    for result in results:
        (face,) = result["faces"]
        assert face["box"] == [0, 0, 48, 48]
        probabilities = [emotion["probability"] for emotion in face["emotions"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
        assert {emotion["emotion"] for emotion in face["emotions"]} <= set(EMOTIONS)
        assert Image.open(result["annotated"]).size == (48, 48)


def test_predict_reports_images_without_faces(model_path, tmp_path, capsys):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (320, 240), (128, 128, 128)).save(blank)

    code = main(["predict", str(blank), "--model", str(model_path)])

    assert code == 0
    assert f"{blank}: no face found" in capsys.readouterr().out


def test_predict_skips_unreadable_files(model_path, crops, capsys):
    broken = crops[0].parent / "broken.jpg"
    broken.write_bytes(b"not an image at all")

    code = main(["predict", str(crops[0].parent), "--model", str(model_path), "--no-detect",
                 "--json", "--top", "2"])

    captured = capsys.readouterr()
    assert code == 0
    assert "broken.jpg" in captured.err and "1 unreadable" in captured.err
    results = json.loads(captured.out)
    assert len(results) == len(crops) + 1
    assert sum("error" in result for result in results) == 1
    assert all(len(result["faces"][0]["emotions"]) == 2
               for result in results if "error" not in result)


def test_predict_fails_when_nothing_is_readable(model_path, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\x00garbage")

    code = main(["predict", str(broken), str(tmp_path / "missing.png"),
                 "--model", str(model_path), "--no-detect"])

    assert code == 1
    assert "0 of 2 images processed" in capsys.readouterr().err


def test_crop_face_adds_a_margin_inside_the_image():
    gray = np.zeros((100, 100), np.uint8)
    gray[20:80, 20:80] = 255  # the "face"; the margin brings in a dark border

    crop = faces.crop_face(gray, (20, 20, 60, 60), margin=0.1)
    edge = faces.crop_face(gray, (0, 0, 100, 100), margin=0.1)

    assert crop.shape == edge.shape == (48, 48) and crop.dtype == np.uint8
    assert crop[0, 0] < 64 and crop[24, 24] == 255
    assert edge[0, 0] == 0  # clipped at the image border, not padded


def test_predict_detects_a_real_face(model_path, tmp_path):
    from matplotlib import cbook

    try:
        portrait = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    except (OSError, ValueError):
        pytest.skip("matplotlib's sample portrait is not installed")

    (result,) = apply.predict([portrait], model_path, annotate=tmp_path / "annotated")

    (face,) = result["faces"]
    x, y, width, height = face["box"]
    assert result["size"] == [512, 600]
    assert 100 < x < 200 and 50 < y < 150 and 150 < width < 300  # her face, not the flag
    assert Image.open(result["annotated"]).size == (512, 600)


@pytest.fixture
def calibrated_model(model_path, tmp_path):
    """A copy of the tiny model with a stored temperature of 3 beside it."""
    import shutil

    folder = tmp_path / "calibrated"
    folder.mkdir()
    path = Path(shutil.copy(model_path, folder / "best.keras"))
    (folder / "calibration.json").write_text(json.dumps({"temperature": 3.0}))
    return path


def test_evaluate_uses_the_stored_temperature_and_reports_ece(calibrated_model, tmp_path,
                                                              capsys):
    data = make_dataset(tmp_path / "faces", ["happy", "sad"], per_class=3)

    code = main(["evaluate", "--model", str(calibrated_model), "--data", str(data),
                 "--out", str(tmp_path / "evaluation"), "--bootstrap", "30"])

    printed = capsys.readouterr().out
    assert code == 0
    assert "stored temperature T = 3.000" in printed and "ECE (top label, 15 bins)" in printed
    calibrated = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert calibrated["temperature"] == 3.0
    ece = calibrated["confidence_intervals"]["ece"]
    assert ece["low"] <= ece["value"] <= ece["high"]

    plain = apply.evaluate(calibrated_model, data, n_boot=0, calibration=False)
    assert plain["temperature"] is None and plain["confidence_intervals"]["ece"]["low"] is None
    assert plain["accuracy"] == calibrated["accuracy"]
    assert plain["confidence_intervals"]["ece"]["value"] != ece["value"]


def test_predict_explain_writes_a_saliency_png_per_face(calibrated_model, crops, tmp_path):
    results = apply.predict(crops[:2], calibrated_model, detect=False, top=7,
                            explain=tmp_path / "explained")
    plain = apply.predict(crops[:2], calibrated_model, detect=False, top=7, calibration=False)

    for result, uncalibrated in zip(results, plain):
        (face,) = result["faces"]
        assert result["temperature"] == 3.0 and uncalibrated["temperature"] is None
        image = Image.open(face["explanation"])
        assert image.size == (2 * 48 * 4 + 4, 48 * 4) and image.mode == "RGB"
        top = face["emotions"][0]
        assert top["emotion"] == uncalibrated["faces"][0]["emotions"][0]["emotion"]
        assert top["probability"] <= uncalibrated["faces"][0]["emotions"][0]["probability"]
    assert sorted(path.name for path in (tmp_path / "explained").iterdir()) == [
        "image0-face1.png", "image1-face1.png"]


def test_predict_explain_from_the_command_line(model_path, crops, tmp_path, capsys):
    code = main(["predict", str(crops[0]), "--model", str(model_path), "--no-detect",
                 "--explain", str(tmp_path / "out"), "--explain-method", "occlusion", "--json"])

    (result,) = json.loads(capsys.readouterr().out)
    assert code == 0 and result["temperature"] is None
    assert Path(result["faces"][0]["explanation"]).is_file()
    with pytest.raises(ValueError, match="allowed values: auto, grad_cam, occlusion"):
        apply.predict(crops, model_path, detect=False, explain=tmp_path, explain_method="lime")


@pytest.fixture(scope="module")
def second_model_path(tmp_path_factory):
    import keras

    from ferlib.models import build_model

    keras.utils.set_random_seed(7)  # other weights than model_path's
    path = tmp_path_factory.mktemp("model2") / "other.keras"
    build_model("alexnet", width=0.25, dense_units=16).save(path)
    return path


def test_evaluate_an_ensemble_of_models(model_path, second_model_path, tmp_path, capsys):
    data = make_dataset(tmp_path / "faces", ["happy", "sad"], per_class=3)
    first = apply.evaluate(model_path, data, n_boot=0)
    second = apply.evaluate(second_model_path, data, n_boot=0)

    code = main(["evaluate", "--model", str(model_path), "--model", str(second_model_path),
                 "--data", str(data), "--out", str(tmp_path / "evaluation"),
                 "--bootstrap", "30"])

    printed = capsys.readouterr().out
    assert code == 0 and "ensemble of 2 models" in printed
    saved = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert saved["model"] == [str(model_path), str(second_model_path)]
    assert saved["ensemble"] == 2 and saved["temperature"] == [None, None]
    interval = saved["confidence_intervals"]["accuracy"]
    assert interval["low"] <= interval["value"] <= interval["high"]
    # the ensemble's probabilities are the members' mean
    from ferlib.data import load_fer2013

    images = load_fer2013(data, on_error="skip", cache=False).images
    members = [inference.Predictor(path).probabilities(images) for path in
               (model_path, second_model_path)]
    ensemble = inference.Predictor([model_path, second_model_path]).probabilities(images)
    np.testing.assert_allclose(ensemble, np.mean(members, axis=0), atol=1e-6)
    assert first["model"] == str(model_path) and second["ensemble"] == 1


def test_predict_with_an_ensemble(model_path, second_model_path, crops):
    (result, *_) = apply.predict(crops[:1], [model_path, second_model_path], detect=False, top=7)
    total = sum(emotion["probability"] for emotion in result["faces"][0]["emotions"])
    assert total == pytest.approx(1.0, abs=1e-5)
    assert result["temperature"] == [None, None]


def _snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())}


def test_predict_never_writes_into_its_input_folder_without_overwrite(model_path, crops,
                                                                     tmp_path, capsys):
    from ferlib.__main__ import main

    crops = crops[0].parent
    before = _snapshot(crops)
    for target in (crops, crops / "sub"):
        code = main(["predict", str(crops), "--model", str(model_path), "--no-detect",
                     "--annotate", str(target)])
        err = capsys.readouterr().err
        assert code == 2 and "ferlib does not write into what it reads" in err, err
        assert err.count("\n") == 1
    assert _snapshot(crops) == before and not (crops / "sub").exists()
    # a symlink to the input folder is the input folder
    link = tmp_path / "link"
    link.symlink_to(crops, target_is_directory=True)
    assert main(["predict", str(crops), "--model", str(model_path), "--no-detect",
                 "--annotate", str(link)]) == 2
    assert _snapshot(crops) == before


def test_predict_overwrites_only_its_own_annotations(model_path, crops, tmp_path):
    crops = crops[0].parent
    out = tmp_path / "annotated"
    apply.predict([crops], model_path, detect=False, annotate=out)
    apply.predict([crops], model_path, detect=False, annotate=out)  # its own files: fine
    foreign = sorted(out.iterdir())[0]
    foreign.write_bytes(b"the user's own file")
    with pytest.raises(ValueError, match="was not written by ferlib"):
        apply.predict([crops], model_path, detect=False, annotate=out)
    assert foreign.read_bytes() == b"the user's own file"
    apply.predict([crops], model_path, detect=False, annotate=out, overwrite=True)
    assert foreign.read_bytes() != b"the user's own file"
