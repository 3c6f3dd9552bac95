"""Parameters: load a profile from ``params/<profile>.yaml``, merge overrides, validate, resolve paths.

Every setting is declared once in :data:`SCHEMA` with its type and default. A profile YAML only
lists what it changes. Unknown keys, wrong types and unknown model names raise ``ValueError``
naming the key and the allowed values.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path

import yaml

from ferlib import MODEL_NAMES

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PARAMS_DIR = PROJECT_ROOT / "params"
NUMBER = (int, float)

# Settings shared by every model; ``train_overrides.<model>`` may change any of them per model.
TRAIN_SCHEMA = {
    "epochs": (int, 30),
    "batch_size": (int, 64),
    "optimizer": (("adam", "adamw", "sgd"), "adamw"),
    "learning_rate": (NUMBER, 1e-3),
    "weight_decay": (NUMBER, 1e-4),
    "momentum": (NUMBER, 0.9),              # SGD (Nesterov) only
    "schedule": (("cosine", "plateau", "constant"), "cosine"),
    "warmup_epochs": (NUMBER, 1.0),
    "min_learning_rate": (NUMBER, 0.0),
    "plateau_factor": (NUMBER, 0.5),
    "plateau_patience": (int, 2),
    "label_smoothing": (NUMBER, 0.0),
    "early_stopping_patience": ((int, type(None)), 8),
    "class_weights": (bool, False),
    # Optional safety stop (wall-clock minutes); off in the shipped profiles, which fix epochs.
    "budget_minutes": ((*NUMBER, type(None)), None),
    "precision": (("float32", "mixed_bfloat16", "mixed_float16"), "float32"),
    # XLA for TensorFlow's train step: off, as it is slower on these CPUs. Under JAX it is
    # always on (see model_settings): without it JAX runs each step op by op.
    "jit_compile": (bool, False),
    "deterministic": (bool, False),
    "tta": (bool, True),
    # none | data_parallel (keras.distribution.DataParallel, JAX backend) | auto (data-parallel
    # when JAX sees more than one accelerator). batch_size is the global batch either way.
    "distribution": (("none", "data_parallel", "auto"), "none"),
}

AUGMENT_SCHEMA = {
    "flip": (bool, True),
    "rotation": (NUMBER, 0.0),        # fraction of a full turn, as keras.layers.RandomRotation
    "translation": (NUMBER, 0.0),     # fraction of the image size
    "zoom": (NUMBER, 0.0),
    "erasing": (NUMBER, 0.0),         # probability of RandomErasing
    "rand_augment": (bool, False),
    "mixup": (NUMBER, 0.0),           # probability of MixUp per batch (Keras core layer)
    "cutmix": (NUMBER, 0.0),          # probability of CutMix per batch (Keras core layer)
}

MODEL_SCHEMAS = {
    "alexnet": {
        "input_size": (int, 48), "width": (NUMBER, 1.0), "dense_units": (int, 1024),
        "dropout_rate": (NUMBER, 0.5), "weights": ((str, type(None)), None),
    },
    "resnet50v2": {
        "input_size": (int, 48), "dropout_rate": (NUMBER, 0.3), "bn_momentum": (NUMBER, 0.9),
        "weights": ((str, type(None)), None),
    },
    "vit": {
        "input_size": (int, 48), "patch_size": (int, 6), "num_layers": (int, 6),
        "num_heads": (int, 4), "hidden_dim": (int, 192), "mlp_dim": (int, 384),
        "dropout_rate": (NUMBER, 0.1), "attention_dropout": (NUMBER, 0.0),
        "weights": ((str, type(None)), None),
    },
}

SCHEMA = {
    "profile": (str, "custom"),
    "description": (str, ""),
    "seed": (int, 42),
    "models": (list, list(MODEL_NAMES)),
    "cv_folds": (int, 0),
    "data": {
        "path": ((str, type(None)), None),
        "val_fraction": (NUMBER, 0.1),
        "limit_per_split": ((dict, type(None)), None),
        "on_error": (("raise", "skip"), "raise"),
    },
    "train": TRAIN_SCHEMA,
    "augment": AUGMENT_SCHEMA,
    "model_params": MODEL_SCHEMAS,
    "train_overrides": {name: {key: spec for key, spec in TRAIN_SCHEMA.items()}
                        for name in MODEL_NAMES},
    "report": {
        "bootstrap_samples": (int, 1000),
        "misclassified_examples": (int, 24),
    },
}


def _type_name(expected) -> str:
    if isinstance(expected, tuple) and all(isinstance(e, str) for e in expected):
        return "one of " + ", ".join(expected)
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _validate(values: dict, schema: dict, where: str, partial: bool) -> dict:
    """Check ``values`` against ``schema``; fill defaults unless ``partial``."""
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'params'}: expected a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - set(schema))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ValueError(f"unknown key {key!r}; allowed keys: {', '.join(schema)}")
    result = {}
    for key, spec in schema.items():
        path = f"{where}.{key}" if where else key
        if isinstance(spec, dict):
            is_override = where.startswith("train_overrides")
            result[key] = _validate(values.get(key, {}) or {}, spec, path,
                                    partial or is_override or where == "train_overrides")
            continue
        expected, default = spec
        if key not in values:
            if not partial:
                result[key] = copy.deepcopy(default)
            continue
        value = values[key]
        if isinstance(expected, tuple) and all(isinstance(e, str) for e in expected):
            if value not in expected:
                raise ValueError(f"{path}: {value!r} is not allowed; allowed values: "
                                 f"{', '.join(expected)}")
        elif isinstance(value, bool) and bool not in (expected if isinstance(expected, tuple)
                                                      else (expected,)):
            raise ValueError(f"{path}: expected {_type_name(expected)}, got a boolean")
        elif not isinstance(value, expected):
            raise ValueError(f"{path}: expected {_type_name(expected)}, "
                             f"got {type(value).__name__} {value!r}")
        if isinstance(expected, tuple) and float in expected and isinstance(value, int):
            value = float(value)
        result[key] = value
    return result


def validate(params: dict) -> dict:
    """Validate a full parameter mapping and fill in every default."""
    resolved = _validate(params, SCHEMA, "", partial=False)
    for name in resolved["models"]:
        if name not in MODEL_NAMES:
            raise ValueError(f"models: unknown model {name!r}; allowed values: "
                             f"{', '.join(MODEL_NAMES)}")
    limits = resolved["data"]["limit_per_split"]
    if limits:
        for split, limit in limits.items():
            if split not in ("train", "val", "test") or not isinstance(limit, int):
                raise ValueError(f"data.limit_per_split.{split}: expected train/val/test mapped "
                                 f"to an integer, got {split}: {limit!r}")
    if resolved["cv_folds"] == 1 or resolved["cv_folds"] < 0:
        raise ValueError("cv_folds: expected 0 (official split) or at least 2")
    return resolved


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; read it as the float people mean."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text_or_stream):
    return yaml.load(text_or_stream, Loader=_Loader)


def deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def profile_path(profile: str) -> Path:
    path = Path(profile)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = PARAMS_DIR / f"{profile}.yaml"
    if not path.exists():
        available = ", ".join(sorted(p.stem for p in PARAMS_DIR.glob("*.yaml")))
        raise ValueError(f"profile {profile!r}: no file {path}; available profiles: {available}")
    return path


def load_params(profile: str = "smoke", overrides: dict | None = None) -> dict:
    """Load ``params/<profile>.yaml``, apply ``overrides`` (nested dict), validate.

    The data path is resolved here: ``FER2013_PATH`` beats the file; relative paths are taken
    from the project root.
    """
    with open(profile_path(profile)) as handle:
        raw = load_yaml(handle) or {}
    raw.setdefault("profile", Path(profile).stem)
    params = validate(deep_merge(raw, overrides or {}))
    params["data"]["path"] = str(resolve_data_path(params["data"]["path"], must_exist=False))
    return params


def parse_overrides(items: list[str]) -> dict:
    """``["train.epochs=3", "models=[vit]"]`` -> nested dict (values parsed as YAML)."""
    result: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = load_yaml(value)
    return result


DEFAULT_DATA_LOCATIONS = ("data/fer2013.zip", "data/fer2013.csv", "data/fer2013.csv.gz",
                          "data/fer2013")


def resolve_data_path(path: str | None = None, must_exist: bool = True) -> Path:
    """Where FER2013 is: ``$FER2013_PATH``, else ``path``, else the usual places under data/."""
    candidates = []
    if os.environ.get("FER2013_PATH"):
        candidates.append(Path(os.environ["FER2013_PATH"]).expanduser())
    elif path:
        candidates.append(Path(path).expanduser())
    else:
        candidates.extend(PROJECT_ROOT / location for location in DEFAULT_DATA_LOCATIONS)
    candidates = [c if c.is_absolute() else PROJECT_ROOT / c for c in candidates]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    if not must_exist:
        return candidates[0]
    from ferlib.data import DatasetNotFoundError

    looked = "\n  ".join(str(c) for c in candidates)
    raise DatasetNotFoundError(
        f"FER2013 not found. Looked in:\n  {looked}\n"
        "Get it from Kaggle, either distribution works:\n"
        "  - the original challenge file fer2013.csv (columns emotion,pixels,Usage), or\n"
        "  - the 'FER-2013' images archive (train/<class>/, test/<class>/ as a .zip or folder).\n"
        "Then set FER2013_PATH=/path/to/fer2013.zip (or .csv, or the folder), or put it at "
        "data/fer2013.zip (a symlink is fine; data/ is git-ignored).")


def keras_backend() -> str:
    """The Keras backend in use, without importing Keras (which would start TensorFlow)."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return keras.backend.backend()
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def model_settings(params: dict, model_name: str) -> dict:
    """Everything that determines one model's training: merged train settings, model
    hyperparameters, augmentation and seed. Saved with the model and used to detect change."""
    if model_name not in MODEL_NAMES:
        raise ValueError(f"model: unknown model {model_name!r}; allowed values: "
                         f"{', '.join(MODEL_NAMES)}")
    train = deep_merge(params["train"], params["train_overrides"].get(model_name, {}))
    if keras_backend() == "jax":
        # jit_compile=False under JAX means an uncompiled, op-by-op step: measured on an H200,
        # the full profile's ResNet50V2 trained at 84 img/s that way, slower than this CPU.
        train["jit_compile"] = True
    return {"model": model_name, "seed": params["seed"], "train": train,
            "augment": copy.deepcopy(params["augment"]),
            "model_params": copy.deepcopy(params["model_params"][model_name]),
            "data": {k: params["data"][k] for k in ("val_fraction", "limit_per_split",
                                                   "on_error")},
            "cv_folds": params["cv_folds"]}
