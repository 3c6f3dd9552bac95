"""Use a trained model outside the notebooks: score it on any labelled dataset, or classify photos.

Two commands wrap the two functions of this module:

``python -m ferlib evaluate --model best.keras --data my_faces.zip``
    :func:`evaluate`: metrics with bootstrap confidence intervals (ECE included), a per-class
    report, ``metrics.json`` and ``confusion_matrix.png`` for a dataset in any layout that
    :func:`ferlib.data.load_fer2013` reads. Every image of the source is used, whatever its
    split: to a model trained elsewhere, a user's dataset is all test data.
``python -m ferlib predict photo.jpg photos/ --model best.keras``
    :func:`predict`: finds faces with OpenCV's Haar cascade, crops them to 48x48 gray and
    prints the most likely emotions per face, optionally drawing them onto copies of the images
    and writing a saliency map per face (``--explain DIR``). Given a video file or
    ``--camera N`` instead, it runs ``ferlib.video.predict_video``: sampled frames, face
    tracks, per-frame rows (``--out rows.csv``) and the share of time per emotion.

Both use the temperature stored in ``calibration.json`` beside the model
(``ferlib.calibration``) unless ``--no-calibration`` is given: the probabilities are then
calibrated on PublicTest; the predicted classes are the same either way.

TensorFlow, OpenCV and matplotlib are imported only when a command runs, so ``python -m ferlib
--help`` stays fast.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ferlib import EMOTIONS
from ferlib.faces import (FACE_MARGIN, check_outputs, crop_face, detect_faces, draw_faces,
                          face_detector, save_png)
from ferlib.inference import Predictor, model_files

CONFIDENCE = 0.95
"""Fraction of the detected box added on each side: FER2013 crops show a little forehead and
chin beyond what the Haar cascade's box covers."""
"""Large photos are shrunk to this many pixels (longest side) for detection only; the crops
are taken from the full-resolution image."""
SUMMARY_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auc_macro")


# ----------------------------------------------------------------------------- shared

def _number(value):
    """A JSON-safe float: NaN (an undefined AUC, say) becomes None."""
    value = float(value)
    return None if math.isnan(value) else value


# ----------------------------------------------------------------------------- evaluate

def parse_class_map(text):
    """Parse ``"contempt=disgust,joy=happy"`` into ``{"contempt": "disgust", "joy": "happy"}``.

    Parameters
    ----------
    text : str or None

    Returns
    -------
    dict or None
    """
    if not text:
        return None
    class_map = {}
    for pair in text.split(","):
        folder, separator, emotion = (part.strip() for part in pair.partition("="))
        if not separator or not folder or not emotion:
            raise ValueError(f"--class-map: {pair.strip()!r} is not FOLDER=EMOTION; expected "
                             f"e.g. --class-map contempt=disgust,joy=happy")
        class_map[folder] = emotion
    return class_map


def _check_class_map(class_map, classes=EMOTIONS):
    from ferlib.data import class_index

    own = None if tuple(classes) == EMOTIONS else tuple(classes)
    for folder, emotion in (class_map or {}).items():
        if class_index(emotion, classes=own) is None:
            raise ValueError(f"class map: {folder}={emotion}: {emotion!r} is not "
                             f"{'an emotion' if own is None else 'a class of the model'}; "
                             f"allowed values: {', '.join(classes)}")


def evaluate(model_path, data_path, *, out=None, class_map=None, tta=False, n_boot=1000,
             seed=0, calibration=True, group_pattern=None) -> dict:
    """Score a saved model on every image of a labelled dataset.

    Classes absent from the dataset are left out of the macro averages, AUC, per-class report
    and confusion matrix, which use the model's probabilities renormalised over the classes
    present ("masked"). The plain accuracy of the unmasked 7-way prediction is reported too,
    so a model that predicts an absent class pays for it there.

    Parameters
    ----------
    model_path : str or Path
        A ``.keras`` model outputting logits for uint8 ``(N, 48, 48)`` images.
    data_path : str or Path
        The challenge CSV, an image-folder root or a zip of one (any image size or colour).
    out : str or Path, optional
        Folder for ``metrics.json`` and ``confusion_matrix.png``; nothing is written if None.
    class_map : dict, optional
        Extra class-folder names, ``{"contempt": "disgust"}``.
    tta : bool
        Average the predictions on each image and its mirror image.
    n_boot : int
        Bootstrap resamples for the 95% confidence intervals; 0 skips them.
    seed : int
        Seed of the bootstrap.
    calibration : bool
        Scale the probabilities by the temperature in ``calibration.json`` beside the model,
        if there is one.
    group_pattern : str, optional
        A regular expression searched in each image's file name whose match (its first group,
        if it has one) names the subject or sequence the image belongs to, e.g. ``^(S\\d+)_``
        for CK+'s ``S010_004_00000019.png``. The intervals then resample whole groups, so
        several images of one subject count as one independent sample.

    Returns
    -------
    dict
        JSON-ready: ``images``, ``per_split``, ``classes`` (present), ``absent_classes``,
        ``accuracy``, ``accuracy_masked``, ``temperature`` (None: uncalibrated),
        ``confidence_intervals`` (metric -> value, low, high; ``ece`` is the top-label ECE
        over all 7 outputs, 15 bins), ``auc_per_class``, ``per_class`` (class -> precision,
        recall, f1, support), ``confusion_matrix`` and, when ``out`` is given, ``files``.
    """
    from ferlib import metrics
    from ferlib.data import SPLITS, load_fer2013
    from ferlib.inference import class_names as model_classes

    classes = model_classes(model_files(model_path)[0])
    _check_class_map(class_map, classes)
    own = None if classes == EMOTIONS else classes
    data = load_fer2013(data_path, class_map=class_map, on_error="skip", cache=False,
                        classes=own)
    predictor = Predictor(model_path, calibration)
    temperature = predictor.temperature
    proba = predictor.probabilities(data.images, tta)

    present = np.unique(data.labels)
    class_names = [classes[k] for k in present]
    masked_labels = np.searchsorted(present, data.labels)
    masked_proba = proba[:, present]
    masked_proba /= np.maximum(masked_proba.sum(axis=1, keepdims=True), np.finfo(float).tiny)
    masked_predictions = masked_proba.argmax(axis=1)

    groups = image_groups(data.source_ids, group_pattern)
    intervals = _intervals(data.labels, proba, ("accuracy",), n_boot, seed, groups)
    masked = _intervals(masked_labels, masked_proba, SUMMARY_METRICS, n_boot, seed, groups)
    intervals["accuracy_masked"] = masked.pop("accuracy")
    intervals.update(masked)
    ece = metrics.ece_bootstrap_ci(data.labels, proba, n_boot=n_boot, seed=seed,
                                   confidence=CONFIDENCE, groups=groups)
    intervals["ece"] = {key: _number(value) if n_boot > 0 or key == "value" else None
                        for key, value in ece.items()}

    masked_scores = metrics.classification_metrics(masked_labels, masked_proba)
    report = metrics.per_class_report(masked_labels, masked_predictions, class_names)
    counts = metrics.confusion(masked_labels, masked_predictions, num_classes=len(present))
    result = {
        "model": predictor.description, "ensemble": len(predictor.paths),
        "data": data.source, "data_hash": data.source_hash,
        "images": len(data),
        "per_split": {split: int((data.split == split).sum()) for split in SPLITS},
        "skipped": len(data.skipped), "skipped_examples": data.skipped[:20],
        "converted": int(data.converted), "class_map": class_map or {}, "tta": bool(tta),
        "temperature": temperature,
        "bootstrap_resamples": int(n_boot), "seed": int(seed), "confidence": CONFIDENCE,
        "group_pattern": group_pattern,
        "groups": None if groups is None else int(len(np.unique(groups))),
        "classes": class_names, "outputs": len(classes),
        "absent_classes": [name for name in classes if name not in class_names],
        "accuracy": intervals["accuracy"]["value"],
        "accuracy_masked": intervals["accuracy_masked"]["value"],
        "confidence_intervals": intervals,
        "auc_per_class": {name: auc for name, auc in
                          zip(class_names, masked_scores["auc_per_class"].values())},
        "per_class": {name: {"precision": float(row.precision), "recall": float(row.recall),
                             "f1": float(row.f1), "support": int(row.support)}
                      for name, row in report.iterrows()},
        "confusion_matrix": {"classes": class_names, "counts": counts.tolist()},
    }
    if out is not None:
        result["files"] = _write_evaluation(result, counts, Path(out))
    return result


def image_groups(source_ids, pattern):
    """The group (subject, sequence) of each image from its file name, or None without a
    pattern. A name the pattern does not match is an error naming it."""
    if not pattern:
        return None
    import re

    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"group pattern {pattern!r}: not a regular expression ({error})") \
            from None
    groups = []
    for source in source_ids:
        name = Path(str(source)).name
        match = compiled.search(name)
        if match is None:
            raise ValueError(f"group pattern {pattern!r} does not match the file name "
                             f"{name!r}; every image needs a group")
        groups.append(match.group(1) if compiled.groups else match.group(0))
    return np.asarray(groups)


def _intervals(labels, probabilities, metric_names, n_boot, seed, groups=None) -> dict:
    """Metric -> value, low, high (JSON-safe); the bounds are None when ``n_boot`` is 0."""
    from ferlib import metrics

    if n_boot <= 0:
        scores = metrics.classification_metrics(labels, probabilities)
        return {name: {"value": _number(np.nan if scores[name] is None else scores[name]),
                       "low": None, "high": None} for name in metric_names}
    table = metrics.bootstrap_ci(labels, probabilities, n_boot=n_boot, seed=seed,
                                 confidence=CONFIDENCE, metric_names=metric_names,
                                 groups=groups)
    return {row.metric: {"value": _number(row.value), "low": _number(row.low),
                         "high": _number(row.high)} for row in table.itertuples()}


def _write_evaluation(result, counts, out):
    from ferlib.plots import confusion_matrix_plot, save_figure
    from ferlib.runs import write_json

    masked = " (absent classes masked)" if result["absent_classes"] else ""
    models = result["model"] if isinstance(result["model"], list) else [result["model"]]
    title = f"{' + '.join(Path(model).name for model in models)} on " \
            f"{Path(result['data']).name}{masked}"
    figure_path = save_figure(confusion_matrix_plot(counts, result["classes"], title),
                              out / "confusion_matrix.png")
    from ferlib.artifacts import METRICS

    files = {"metrics": str(out / METRICS), "confusion_matrix": str(figure_path)}
    write_json(out / METRICS, {**result, "files": files})
    return files


def format_evaluation(result) -> str:
    """The human-readable summary of an :func:`evaluate` result (what the CLI prints)."""
    import pandas as pd

    splits = ", ".join(f"{split} {count}" for split, count in result["per_split"].items())
    outputs = result.get("outputs", len(EMOTIONS))
    lines = [f"{result['data']}: {result['images']:,} images used ({splits}); "
             f"{result['converted']} converted to 48x48 gray, {result['skipped']} unreadable "
             f"skipped"]
    lines += [f"  skipped {entry}: {reason}" for entry, reason in result["skipped_examples"]]
    if result["absent_classes"]:
        lines.append(f"absent classes: {', '.join(result['absent_classes'])}; the metrics "
                     f"below are over the {len(result['classes'])} classes present, with the "
                     f"absent classes' outputs masked, except 'accuracy (all {outputs} outputs)'")
    names = {"accuracy": f"accuracy (all {outputs} outputs)" if result["absent_classes"]
             else "accuracy",
             "accuracy_masked": "accuracy (absent masked)", "precision_macro": "precision (macro)",
             "recall_macro": "recall (macro)", "f1_macro": "F1 (macro)",
             "auc_macro": "AUC (one-vs-rest, macro)", "ece": "ECE (top label, 15 bins)"}
    shown = [key for key in names if (result["absent_classes"] or key != "accuracy_masked")
             and key in result["confidence_intervals"]]
    rows = []
    for key in shown:
        interval = result["confidence_intervals"][key]
        value, low, high = (f"{v:.3f}" if v is not None else "n/a"
                            for v in (interval["value"], interval["low"], interval["high"]))
        rows.append({"metric": names[key], "value": value, "95% CI": f"[{low}, {high}]"})
    tta = ", test-time mirror averaging" if result["tta"] else ""
    if result.get("groups"):
        tta += f", resampling {result['groups']} groups of {result['group_pattern']!r}"
    temperature = result.get("temperature")
    if isinstance(result["model"], list):
        members = ", ".join(f"{model} (T = {t:.3f})" if t is not None else f"{model} "
                            f"(uncalibrated)" for model, t in zip(result["model"], temperature))
        lines.append(f"ensemble of {len(result['model'])} models, the mean of their "
                     f"probabilities: {members}")
    else:
        lines.append(f"probabilities calibrated with the stored temperature T = "
                     f"{temperature:.3f} (--no-calibration turns it off)"
                     if temperature is not None else
                     "probabilities uncalibrated (no calibration.json beside the model, or "
                     "--no-calibration)")
    lines += ["", f"metrics ({result['bootstrap_resamples']} bootstrap resamples{tta}):",
              pd.DataFrame(rows).set_index("metric").to_string(), ""]
    report = pd.DataFrame(result["per_class"]).T
    report["support"] = report["support"].astype(int)
    report["auc"] = pd.Series(result["auc_per_class"])
    lines += ["per class:", report.to_string(float_format="{:.3f}".format)]
    if "files" in result:
        lines += ["", f"wrote {result['files']['metrics']} and "
                      f"{result['files']['confusion_matrix']}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- predict

def image_files(paths) -> list[Path]:
    """Each path that is a file, and every image file below each folder (sorted, recursive)."""
    from ferlib.data import IMAGE_SUFFIXES

    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path}: no image files in this folder (looked for "
                                        f"{', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        else:
            files.append(path)  # a missing file is reported per file, like an unreadable one
    return files


def _read_image(path):
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
        image.load()
        return image


def predict(paths, model_path, *, detect=True, top=3, annotate=None, calibration=True,
            explain=None, explain_method="auto", overwrite=False) -> list[dict]:
    """Classify the faces in images.

    Parameters
    ----------
    paths : sequence of str or Path
        Image files and folders (every image file inside, recursively, sorted).
    model_path : str or Path
        A ``.keras`` model outputting logits for uint8 ``(N, 48, 48)`` images.
    detect : bool
        Find faces with OpenCV's Haar cascade; if False, each whole image is one face crop.
    top : int
        How many of the most likely emotions to return per face.
    annotate : str or Path, optional
        Folder for a copy of each image with the boxes and top emotion drawn (PNG).
    calibration : bool
        Scale the probabilities by the temperature in ``calibration.json`` beside the model,
        if there is one.
    explain : str or Path, optional
        Folder for one PNG per face: the 48x48 crop with its top emotion, beside the saliency
        map of that emotion overlaid on it.
    explain_method : str
        Saliency method for ``explain``: ``auto`` (Grad-CAM), ``grad_cam`` or ``occlusion``
        (see ``ferlib.explain``).

    Returns
    -------
    list of dict
        One per image file: ``path``, and either ``error`` (unreadable file) or ``size``
        (width, height), ``temperature`` (None: uncalibrated), ``faces`` (each ``box`` as x,
        y, width, height and ``emotions``, the ``top`` most likely as ``{"emotion",
        "probability"}``, most likely first, and with ``explain``, ``explanation``, the
        written file) and, with ``annotate``, ``annotated`` (the written file).
    """
    from ferlib.inference import class_names

    classes = class_names(model_files(model_path)[0])
    if not 1 <= top <= len(classes):
        raise ValueError(f"top must be between 1 and {len(classes)}; got {top}")
    if explain is not None:
        from ferlib.explain import METHODS

        if explain_method not in METHODS:
            raise ValueError(f"explain_method: unknown saliency method {explain_method!r}; "
                             f"allowed values: {', '.join(METHODS)}")
    files = image_files(paths)
    if not files:
        raise ValueError("no images given")
    check_outputs([annotate, explain], [*paths, *files], overwrite)
    predictor = Predictor(model_path, calibration)
    temperature = predictor.temperature
    detector = face_detector() if detect else None
    for folder in (annotate, explain):
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
    results, used_names, used_explanations = [], set(), set()
    for path in files:
        try:
            image = _read_image(path)
        except Exception as error:  # PIL raises many types for unreadable or corrupt files
            results.append({"path": str(path), "error": f"cannot read image "
                                                        f"({type(error).__name__}: {error})"})
            continue
        gray = np.asarray(image.convert("L"), dtype=np.uint8)
        height, width = gray.shape
        boxes = detect_faces(detector, gray) if detect else [(0, 0, width, height)]
        faces = []
        if boxes:
            crops = np.stack([crop_face(gray, box, margin=FACE_MARGIN if detect else 0.0)
                              for box in boxes])
            proba = predictor.probabilities(crops)
            for box, probabilities in zip(boxes, proba):
                best = np.argsort(-probabilities, kind="stable")[:top]
                faces.append({"box": list(box), "emotions": [
                    {"emotion": predictor.classes[k], "probability": float(probabilities[k])}
                    for k in best]})
            if explain is not None:
                # an ensemble has no single network: its first member's saliency is shown
                _explain_faces(predictor.models[0], crops, proba, faces, Path(path).stem, Path(explain),
                               explain_method, used_explanations)
        result = {"path": str(path), "size": [width, height], "temperature": temperature,
                  "faces": faces}
        if annotate is not None:
            name = _unique_name(Path(path).stem, used_names)
            result["annotated"] = str(draw_faces(image, faces, Path(annotate) / name,
                                                 overwrite))
        results.append(result)
    return results


def _explain_faces(model, crops, proba, faces, stem, folder, method, used_names):
    """Write one saliency PNG per face (its top emotion explained); add ``explanation``."""
    from ferlib.explain import saliency

    classes = np.argsort(-proba, axis=1, kind="stable")[:, 0]
    maps = saliency(model, crops, method=method, class_index=classes)
    for number, (face, crop, saliency_map) in enumerate(zip(faces, crops, maps), start=1):
        name = _unique_name(f"{stem}-face{number}", used_names)
        best = face["emotions"][0]
        face["explanation"] = str(draw_explanation(
            crop, saliency_map, f"{best['emotion']} {best['probability']:.0%}", folder / name))


def draw_explanation(crop, saliency_map, label, path, scale=4, alpha=0.45) -> Path:
    """Save the face crop with its label beside the crop with the saliency map overlaid.

    Parameters
    ----------
    crop : ndarray, uint8, shape (48, 48) or (48, 48, 1)
    saliency_map : ndarray, shape (48, 48)
        Values in [0, 1].
    label : str
        Written on the crop, e.g. "happy 87%".
    path : str or Path
        Destination (PNG).
    scale : int
        Enlargement of the 48x48 crop.
    alpha : float
        Opacity of the map (jet colours) over the face.

    Returns
    -------
    pathlib.Path
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    gray = np.asarray(crop, dtype=np.uint8).reshape(crop.shape[0], crop.shape[1])
    size = (gray.shape[1] * scale, gray.shape[0] * scale)
    face = Image.fromarray(gray).convert("RGB").resize(size, Image.BILINEAR)
    heat = colormaps["jet"](np.clip(np.nan_to_num(saliency_map), 0, 1))[..., :3]
    heat = Image.fromarray((heat * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    overlay = Image.blend(face, heat, alpha)
    draw = ImageDraw.Draw(face)
    try:
        font = ImageFont.load_default(size=max(10, size[1] // 12))
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    draw.rectangle((0, 0, right - left + 6, bottom + 4), fill=(255, 64, 64))
    draw.text((3, 1), label, fill=(255, 255, 255), font=font)
    canvas = Image.new("RGB", (size[0] * 2 + scale, size[1]), (255, 255, 255))
    canvas.paste(face, (0, 0))
    canvas.paste(overlay, (size[0] + scale, 0))
    return save_png(canvas, path)


def _unique_name(stem, used_names):
    name, number = f"{stem}.png", 1
    while name in used_names:
        name, number = f"{stem}-{number}.png", number + 1
    used_names.add(name)
    return name


def format_prediction(result) -> str:
    """The human-readable lines for one image of a :func:`predict` result."""
    if "error" in result:
        return f"{result['path']}: {result['error']}"
    faces = result["faces"]
    if not faces:
        return f"{result['path']}: no face found"
    lines = [f"{result['path']}: {len(faces)} face{'s' if len(faces) > 1 else ''}"]
    for number, face in enumerate(faces, start=1):
        x, y, width, height = face["box"]
        emotions = ", ".join(f"{e['emotion']} {e['probability']:.2f}" for e in face["emotions"])
        lines.append(f"  face {number} at x={x} y={y} w={width} h={height}: {emotions}")
    return "\n".join(lines)
