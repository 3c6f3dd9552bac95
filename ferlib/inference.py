"""The inference core: load a trained model, its calibrated probabilities, one model or an
ensemble. Training, evaluate, predict, video, explain and export all predict through here.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np

from ferlib import EMOTIONS, metrics


_TWINS = weakref.WeakKeyDictionary()


def model_input(model):
    """The model's input tensor (a list only for several inputs: no structure warning)."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def model_output(model):
    return model.outputs[0] if len(model.outputs) == 1 else model.outputs


def _twin(model):
    """A model sharing ``model``'s layers and weights, with a predict function of its own.

    TensorFlow relaxes a traced predict function to unknown rank when one model is fed
    (N, 48, 48) and then (N, 48, 48, 1) batches, which Keras cannot run: a caller that also
    predicts with the model itself (a user, a notebook) is kept apart from ferlib's calls."""
    if model not in _TWINS:
        import keras

        _TWINS[model] = keras.Model(model_input(model), model_output(model))
    return _TWINS[model]


def predict_proba(model, images: np.ndarray, batch_size: int = 256,
                  pad_batches: bool = False, isolated: bool = False) -> np.ndarray:
    """Class probabilities (softmax of the model's logits) for uint8 images: the one forward
    pass of ferlib (training's validation, evaluate, predict, video, saliency, export checks).

    Images are fed as ``(N, 48, 48, 1)`` whatever their shape: TensorFlow relaxes a traced
    predict function to unknown rank when one model sees two ranks, which Keras cannot run.
    ``pad_batches`` pads the images to a whole number of batches (one trace per model for
    callers that predict many small sets, as occlusion does); ``isolated`` predicts through a
    twin of the model (:func:`_twin`; saliency uses it on models it is handed). Under a
    data-parallel distribution the images are padded to a multiple of the device count (every batch must
    split evenly). Padding is dropped from the result."""
    import keras

    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    devices = 1
    if keras.backend.backend() == "jax" and keras.distribution.distribution() is not None:
        devices = len(keras.distribution.distribution().device_mesh.devices.flatten())
    padding = -len(images) % (batch_size if pad_batches else devices)
    if padding:
        images = np.concatenate([images, np.repeat(images[-1:], padding, axis=0)])
    predictor = _twin(model) if isolated else model
    logits = np.asarray(predictor.predict(images, batch_size=batch_size, verbose=0))
    return metrics.softmax(logits[:len(logits) - padding].astype(np.float64))


def class_names(model_path) -> tuple[str, ...]:
    """The classes of a model's outputs, in order: ``classes.json`` beside it (a fine-tuned
    head of its own), else the 7 FER2013 emotions."""
    from ferlib.artifacts import ModelRun
    from ferlib.runs import read_json

    path = Path(model_path)
    path = ModelRun(path if path.is_dir() else path.parent).classes
    if not path.is_file():
        return EMOTIONS
    names = read_json(path)
    if (not isinstance(names, list) or len(names) < 2
            or not all(isinstance(name, str) and name for name in names)):
        raise ValueError(f"{path}: expected a JSON list of at least 2 class names (written by "
                         f"python -m ferlib finetune)")
    return tuple(names)


def load_model(model_path):
    """Load a ``.keras`` model that maps uint8 48x48 images to one logit per class
    (``ferlib.train``'s: the 7 emotions; a fine-tuned head: the classes in ``classes.json``).

    Parameters
    ----------
    model_path : str or Path

    Returns
    -------
    keras.Model
    """
    import zipfile

    model_path = model_file(model_path)
    if model_path.suffix == ".keras" and not zipfile.is_zipfile(model_path):
        raise ValueError(f"{model_path}: not a complete .keras file (a .keras model is a zip "
                         f"archive; this one is damaged or truncated): copy or train it again")
    import keras

    import ferlib.models  # noqa: F401  (registers the custom layers before loading)

    try:
        model = keras.models.load_model(model_path, compile=False)
    except Exception as error:  # Keras raises many types for a foreign or damaged file
        raise ValueError(f"{model_path}: cannot load as a Keras model "
                         f"({type(error).__name__}: {error})") from error
    num_outputs, names = model.output_shape[-1], class_names(model_path)
    if num_outputs != len(names):
        raise ValueError(f"{model_path}: the model has {num_outputs} outputs; expected "
                         f"{len(names)}, one per class ({', '.join(names)})")
    return model


def model_file(model_path) -> Path:
    """The model's path; checked before any slow work so a typo fails at once."""
    model_path = Path(model_path).expanduser()
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: no such model file (expected a .keras file, "
                                f"e.g. runs/<profile>/models/<name>/best.keras)")
    return model_path


def model_files(model_paths) -> list[Path]:
    """One model path or several (an ensemble), each checked before any slow work."""
    if isinstance(model_paths, (str, Path)):
        model_paths = [model_paths]
    if not model_paths:
        raise ValueError("no model given: pass --model FILE (repeat it for an ensemble)")
    return [model_file(path) for path in model_paths]


def stored_temperature(model_path, calibration):
    """The stored temperature when ``calibration`` is on and one exists, else None."""
    from ferlib.calibration import load_temperature

    return load_temperature(model_path) if calibration else None


def probabilities(model, images, tta=False, temperature=None):
    """Probabilities of one model, divided by ``temperature`` first (None: as trained), with
    flip test-time augmentation when ``tta``."""
    def calibrated(batch):
        proba = predict_proba(model, batch)
        return proba if temperature is None else metrics.apply_temperature(proba, temperature)

    if tta:  # each view calibrated, then averaged
        return metrics.tta_probabilities(calibrated, images)
    return calibrated(images)


class Predictor:
    """One model, or an ensemble of several: the mean of the members' probabilities, each
    scaled by its own stored temperature (when calibration is on and it has one)."""

    def __init__(self, model_paths, calibration=True):
        self.paths = model_files(model_paths)
        self.temperatures = [stored_temperature(path, calibration) for path in self.paths]
        self.models = [load_model(path) for path in self.paths]
        classes = {class_names(path) for path in self.paths}
        if len(classes) > 1:
            raise ValueError("an ensemble's models must share their classes; got "
                             + " vs ".join(", ".join(names) for names in sorted(classes)))
        self.classes = classes.pop()

    @property
    def description(self):
        """The model's path, or the list of the ensemble's paths (for result records)."""
        names = [str(path) for path in self.paths]
        return names[0] if len(names) == 1 else names

    @property
    def temperature(self):
        """The temperature (None: uncalibrated), or one per member for an ensemble."""
        return self.temperatures[0] if len(self.paths) == 1 else self.temperatures

    def probabilities(self, images, tta=False) -> np.ndarray:
        return np.mean([probabilities(model, images, tta, temperature) for model, temperature
                        in zip(self.models, self.temperatures)], axis=0)
