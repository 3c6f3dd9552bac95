"""Classify the faces in a video file or a camera stream: ``python -m ferlib predict clip.mp4``.

:func:`predict_video` reads every ``every``-th frame with OpenCV, finds the faces with the same
Haar cascade and crops as ``ferlib.apply.predict`` uses for photos, classifies them (one model
or an ensemble, calibrated by the stored temperature) and follows each face across the sampled
frames with a greedy IoU tracker, so that its probabilities can be smoothed over its last
samples. It writes one row per sampled frame and face (CSV or JSON Lines), optionally a copy of
the video with the boxes and labels drawn on the sampled frames, and returns a summary: the
share of face time per most likely emotion and the number of tracks.

Output files are written under a temporary name and renamed when the video is done, so an
unreadable video or an error leaves no partial file behind. A camera (``--camera N``) runs until
Ctrl-C, which ends it normally.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from ferlib import EMOTIONS

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
"""Files treated as videos without asking OpenCV; other non-image files are tried with it."""
ROW_SUFFIXES = (".csv", ".jsonl")
FOURCC = {".avi": "MJPG", ".webm": "VP90"}
"""Codec of the annotated video by suffix; any other suffix gets MPEG-4 (``mp4v``)."""
IOU_THRESHOLD = 0.3
"""A face continues a track when its box overlaps the track's last box at least this much."""
TRACK_MAX_GAP = 5
"""Sampled frames a track may miss (the cascade misses a face now and then) and continue."""
BATCH_FRAMES = 16
"""Sampled frames whose faces are classified in one call (a camera: one at a time)."""


class VideoError(ValueError):
    """The video cannot be read, or the camera cannot be opened (the command exits with 1)."""


def _cv2():
    """OpenCV with its own and FFmpeg's console chatter limited to errors (set before first
    use: an unreadable file otherwise prints FFmpeg's diagnosis above ferlib's one line)."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    return cv2


def is_video(path) -> bool:
    """Whether ``path`` is a video: a video suffix, or a non-image file OpenCV can read.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    bool
    """
    from ferlib.data import IMAGE_SUFFIXES

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return True
    if suffix in IMAGE_SUFFIXES or not path.is_file():
        return False
    capture = _cv2().VideoCapture(str(path))
    try:
        return bool(capture.isOpened() and capture.read()[0])
    finally:
        capture.release()


def iou(a, b) -> float:
    """Intersection over union of two ``(x, y, width, height)`` boxes."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    width = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    height = max(0, min(ay + ah, by + bh) - max(ay, by))
    overlap = width * height
    union = aw * ah + bw * bh - overlap
    return overlap / union if union > 0 else 0.0


class IoUTracker:
    """Greedy IoU tracking across sampled frames.

    Each face of a frame continues the live track whose last box it overlaps most (pairs taken
    best first, each track and face used once) if the IoU is at least ``threshold``; otherwise
    it starts a new track. A track not seen for more than ``max_gap`` sampled frames ends.
    """

    def __init__(self, threshold: float = IOU_THRESHOLD, max_gap: int = TRACK_MAX_GAP):
        self.threshold, self.max_gap = threshold, max_gap
        self.last = {}  # track id -> (box, step it was last seen)
        self.count = 0

    def update(self, boxes, step: int) -> list[int]:
        """Track ids (from 1) for the ``boxes`` of sampled frame number ``step``."""
        live = {track: box for track, (box, seen) in self.last.items()
                if step - seen <= self.max_gap}
        pairs = sorted(((iou(box, last), face, track) for face, box in enumerate(boxes)
                        for track, last in live.items()), reverse=True)
        ids, taken = [None] * len(boxes), set()
        for overlap, face, track in pairs:
            if overlap < self.threshold:
                break
            if ids[face] is None and track not in taken:
                ids[face] = track
                taken.add(track)
        for face, box in enumerate(boxes):
            if ids[face] is None:
                self.count += 1
                ids[face] = self.count
            self.last[ids[face]] = (tuple(box), step)
        self.last = {track: value for track, value in self.last.items()
                     if step - value[1] <= self.max_gap}
        return ids


class Smoother:
    """Moving average of each track's probabilities over its last ``window`` samples."""

    def __init__(self, window: int = 1):
        self.window = max(1, int(window))
        self.history = {}

    def __call__(self, track: int, probabilities) -> np.ndarray:
        samples = self.history.setdefault(track, deque(maxlen=self.window))
        samples.append(np.asarray(probabilities, dtype=np.float64))
        return np.mean(samples, axis=0)


# ----------------------------------------------------------------------------- output files

class _RowWriter:
    """Rows to a CSV or JSON Lines file, through a temporary file renamed by :meth:`commit`."""

    FIELDS = ("frame", "time_s", "track", "x", "y", "w", "h", *EMOTIONS, "emotion")

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.temp = self.path.with_name(f".{self.path.stem}.tmp{os.getpid()}{self.path.suffix}")
        self.stream = open(self.temp, "w", newline="")
        self.csv = None
        if self.path.suffix.lower() == ".csv":
            self.csv = csv.writer(self.stream)
            self.csv.writerow(self.FIELDS)
        self.rows = 0

    def write(self, row: dict) -> None:
        if self.csv is not None:
            self.csv.writerow([row[field] for field in self.FIELDS])
        else:
            self.stream.write(json.dumps(row) + "\n")
        self.rows += 1

    def commit(self) -> None:
        self.stream.close()
        os.replace(self.temp, self.path)

    def discard(self) -> None:
        self.stream.close()
        self.temp.unlink(missing_ok=True)


class _VideoWriter:
    """The annotated copy, opened at the first frame, renamed by :meth:`commit`."""

    def __init__(self, path, fps: float):
        self.path, self.fps = Path(path), fps
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.temp = self.path.with_name(f".{self.path.stem}.tmp{os.getpid()}{self.path.suffix}")
        self.writer = None

    def write(self, frame) -> None:
        cv2 = _cv2()
        if self.writer is None:
            code = FOURCC.get(self.path.suffix.lower(), "mp4v")
            height, width = frame.shape[:2]
            self.writer = cv2.VideoWriter(str(self.temp), cv2.VideoWriter_fourcc(*code),
                                          self.fps, (width, height))
            if not self.writer.isOpened():
                raise ValueError(f"--annotate-video: OpenCV cannot write {self.path.suffix} "
                                 f"videos here; use .mp4 or .avi")
        self.writer.write(frame)

    def commit(self) -> None:
        if self.writer is not None:
            self.writer.release()
            os.replace(self.temp, self.path)

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.release()
        self.temp.unlink(missing_ok=True)


def draw_tracks(frame, boxes, tracks, probabilities) -> np.ndarray:
    """The BGR frame with each face's box, track id and most likely emotion drawn on it."""
    cv2 = _cv2()
    frame = frame.copy()
    thickness = max(1, round(min(frame.shape[:2]) / 250))
    scale = max(0.4, min(frame.shape[:2]) / 600)
    for (x, y, width, height), track, proba in zip(boxes, tracks, probabilities):
        best = int(np.argmax(proba))
        label = f"#{track} {EMOTIONS[best]} {proba[best]:.0%}"
        cv2.rectangle(frame, (x, y), (x + width - 1, y + height - 1), (64, 64, 255), thickness)
        (text_width, text_height), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX,
                                                              scale, thickness)
        top = y - text_height - baseline - 2 if y > text_height + baseline + 2 else y + height
        cv2.rectangle(frame, (x, top), (x + text_width + 4, top + text_height + baseline + 2),
                      (64, 64, 255), cv2.FILLED)
        cv2.putText(frame, label, (x + 2, top + text_height + 1), cv2.FONT_HERSHEY_SIMPLEX,
                    scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return frame


# ----------------------------------------------------------------------------- reading

def _open(source):
    """An opened ``cv2.VideoCapture`` for a file path or a camera index, or VideoError."""
    cv2 = _cv2()
    if isinstance(source, int):
        capture = cv2.VideoCapture(source)
        if not capture.isOpened():
            raise VideoError(f"--camera {source}: no camera could be opened (none connected, "
                             f"in use, or this OpenCV build has no camera support)")
        return capture
    path = Path(source)
    if not path.is_file():
        raise VideoError(f"{path}: no such video file")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise VideoError(f"{path}: OpenCV cannot read this video (not a video, damaged, or a "
                         f"codec this OpenCV build lacks)")
    return capture


def _sampled_frames(capture, every: int, camera: bool, fps: float, progress, read: list):
    """Yield ``(frame index, seconds, BGR frame)`` for every ``every``-th frame; count the
    frames read in ``read[0]``."""
    started, index = time.monotonic(), 0
    while True:
        if index % every:
            ok = capture.grab()  # skipped frames are not decoded into images
            frame = None
        else:
            ok, frame = capture.read()
        if not ok:
            return
        read[0] += 1
        progress.update(1)
        if frame is not None:
            if camera or not fps > 0:
                seconds = (time.monotonic() - started if camera
                           else capture.get(_cv2().CAP_PROP_POS_MSEC) / 1000)
            else:
                seconds = index / fps
            yield index, seconds, frame
        index += 1


def _batches(frames, size: int):
    batch = []
    for item in frames:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------- predict

def predict_video(source, model_path, *, every: int = 1, out=None, annotate_video=None,
                  overwrite: bool = False,
                  smooth: int = 1, calibration: bool = True, progress: bool = True) -> dict:
    """Classify the faces in a video file or a camera stream.

    Parameters
    ----------
    source : str, Path or int
        A video file OpenCV can read, or a camera index (runs until Ctrl-C).
    model_path : str, Path or list
        A ``.keras`` model, or several for an ensemble (as in ``ferlib.apply.predict``).
    every : int
        Classify every ``every``-th frame (1: all).
    out : str or Path, optional
        ``.csv`` or ``.jsonl`` file for one row per sampled frame and face: ``frame`` (index
        in the video), ``time_s``, ``track``, the box ``x, y, w, h``, the 7 probabilities
        (smoothed when ``smooth`` > 1) and ``emotion`` (the most likely).
    annotate_video : str or Path, optional
        A copy of the sampled frames with boxes, track ids and top emotions drawn (``.mp4``,
        ``.avi``...), at the rate that keeps the video's duration.
    smooth : int
        Average each track's probabilities over its last ``smooth`` samples (1: no smoothing).
    calibration : bool
        Use the temperature in ``calibration.json`` beside each model, if any.
    progress : bool
        Show a progress bar of the frames read (on stderr).

    Returns
    -------
    dict
        ``source``, ``fps``, ``frames_read``, ``every``, ``frames_sampled``,
        ``frames_with_faces``, ``faces`` (rows), ``tracks``, ``seconds`` (video time covered),
        ``emotion_share`` (emotion -> share of the sampled face time it is the most likely
        one), ``temperature``, ``smooth``, ``interrupted`` (a camera stopped with Ctrl-C) and
        the written ``out`` and ``annotated`` files (None if not asked for).

    Raises
    ------
    VideoError
        The video cannot be read or the camera cannot be opened; nothing is written.
    """
    from tqdm import tqdm

    from ferlib.faces import FACE_MARGIN, check_outputs, crop_face, detect_faces, face_detector
    from ferlib.inference import Predictor, class_names, model_files

    if every < 1:
        raise ValueError(f"--every must be at least 1; got {every}")
    if smooth < 1:
        raise ValueError(f"--smooth must be at least 1 (1: no smoothing); got {smooth}")
    if out is not None and Path(out).suffix.lower() not in ROW_SUFFIXES:
        raise ValueError(f"--out: {out}: expected a .csv or .jsonl file")
    for path in model_files(model_path):
        if class_names(path) != EMOTIONS:
            raise ValueError(f"{path}: a fine-tuned head of its own "
                             f"({', '.join(class_names(path))}); video and camera take models "
                             f"of the 7 emotions only: classify "
                             f"images with predict, or extract frames first")
    camera = isinstance(source, int)
    if not camera:
        check_outputs([out, annotate_video], [source], overwrite)
    for output in (out, annotate_video):
        if output is not None and Path(output).exists() and not overwrite:
            raise ValueError(f"{output}: exists; a video's outputs are never overwritten "
                             f"silently: choose another path, or pass --overwrite")
    capture = _open(source)  # before loading the models: a bad file fails at once
    rows = video = bar = None
    try:
        cv2 = _cv2()
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        predictor = Predictor(model_path, calibration)
        detector = face_detector()
        rows = _RowWriter(out) if out is not None else None
        if annotate_video is not None:
            video = _VideoWriter(annotate_video, fps / every if fps > 0 else 10.0)
        tracker, smoother = IoUTracker(), Smoother(smooth)
        counts = np.zeros(len(EMOTIONS), np.int64)
        sampled = with_faces = faces = 0
        last_seconds, interrupted = 0.0, False
        bar = tqdm(total=total if total > 0 and not camera else None, unit="frame",
                   desc=f"camera {source}" if camera else Path(source).name, file=sys.stderr,
                   disable=not progress)
        read = [0]
        frames = _sampled_frames(capture, every, camera, fps, bar, read)
        try:
            for batch in _batches(frames, 1 if camera else BATCH_FRAMES):
                grays = [cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) for _, _, frame in batch]
                boxes = [detect_faces(detector, gray) for gray in grays]
                crops = [crop_face(gray, box, margin=FACE_MARGIN)
                         for gray, found in zip(grays, boxes) for box in found]
                proba = iter(predictor.probabilities(np.stack(crops)) if crops else [])
                for (index, seconds, frame), found in zip(batch, boxes):
                    tracks = tracker.update(found, sampled)
                    smoothed = [smoother(track, next(proba)) for track in tracks]
                    for box, track, probabilities in zip(found, tracks, smoothed):
                        best = int(np.argmax(probabilities))
                        counts[best] += 1
                        if rows is not None:
                            x, y, width, height = (int(v) for v in box)
                            rows.write({"frame": index, "time_s": round(seconds, 3),
                                        "track": track, "x": x, "y": y, "w": width, "h": height,
                                        **{emotion: round(float(p), 6) for emotion, p
                                           in zip(EMOTIONS, probabilities)},
                                        "emotion": EMOTIONS[best]})
                    if video is not None:
                        video.write(draw_tracks(frame, found, tracks, smoothed))
                    sampled += 1
                    with_faces += bool(found)
                    faces += len(found)
                    last_seconds = seconds
        except KeyboardInterrupt:
            if not camera:  # a file stopped half way: no partial output
                raise
            interrupted = True
        if not sampled:
            raise VideoError(f"{'camera ' + str(source) if camera else source}: no frame "
                             f"could be read")
        if rows is not None:
            rows.commit()
        if video is not None:
            video.commit()
    except BaseException:
        for writer in (rows, video):
            if writer is not None:
                writer.discard()
        raise
    finally:
        if bar is not None:
            bar.close()
        capture.release()
    frames_read = read[0]
    return {"source": f"camera {source}" if camera else str(source), "fps": fps or None,
            "frames_read": frames_read, "every": every, "frames_sampled": sampled,
            "frames_with_faces": with_faces, "faces": faces, "tracks": tracker.count,
            "seconds": (frames_read / fps if fps > 0 and not camera else last_seconds),
            "emotion_share": {emotion: (float(count / faces) if faces else 0.0)
                              for emotion, count in zip(EMOTIONS, counts)},
            "temperature": predictor.temperature, "smooth": smooth,
            "interrupted": interrupted,
            "out": str(out) if out is not None else None,
            "annotated": str(annotate_video) if annotate_video is not None else None}


def format_video_summary(summary: dict) -> str:
    """The human-readable lines for :func:`predict_video`'s summary."""
    every = summary["every"]
    step = "every frame" if every == 1 else f"1 frame in {every}"
    fps = f" at {summary['fps']:.1f} fps" if summary["fps"] else ""
    lines = [f"{summary['source']}: {summary['frames_read']} frames{fps} "
             f"({summary['seconds']:.1f} s), {step}: {summary['frames_sampled']} sampled, "
             f"{summary['frames_with_faces']} with a face; {summary['faces']} face rows, "
             f"{summary['tracks']} track{'s' if summary['tracks'] != 1 else ''}"
             + (f"; smoothed over {summary['smooth']} samples" if summary["smooth"] > 1 else "")
             + (" (stopped with Ctrl-C)" if summary["interrupted"] else "")]
    if summary["faces"]:
        shares = sorted(summary["emotion_share"].items(), key=lambda item: -item[1])
        lines.append("share of face time by most likely emotion: "
                     + ", ".join(f"{emotion} {share:.0%}" for emotion, share in shares if share))
    else:
        lines.append("no face found")
    for key, what in (("out", "rows"), ("annotated", "annotated video")):
        if summary[key]:
            lines.append(f"wrote {summary[key]} ({what})")
    return "\n".join(lines)
