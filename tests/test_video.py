"""Tests for ferlib.video: predict on a video (rows per sampled frame, JSON lines, summary),
clear errors without output, suffix or content detection, face tracks. The model is conftest's
``trained_model``."""

import json
from pathlib import Path

import numpy as np
import pytest

from ferlib import EMOTIONS, video
from ferlib.__main__ import main

from conftest import TEMPERATURE


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


@pytest.mark.train
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


@pytest.mark.train
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


@pytest.mark.train
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


@pytest.mark.train
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


@pytest.mark.train
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


def test_annotating_a_video_onto_itself_is_refused(trained_model, portrait_video, capsys):
    before = portrait_video.read_bytes()
    code = main(["predict", str(portrait_video), "--model", str(trained_model),
                 "--annotate-video", str(portrait_video)])
    err = capsys.readouterr().err
    assert code == 2 and "this output is an input" in err, err
    assert portrait_video.read_bytes() == before


def test_existing_video_outputs_need_overwrite(trained_model, portrait_video, tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("someone else's table\n")
    with pytest.raises(ValueError, match="exists; a video's outputs are never overwritten"):
        video.predict_video(portrait_video, trained_model, out=rows, every=10)
    assert rows.read_text() == "someone else's table\n"
