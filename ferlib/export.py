"""Export a trained model for inference outside Keras: ONNX, LiteRT (TFLite) or a SavedModel.

``python -m ferlib export --model best.keras --format onnx --out exported/``
    :func:`export_model`: builds the inference-only copy of the model
    (``ferlib.models.inference_model``: no augmentation layers, the same weights, output
    ``softmax(logits / T)`` with the stored calibration temperature T), writes it with Keras 3's
    own ``model.export`` and a ``labels.json`` beside it (emotion order, input and output, the
    temperature, the source model's provenance), then checks parity: the artifact is run in its
    own runtime (ONNX Runtime, the LiteRT interpreter, the reloaded SavedModel) on 256
    PrivateTest images (or 256 synthetic faces when FER2013 is not available) and compared with
    Keras. The check fails when any probability differs by more than :data:`MAX_ABS_DIFF` or
    the most likely emotion differs for any image.

Every artifact maps uint8 ``(batch, 48, 48, 1)`` gray face crops, as ``ferlib.faces.crop_face``
makes them, to float32 ``(batch, 7)`` probabilities in the order of ``ferlib.EMOTIONS`` (a
fine-tuned head: one per class of its ``classes.json``, the order of ``emotions`` in
``labels.json``). The model's ``MODEL_CARD.md`` is copied beside the artifact.

The runtimes are optional: ``pip install -e .[export]`` installs ONNX export (tf2onnx, onnx),
ONNX Runtime and the LiteRT interpreter (ai-edge-litert; without it TensorFlow's own
``tf.lite.Interpreter`` is used). SavedModel needs only TensorFlow.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from ferlib import IMAGE_SIZE

FORMATS = {"onnx": ("onnx", "model.onnx"), "litert": ("litert", "model.tflite"),
           "saved_model": ("tf_saved_model", "saved_model")}
"""``--format`` value -> (Keras ``model.export`` format, artifact name inside ``--out``)."""
LABELS_FILE = "labels.json"
PARITY_IMAGES = 256
MAX_ABS_DIFF = 1e-4
"""Largest allowed difference of any probability between the artifact and Keras."""
INSTALL_HINT = 'pip install -e ".[export]"'


class MissingDependencyError(ImportError):
    """An optional package of the ``export`` extra is not installed (message names the extra)."""


def require(module: str, package: str | None = None, purpose: str = "this export"):
    """Import ``module`` or raise :class:`MissingDependencyError` naming the ``export`` extra.

    Parameters
    ----------
    module : str
        e.g. ``"onnxruntime"`` or ``"tf2onnx"``.
    package : str, optional
        Its PyPI name when it differs from the module's.
    purpose : str
        What needs it, for the message.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f"{purpose} needs {package or module}, which is not installed; install the export "
            f"extra: {INSTALL_HINT}") from error


# ----------------------------------------------------------------------------- model

def exportable_model(model, temperature=None):
    """The inference copy of a trained model (``ferlib.models.inference_model``): no
    augmentation layers, called with ``training=False``, one uint8 input named ``image``,
    probabilities out.

    Parameters
    ----------
    model : keras.Model
        A ``ferlib`` model (uint8 ``(batch, 48, 48, 1)`` -> logits).
    temperature : float, optional
        Calibration temperature (None: plain softmax).

    Returns
    -------
    keras.Model
        uint8 ``(batch, 48, 48, 1)`` -> float32 ``(batch, 7)`` probabilities.
    """
    from ferlib.models import inference_model

    return inference_model(model, temperature=temperature)


def input_spec():
    """The exported models' input: uint8 ``(batch, 48, 48, 1)`` named ``image``."""
    import keras

    return keras.InputSpec(dtype="uint8", shape=(None, IMAGE_SIZE, IMAGE_SIZE, 1), name="image")


def source_provenance(model_path) -> dict:
    """Where a trained model came from, read from the files of its run (never an error).

    A model trained by ``ferlib`` lives in ``runs/<profile>/models/<name>[/fold<k>]/best.keras``
    beside ``settings.json``; the run's ``manifest.json`` (written by ``python -m ferlib
    report``) holds the dataset hash and the git commit, ``params.yaml`` the profile.

    Parameters
    ----------
    model_path : str or Path

    Returns
    -------
    dict
        ``file`` (name), ``sha256`` (of the model file), ``model`` (registry name), ``profile``,
        ``dataset``, ``dataset_sha256``, ``git_commit``, ``git_dirty`` (of the run's last
        report), ``trained_epochs``; each None when the files do not say.
    """
    from ferlib.data import file_sha256
    from ferlib.runs import read_json

    def read(path):
        try:
            return read_json(path) or {}
        except (OSError, ValueError):
            return {}

    from ferlib.artifacts import ModelRun, Run

    model_path = Path(model_path)
    files = ModelRun(model_path.parent)
    settings = read(files.settings)
    state = read(files.state)
    run = next((Run(parent.parent) for parent in model_path.parents
                if parent.name == "models"), None)
    manifest = read(run.manifest) if run else {}
    profile = manifest.get("profile")
    if profile is None and run is not None and run.params.is_file():
        import yaml

        try:
            profile = (yaml.safe_load(run.params.read_text()) or {}).get("profile")
        except (OSError, yaml.YAMLError):
            profile = None
    origin = manifest.get("provenance") or {}
    data = manifest.get("data") or {}
    return {"file": model_path.name, "sha256": file_sha256(model_path),
            "model": settings.get("model"), "profile": profile,
            "dataset": origin.get("dataset"),
            "dataset_sha256": data.get("sha256") or origin.get("dataset_sha256"),
            "git_commit": origin.get("git_commit"), "git_dirty": origin.get("git_dirty"),
            "trained_epochs": len(state["history"]) if isinstance(state.get("history"), list)
            else None}


# ----------------------------------------------------------------------------- parity images

def synthetic_faces(count: int = PARITY_IMAGES, seed: int = 0) -> np.ndarray:
    """Deterministic face-like uint8 images ``(count, 48, 48, 1)``: an oval face, eyes, brows,
    a mouth that smiles or frowns, varied position, contrast and noise.

    Parameters
    ----------
    count : int
    seed : int

    Returns
    -------
    ndarray, uint8
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
    for index in range(count):
        cx, cy = 24 + rng.uniform(-3, 3), 25 + rng.uniform(-3, 3)
        skin, background = rng.uniform(120, 210), rng.uniform(20, 110)
        face = ((x - cx) / rng.uniform(14, 18)) ** 2 + ((y - cy) / rng.uniform(18, 22)) ** 2 < 1
        image = np.where(face, skin, background)
        eye_y, eye_dx = cy - rng.uniform(4, 7), rng.uniform(6, 8)
        for side in (-1, 1):
            eye = ((x - cx - side * eye_dx) / 2.6) ** 2 + ((y - eye_y) / 1.6) ** 2 < 1
            brow = (np.abs(y - (eye_y - 4 - side * rng.uniform(-1.5, 1.5))) < 0.9) \
                & (np.abs(x - cx - side * eye_dx) < 3.5)
            image = np.where(eye | brow, skin * 0.3, image)
        curve = rng.uniform(-0.12, 0.12)  # > 0 smiles, < 0 frowns
        mouth_y = cy + rng.uniform(8, 11) + curve * (x - cx) ** 2 * -1
        mouth = (np.abs(y - mouth_y) < rng.uniform(0.8, 2.5)) & (np.abs(x - cx) < rng.uniform(5, 8))
        image = np.where(mouth, skin * 0.4, image)
        image = image + rng.normal(0, rng.uniform(2, 10), image.shape)
        images[index, ..., 0] = np.clip(image, 0, 255).astype(np.uint8)
    return images


def parity_images(data=None, count: int = PARITY_IMAGES, synthetic: bool = False):
    """The images of the parity check and where they come from.

    Parameters
    ----------
    data : str or Path, optional
        A FER-style dataset; its first ``count`` PrivateTest images are used (all its images
        when it has no PrivateTest split). Default: FER2013 where ``ferlib.config`` finds it.
    count : int
    synthetic : bool
        Use :func:`synthetic_faces` even when FER2013 is available.

    Returns
    -------
    (ndarray, str)
        uint8 ``(n, 48, 48, 1)`` images and a description such as ``"256 PrivateTest images of
        fer2013.zip"``.
    """
    from ferlib.data import resolve_data_path

    if not synthetic:
        if data is None:
            try:
                data = resolve_data_path()
            except FileNotFoundError:
                data = None
        if data is not None:
            from ferlib.data import load_fer2013

            dataset = load_fer2013(data, on_error="skip")
            images, _ = dataset.subset("test")
            split = "PrivateTest"
            if not len(images):
                images, split = dataset.images, "all"
            images = images[:count]
            return images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1), \
                f"{len(images)} {split} images of {Path(data).name}"
    return synthetic_faces(count), f"{count} synthetic face-like images (seed 0)"


# ----------------------------------------------------------------------------- runtimes

def litert_interpreter(path):
    """A LiteRT interpreter for a ``.tflite`` file: ``ai_edge_litert`` when installed, else
    TensorFlow's ``tf.lite.Interpreter``. Returns (interpreter, runtime name)."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter(model_path=str(path)), f"ai-edge-litert {_version('ai-edge-litert')}"
    except ImportError:
        import tensorflow as tf

        return tf.lite.Interpreter(model_path=str(path)), f"tf.lite {tf.__version__}"


def run_onnx(path, images) -> np.ndarray:
    """Probabilities from an exported ONNX file, with ONNX Runtime on the CPU."""
    onnxruntime = require("onnxruntime", purpose="running the ONNX model")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: np.asarray(images, np.uint8)})[0])


def run_litert(path, images) -> np.ndarray:
    """Probabilities from an exported ``.tflite`` file (one batch of all ``images``)."""
    interpreter, _ = litert_interpreter(path)
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(source["index"], list(images.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], np.asarray(images, np.uint8))
    interpreter.invoke()
    return np.array(interpreter.get_tensor(target["index"]))


def run_saved_model(path, images) -> np.ndarray:
    """Probabilities from an exported SavedModel, through its ``serving_default`` signature."""
    import tensorflow as tf

    serving = tf.saved_model.load(str(path)).signatures["serving_default"]
    (name,) = serving.structured_input_signature[1]
    (output,) = serving(**{name: tf.constant(images, tf.uint8)}).values()
    return output.numpy()


RUNNERS = {"onnx": run_onnx, "litert": run_litert, "saved_model": run_saved_model}


def check_parity(reference, probabilities, max_abs_diff: float = MAX_ABS_DIFF) -> dict:
    """Compare an artifact's probabilities with Keras'.

    Parameters
    ----------
    reference, probabilities : array_like, shape (N, 7)
    max_abs_diff : float
        The largest difference allowed.

    Returns
    -------
    dict
        ``images``, ``max_abs_diff``, ``top1_agreement`` (fraction of images with the same
        most likely emotion), the limits and ``passed``.
    """
    reference, probabilities = np.asarray(reference), np.asarray(probabilities)
    if probabilities.shape != reference.shape:
        return {"images": int(len(reference)), "max_abs_diff": None, "top1_agreement": None,
                "limit_max_abs_diff": max_abs_diff, "limit_top1_agreement": 1.0,
                "passed": False, "error": f"output shape {probabilities.shape}, expected "
                                          f"{reference.shape}"}
    difference = float(np.max(np.abs(probabilities.astype(np.float64) - reference)))
    agreement = float(np.mean(probabilities.argmax(1) == reference.argmax(1)))
    return {"images": int(len(reference)), "max_abs_diff": difference,
            "top1_agreement": agreement, "limit_max_abs_diff": max_abs_diff,
            "limit_top1_agreement": 1.0,
            "passed": bool(difference <= max_abs_diff and agreement == 1.0)}


# ----------------------------------------------------------------------------- export

def _check_dependencies(fmt: str) -> None:
    """Fail before any slow work when a package the format needs is missing."""
    if fmt == "onnx":
        require("tf2onnx", purpose="ONNX export")
        require("onnx", purpose="ONNX export")
        require("onnxruntime", purpose="the ONNX parity check")


def _version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _describe_artifact(fmt: str, path: Path) -> dict:
    """Input and output names of the written artifact, and its format details."""
    if fmt == "onnx":
        import onnx

        graph = onnx.load(str(path), load_external_data=False)
        return {"input_name": graph.graph.input[0].name, "output_name": graph.graph.output[0].name,
                "opset": max(entry.version for entry in graph.opset_import
                             if entry.domain in ("", "ai.onnx")),
                "runtime": f"onnxruntime {_version('onnxruntime')}",
                "converter": f"tf2onnx {_version('tf2onnx')}"}
    if fmt == "litert":
        interpreter, runtime = litert_interpreter(path)
        return {"input_name": interpreter.get_input_details()[0]["name"],
                "output_name": interpreter.get_output_details()[0]["name"],
                "signature": "serving_default", "runtime": runtime}
    import tensorflow as tf

    serving = tf.saved_model.load(str(path)).signatures["serving_default"]
    return {"input_name": next(iter(serving.structured_input_signature[1])),
            "output_name": next(iter(serving.structured_outputs)),
            "signature": "serving_default",
            "runtime": f"tensorflow {_version('tensorflow')} (tf.saved_model.load)"}


def repair_onnx(path) -> list[str]:
    """Fix, in place, what tf2onnx 1.17 writes wrongly for these models; say what changed.

    - TensorFlow computes the exact GELU of the ViT's MLP with ``Erfc``, which tf2onnx copies
      as an ``Erfc`` node: no such ONNX operator exists. Each becomes ``1 - Erf(x)``.
    - tf2onnx lists the constants a traced function captures (the ViT's position ids, a
      tensor made when the layer is built) as graph inputs, although it folds them into the
      graph. Such unused inputs are dropped, so ``image`` is the only input.

    Parameters
    ----------
    path : str or Path
        The ONNX file Keras wrote.

    Returns
    -------
    list of str
        One line per kind of repair (empty: the file was left as it was).
    """
    onnx = require("onnx", purpose="ONNX export")
    from onnx import TensorProto, helper

    proto = onnx.load(str(path))
    graph, nodes, repairs = proto.graph, [], []
    erfc = 0
    for node in graph.node:
        if node.op_type == "Erfc" and node.domain in ("", "ai.onnx"):
            erfc += 1
            one, erf = f"{node.name}/one", f"{node.name}/erf"
            graph.initializer.append(helper.make_tensor(one, TensorProto.FLOAT, [], [1.0]))
            nodes.append(helper.make_node("Erf", [node.input[0]], [erf], name=erf))
            nodes.append(helper.make_node("Sub", [one, erf], list(node.output), name=node.name))
        else:
            nodes.append(node)
    if erfc:
        del graph.node[:]
        graph.node.extend(nodes)
        repairs.append(f"{erfc} Erfc node(s) -> 1 - Erf")
    used = {name for node in graph.node for name in node.input}
    unused = [entry for entry in graph.input if entry.name != "image" and entry.name not in used]
    for entry in unused:
        graph.input.remove(entry)
    if unused:
        repairs.append(f"{len(unused)} unused input(s) (captured constants) dropped")
    others = [entry.name for entry in graph.input if entry.name != "image"]
    if others:
        raise ValueError(f"ONNX export: the graph needs inputs besides 'image' "
                         f"({', '.join(others)}); this model cannot be exported to ONNX as is")
    if repairs:
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
    return repairs


def _replace(temp: Path, target: Path) -> None:
    """Move a freshly written file or folder onto ``target`` (replacing an older one)."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    os.replace(temp, target)


def export_model(model_path, out, fmt: str = "onnx", *, calibration: bool = True, data=None,
                 synthetic: bool = False, images: int = PARITY_IMAGES,
                 max_abs_diff: float = MAX_ABS_DIFF) -> dict:
    """Export a trained model, write ``labels.json`` beside it and check parity with Keras.

    Parameters
    ----------
    model_path : str or Path
        A ``.keras`` model outputting logits for uint8 ``(N, 48, 48[, 1])`` images.
    out : str or Path
        Folder for the artifact (``model.onnx``, ``model.tflite`` or ``saved_model/``) and
        ``labels.json``; created if needed, an older artifact of the same format is replaced.
    fmt : {"onnx", "litert", "saved_model"}
    calibration : bool
        Divide the logits by the temperature in ``calibration.json`` beside the model, if any.
    data : str or Path, optional
        Dataset for the parity check (default: FER2013 if found, else synthetic faces).
    synthetic : bool
        Check parity on synthetic faces even when FER2013 is available.
    images : int
        Number of parity images.
    max_abs_diff : float
        Largest allowed probability difference.

    Returns
    -------
    dict
        The content of ``labels.json``: ``format``, ``artifact``, ``emotions``, ``input``,
        ``output``, ``temperature``, ``source`` (:func:`source_provenance`), ``exported``
        (versions, date) and ``parity`` (:func:`check_parity` plus the images used and the
        seconds the artifact took). The artifacts are kept when parity fails: the caller
        decides (the command exits with 1).
    """
    from ferlib.inference import class_names, load_model, model_file, stored_temperature
    from ferlib.runs import git_commit, write_json

    if fmt not in FORMATS:
        raise ValueError(f"--format: unknown format {fmt!r}; allowed values: "
                         f"{', '.join(FORMATS)}")
    if images < 1:
        raise ValueError(f"--images must be at least 1; got {images}")
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"export: needs the TensorFlow backend (the ONNX, LiteRT and SavedModel "
                         f"exporters used here go through TensorFlow); this process runs on "
                         f"{keras.backend.backend()}: run it with KERAS_BACKEND=tensorflow (a model "
                         f"trained under another backend loads there too)")
    model_path = model_file(model_path)
    classes = class_names(model_path)
    if data is not None and not Path(data).expanduser().exists():
        raise FileNotFoundError(f"--data: {data}: no such file or folder")
    _check_dependencies(fmt)
    keras_format, artifact_name = FORMATS[fmt]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    temperature = stored_temperature(model_path, calibration)
    model = exportable_model(load_model(model_path), temperature)

    target = out / artifact_name
    suffix = Path(artifact_name).suffix  # Keras wants .tflite on the LiteRT file name
    temp = out / f".{Path(artifact_name).stem}.tmp{os.getpid()}{suffix}"
    started = time.perf_counter()
    try:
        converter_log = logging.getLogger("tf2onnx")
        level = converter_log.level
        # tf2onnx logs the ops repair_onnx rewrites as unsupported; a real failure still
        # shows: ONNX Runtime then rejects the file and the parity check says why.
        converter_log.setLevel(logging.CRITICAL)
        try:
            with warnings.catch_warnings():  # Keras' tf2onnx patch probes np.object
                warnings.simplefilter("ignore", FutureWarning)
                model.export(str(temp), format=keras_format, verbose=False,
                             input_signature=[input_spec()])
        finally:
            converter_log.setLevel(level)
        repairs = repair_onnx(temp) if fmt == "onnx" else []
        _replace(temp, target)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        elif temp.exists():
            temp.unlink()
    export_seconds = time.perf_counter() - started

    batch, described = parity_images(data, images, synthetic)
    reference = model.predict(batch, batch_size=PARITY_IMAGES, verbose=0)
    started = time.perf_counter()
    try:
        probabilities = RUNNERS[fmt](target, batch)
    except MissingDependencyError:
        raise
    except Exception as error:  # the runtime rejects the artifact: a failed check, not a crash
        probabilities = np.full((0, len(classes)), np.nan)
        runtime_error = f"the runtime could not run it ({type(error).__name__}: {error})"
    else:
        runtime_error = None
    parity = {**check_parity(reference, probabilities, max_abs_diff),
              "compared_with": "Keras (the exported inference model's predict)",
              "data": described, "runtime_seconds": time.perf_counter() - started}
    if runtime_error:
        parity["error"] = runtime_error
    details = _describe_artifact(fmt, target)
    labels = {
        "format": fmt, "artifact": artifact_name,
        "emotions": list(classes),
        "input": {"name": details.pop("input_name"), "shape": [None, IMAGE_SIZE, IMAGE_SIZE, 1],
                  "dtype": "uint8",
                  "meaning": "gray face crops, 48x48, pixel values 0-255, as in FER2013 (crop "
                             "the face box plus 10% margin and resize bilinearly, as "
                             "ferlib.faces.crop_face does)"},
        "output": {"name": details.pop("output_name"), "shape": [None, len(classes)],
                   "dtype": "float32",
                   "meaning": "probability of each emotion, in the order of 'emotions' "
                              "(softmax of logits / temperature; each row sums to 1)"},
        "temperature": temperature,
        "calibrated": temperature is not None,
        "source": source_provenance(model_path),
        "exported": {"keras_format": keras_format, **details, "graph_repairs": repairs,
                     "keras": _version("keras"), "tensorflow": _version("tensorflow"),
                     "ferlib_commit": git_commit(), "seconds": export_seconds,
                     "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "parity": parity,
    }
    from ferlib.artifacts import ModelRun
    from ferlib.runs import atomic_write_text

    card = ModelRun(model_path.parent).model_card
    if card.is_file():  # the model's card travels with every export of it
        atomic_write_text(out / card.name, card.read_text())
    labels["model_card"] = card.name if card.is_file() else None
    write_json(out / LABELS_FILE, labels)
    return labels


def format_export(labels: dict, out) -> str:
    """The human-readable lines for :func:`export_model`'s result."""
    parity, source = labels["parity"], labels["source"]
    temperature = (f"stored temperature T = {labels['temperature']:.3f}"
                   if labels["temperature"] is not None else "no temperature (uncalibrated)")
    origin = ", ".join(f"{key} {source[key]}" for key in ("model", "profile", "trained_epochs")
                       if source.get(key) is not None) or "no run files beside the model"
    lines = [f"wrote {Path(out) / labels['artifact']} ({labels['format']}; {temperature}; "
             f"{origin})",
             f"wrote {Path(out) / LABELS_FILE}"]
    if parity.get("error"):
        lines.append(f"parity vs Keras on {parity['data']}: {parity['error']}")
    else:
        lines.append(
            f"parity vs Keras on {parity['data']} with {labels['exported']['runtime']}: "
            f"max |difference| {parity['max_abs_diff']:.2e} "
            f"(limit {parity['limit_max_abs_diff']:.0e}), "
            f"top-1 agreement {parity['top1_agreement']:.2%}: "
            f"{'PASS' if parity['passed'] else 'FAIL'}")
    return "\n".join(lines)
