"""Faces in photos and frames: detection (OpenCV's Haar cascade), 48x48 crops that look like
FER2013's images, and boxes with their emotion drawn on a copy (shared by predict and video).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ferlib import IMAGE_SIZE

FACE_MARGIN = 0.1
DETECTION_MAX_SIDE = 1024
WRITER_TAG = ("Software", "ferlib")
"""PNG text chunk on every image ferlib writes: such a file may be overwritten by a rerun."""


def written_by_ferlib(path) -> bool:
    """Whether an existing file is an image that ferlib wrote (its PNG text chunk says so)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.info.get(WRITER_TAG[0]) == WRITER_TAG[1]
    except Exception:  # not an image at all: certainly not one of ours
        return False


def check_outputs(outputs, inputs, overwrite: bool = False) -> None:
    """Refuse (one ValueError line) an output that is, or lies inside, an input, unless
    ``overwrite``: ferlib treats what it reads as read-only. Symlinks are resolved."""
    if overwrite:
        return
    resolved_inputs = [Path(path).expanduser().resolve() for path in inputs]
    for output in outputs:
        if output is None:
            continue
        target = Path(output).expanduser().resolve()
        for source in resolved_inputs:
            if target == source or source in target.parents:
                where = "an input" if target == source else f"inside the input {source}"
                raise ValueError(f"{output}: this output is {where}; ferlib does not write "
                                 f"into what it reads: choose another path, or pass "
                                 f"--overwrite")


def save_png(canvas, path, overwrite: bool = False) -> Path:
    """Save ``canvas`` as a PNG tagged as ferlib's; an existing file that ferlib did not write
    is refused unless ``overwrite``."""
    from PIL import PngImagePlugin

    path = Path(path)
    if path.exists() and not overwrite and not written_by_ferlib(path):
        raise ValueError(f"{path}: exists and was not written by ferlib; choose another "
                         f"folder, or pass --overwrite")
    info = PngImagePlugin.PngInfo()
    info.add_text(*WRITER_TAG)
    canvas.save(path, format="PNG", pnginfo=info)
    return path


def face_detector():
    """OpenCV's frontal-face Haar cascade, as shipped in opencv-python-headless 4.x."""
    hint = 'install it with: pip install "opencv-python-headless<5"'
    try:
        import cv2
    except ImportError as error:
        raise FileNotFoundError(f"face detection needs OpenCV; {hint} (or pass --no-detect "
                                f"for images that are already face crops)") from error
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    cascade_path = Path(folder or "") / "haarcascade_frontalface_default.xml"
    if folder is None or not cascade_path.is_file():
        raise FileNotFoundError(f"OpenCV's face cascade {cascade_path.name} was not found "
                                f"(this OpenCV build does not ship cv2.data); {hint}")
    detector = cv2.CascadeClassifier(str(cascade_path))
    if detector.empty():
        raise ValueError(f"{cascade_path}: OpenCV could not load the face cascade; {hint}")
    return detector


def detect_faces(detector, gray) -> list[tuple[int, int, int, int]]:
    """Face boxes ``(x, y, width, height)`` in a uint8 gray image, left to right.

    Parameters
    ----------
    detector : cv2.CascadeClassifier
    gray : ndarray, uint8, shape (H, W)

    Returns
    -------
    list of tuple of int
    """
    import cv2

    scale = min(1.0, DETECTION_MAX_SIDE / max(gray.shape))
    small = gray if scale == 1.0 else cv2.resize(gray, None, fx=scale, fy=scale,
                                                 interpolation=cv2.INTER_AREA)
    boxes = detector.detectMultiScale(cv2.equalizeHist(small), scaleFactor=1.1,
                                      minNeighbors=5, minSize=(24, 24))
    return sorted(tuple(int(round(v / scale)) for v in box) for box in boxes)


def crop_face(gray, box, margin=FACE_MARGIN) -> np.ndarray:
    """The box plus ``margin`` on each side (clipped to the image), as uint8 48x48 gray."""
    from PIL import Image

    x, y, width, height = box
    pad_x, pad_y = int(width * margin), int(height * margin)
    top, bottom = max(0, y - pad_y), min(gray.shape[0], y + height + pad_y)
    left, right = max(0, x - pad_x), min(gray.shape[1], x + width + pad_x)
    face = Image.fromarray(gray[top:bottom, left:right])
    # The same resampling as ferlib.data uses for datasets, so crops look like training images.
    return np.asarray(face.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), dtype=np.uint8)


def draw_faces(image, faces, path, overwrite: bool = False) -> Path:
    """Save a copy of ``image`` with each face's box and most likely emotion drawn on it.

    Parameters
    ----------
    image : PIL.Image.Image
    faces : list of dict
        As in :func:`predict`'s results.
    path : str or Path
        Destination (PNG).

    Returns
    -------
    pathlib.Path
    """
    from PIL import ImageDraw, ImageFont

    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    line_width = max(1, round(min(canvas.size) / 250))
    font_size = max(10, round(min(canvas.size) / 30))
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        font = ImageFont.load_default()
    for face in faces:
        x, y, width, height = face["box"]
        best = face["emotions"][0]
        draw.rectangle((x, y, x + width - 1, y + height - 1), outline=(255, 64, 64),
                       width=line_width)
        label = f"{best['emotion']} {best['probability']:.0%}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        text_y = y - (bottom - top) - 2 * line_width if y > bottom - top + 2 * line_width \
            else y + line_width
        draw.rectangle((x, text_y, x + right - left + 4, text_y + bottom + 2), fill=(255, 64, 64))
        draw.text((x + 2, text_y), label, fill=(255, 255, 255), font=font)
    return save_png(canvas, path, overwrite)
