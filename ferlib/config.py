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

from ferlib import MODEL_NAMES, PAPER_MODELS, PROJECT_ROOT

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
    # false: no weight decay on biases, normalisation scales and offsets, position embeddings
    # and class tokens (every 1-D variable and the embeddings), as small-data ViT recipes do.
    "decay_all_weights": (bool, True),
    # Exponential moving average of the weights (Keras optimizers' use_ema): its momentum, or
    # null for none. PublicTest is scored, and the best epoch kept, with the averaged weights.
    "ema_momentum": ((*NUMBER, type(None)), None),
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
    # Test-time augmentation also tries the mirror plus this many crops (10: ten-crop with the
    # flip); the variant with the better PublicTest accuracy is the one applied to PrivateTest.
    "tta_crops": (int, 0),
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
        "dense_units": (int, 0),  # a hidden Dense layer in the head; 0: none (GAP -> logits)
        "weights": ((str, type(None)), None),
    },
    "vit": {
        "input_size": (int, 48), "patch_size": (int, 6), "num_layers": (int, 6),
        "num_heads": (int, 4), "hidden_dim": (int, 192), "mlp_dim": (int, 384),
        "dropout_rate": (NUMBER, 0.1), "attention_dropout": (NUMBER, 0.0),
        "pooling": (("class_token", "mean"), "class_token"),
        "weights": ((str, type(None)), None),
    },
    # The same transformer behind a convolutional stem (Xiao et al. 2021): ``stem_layers``
    # stride-2 3x3 convolutions, then tokens of patch_size / 2**stem_layers feature-map pixels,
    # so ``patch_size`` still says how many input pixels a token covers.
    "vit_conv": {
        "input_size": (int, 48), "patch_size": (int, 4), "stem_layers": (int, 2),
        "num_layers": (int, 4), "num_heads": (int, 4), "hidden_dim": (int, 128),
        "mlp_dim": (int, 256), "dropout_rate": (NUMBER, 0.1), "attention_dropout": (NUMBER, 0.0),
        "pooling": (("class_token", "mean"), "mean"), "weights": ((str, type(None)), None),
    },
}

# ``search:`` in a profile: the Optuna recipe search (``python -m ferlib search``). The space
# itself (``search.space``) maps dotted paths to ranges and is checked by _validate_search.
SEARCH_SCHEMA = {
    "trials": (int, 16),            # finished (complete or pruned) trials per model: the budget
    "epochs": (int, 6),             # at most this many epochs per trial (cosine planned on it)
    "train_images": ((int, type(None)), 8000),  # stratified subset of Training; null: all
    "pruner": (("median", "successive_halving", "hyperband", "threshold", "none"), "median"),
    "startup_trials": (int, 4),     # median pruner: trials that are never pruned
    "warmup_epochs": (int, 2),      # median pruner: epochs of every trial that are never pruned
    "threshold": ((*NUMBER, type(None)), None),  # threshold pruner: lowest PublicTest accuracy
    "heartbeat_seconds": (int, 60),  # a trial silent for 3 heartbeats counts as dead: retried
    # A folder (relative to the project) for a committed copy of the studies' finished trials,
    # one Optuna journal per model, so the search survives a new machine; null: no copy.
    "record": ((str, type(None)), None),
    "fixed": (dict, {}),            # dotted path -> value, the same in every trial
    "space": (dict, {}),            # "all" or a model name -> dotted path -> range or choices
}
SEARCH_RANGE_KEYS = ("low", "high", "log", "step", "choices")

# ``ablation:`` in a profile: A/B runs of training techniques on top of the adopted recipes
# (``python -m ferlib ablation``), under the search's protocol (its subset, epochs and fixed
# settings). Each variant maps dotted paths to values; "baseline" (the recipe as it is) is added.
ABLATION_SCHEMA = {
    "models": (list, []),           # the models to A/B (each of MODEL_NAMES)
    "seeds": (int, 2),              # training seeds per variant (the same seeds for every one)
    "variants": (dict, {}),         # name -> {dotted path: value}
}

SCHEMA = {
    "profile": (str, "custom"),
    "description": (str, ""),
    "seed": (int, 42),
    "models": (list, list(PAPER_MODELS)),
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
    # Per-model augmentation strengths (a searched recipe may want its own).
    "augment_overrides": {name: dict(AUGMENT_SCHEMA) for name in MODEL_NAMES},
    "search": SEARCH_SCHEMA,
    "ablation": ABLATION_SCHEMA,
    # Extra labelled datasets for the cross-dataset page (05_cross): name -> a path (``$VAR``
    # and ``~`` expanded) or {path, group_pattern, class_map}; see ferlib.cross.
    "cross_datasets": (dict, {}),
    "report": {
        "bootstrap_samples": (int, 1000),
        "misclassified_examples": (int, 24),
    },
}


# Allowed ranges, by setting name (the same name means the same thing in every section), and
# by full path where one section differs. (low, high, low included, high included); None: open.
AT_LEAST_1 = (1, None, True, True)
AT_LEAST_0 = (0, None, True, True)
POSITIVE = (0, None, False, True)
FRACTION = (0, 1, True, True)
BELOW_1 = (0, 1, True, False)
RANGES = {
    "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "learning_rate": POSITIVE,
    "weight_decay": AT_LEAST_0, "momentum": BELOW_1, "warmup_epochs": AT_LEAST_0,
    "min_learning_rate": AT_LEAST_0, "plateau_factor": (0, 1, False, True),
    "plateau_patience": AT_LEAST_1, "label_smoothing": BELOW_1,
    "early_stopping_patience": AT_LEAST_1, "budget_minutes": POSITIVE,
    "rotation": FRACTION, "translation": FRACTION, "zoom": FRACTION, "erasing": FRACTION,
    "mixup": FRACTION, "cutmix": FRACTION, "input_size": (8, None, True, True),
    "width": POSITIVE, "dense_units": AT_LEAST_1, "dropout_rate": BELOW_1,
    "attention_dropout": BELOW_1, "bn_momentum": BELOW_1, "patch_size": AT_LEAST_1,
    "num_layers": AT_LEAST_1, "num_heads": AT_LEAST_1, "hidden_dim": AT_LEAST_1,
    "mlp_dim": AT_LEAST_1, "stem_layers": AT_LEAST_1, "seed": AT_LEAST_0,
    "val_fraction": BELOW_1, "bootstrap_samples": AT_LEAST_0,
    "misclassified_examples": AT_LEAST_0, "trials": AT_LEAST_1, "train_images": AT_LEAST_1,
    "startup_trials": AT_LEAST_0, "heartbeat_seconds": AT_LEAST_1, "threshold": FRACTION,
    "ema_momentum": (0, 1, False, False), "tta_crops": (0, 8, True, True),
}
PATH_RANGES = {
    "model_params.resnet50v2.dense_units": AT_LEAST_0,   # 0: no hidden layer in the head
    "search.warmup_epochs": AT_LEAST_0,
}


def _check_range(path: str, value) -> None:
    """One line naming the key, its value and the allowed range, for an out-of-range number."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    parts = path.split(".")
    # train_overrides.<model>.<key> and augment_overrides.<model>.<key> mean train.<key>...
    spec = PATH_RANGES.get(path) or PATH_RANGES.get(".".join(parts[-2:])) \
        or RANGES.get(parts[-1])
    if spec is None:
        return
    low, high, low_in, high_in = spec
    too_low = low is not None and (value < low if low_in else value <= low)
    too_high = high is not None and (value > high if high_in else value >= high)
    if too_low or too_high:
        left = "" if low is None else f"{low} {'<=' if low_in else '<'} "
        right = "" if high is None else f" {'<=' if high_in else '<'} {high}"
        raise ValueError(f"{path}: {value!r} is out of range; expected {left}{parts[-1]}{right}")


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
            is_override = where.split(".")[0].endswith("_overrides")
            result[key] = _validate(values.get(key, {}) or {}, spec, path,
                                    partial or is_override)
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
        _check_range(path, value)
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
    for name in ("vit", "vit_conv"):
        model = resolved["model_params"][name]
        if model["input_size"] % model["patch_size"]:
            raise ValueError(f"model_params.{name}.patch_size: {model['patch_size']} does not "
                             f"divide input_size {model['input_size']}")
        if model["patch_size"] % 2 ** model.get("stem_layers", 0):
            raise ValueError(f"model_params.{name}.patch_size: {model['patch_size']} is not a "
                             f"multiple of 2**stem_layers ({2 ** model['stem_layers']})")
        if model["hidden_dim"] % model["num_heads"]:
            raise ValueError(f"model_params.{name}.hidden_dim: {model['hidden_dim']} does not "
                             f"split into {model['num_heads']} heads (num_heads)")
    _validate_search(resolved)
    _validate_ablation(resolved)
    _validate_cross_datasets(resolved["cross_datasets"])
    return resolved


CROSS_DATASET_KEYS = ("path", "group_pattern", "class_map")


def _validate_cross_datasets(datasets: dict) -> None:
    """Each entry a path string, or a mapping with a ``path`` and optional ``group_pattern``
    (a regular expression) and ``class_map`` (folder name -> emotion)."""

    for name, entry in datasets.items():
        where = f"cross_datasets.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise ValueError(f"{where}: a dataset name is letters, digits, '_', '.' or '-' "
                             f"(it names files)")
        if isinstance(entry, str):
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a path or a mapping with path, group_pattern, "
                             f"class_map; got {entry!r}")
        _reject_unknown_keys(entry, CROSS_DATASET_KEYS, where)
        if not isinstance(entry.get("path"), str):
            raise ValueError(f"{where}.path: expected a path string, got {entry.get('path')!r}")
        pattern = entry.get("group_pattern")
        if pattern is not None:
            try:
                re.compile(str(pattern))
            except re.error as error:
                raise ValueError(f"{where}.group_pattern: not a regular expression "
                                 f"({error})") from None
        class_map = entry.get("class_map")
        if class_map is not None and not isinstance(class_map, dict):
            raise ValueError(f"{where}.class_map: expected folder name -> emotion, got "
                             f"{class_map!r}")


# ----------------------------------------------------------------------------- search space

SEARCH_GROUPS = {"train": "train_overrides", "augment": "augment_overrides",
                 "model": "model_params"}
"""The first part of a search path and where a value for one model goes in a profile."""


def search_target(path: str, model_name: str, where: str | None = None):
    """The schema entry (type, default) that ``train.<key>`` / ``augment.<key>`` /
    ``model.<key>`` names for ``model_name``; a ValueError naming ``where`` if none."""
    where = where or path
    group, _, key = path.partition(".")
    schemas = {"train": TRAIN_SCHEMA, "augment": AUGMENT_SCHEMA,
               "model": MODEL_SCHEMAS[model_name]}
    if group not in schemas or not key:
        raise ValueError(f"{where}: expected train.<key>, augment.<key> or model.<key>, "
                         f"got {path!r}")
    if key not in schemas[group]:
        raise ValueError(f"{where}: {key!r} is not a {group} setting"
                         + (f" of {model_name}" if group == "model" else "")
                         + f"; allowed keys: {', '.join(schemas[group])}")
    return schemas[group][key]


def record_path(params: dict, model_name: str) -> Path | None:
    """The committed journal of one model's recipe search (``search.record``), or None."""
    folder = params["search"].get("record")
    if not folder:
        return None
    return (PROJECT_ROOT / folder / f"{model_name}.journal").resolve()


def search_overrides(values: dict, model_name: str) -> dict:
    """Dotted search paths with values -> the nested profile mapping that sets them for
    ``model_name`` only (``train.learning_rate`` -> ``train_overrides.<model>.learning_rate``)."""
    nested: dict = {}
    for path, value in values.items():
        group, _, key = path.partition(".")
        nested.setdefault(SEARCH_GROUPS[group], {}).setdefault(model_name, {})[key] = value
    return nested


def _validate_search(params: dict) -> None:
    """Ranges and choices of ``search.space`` and the values of ``search.fixed``, per model."""
    search = params["search"]
    for key in ("trials", "epochs"):
        if search[key] < 1:
            raise ValueError(f"search.{key}: expected at least 1, got {search[key]}")
    if search["train_images"] is not None and search["train_images"] < 1:
        raise ValueError("search.train_images: expected a positive number of images or null")
    if search["pruner"] == "threshold" and search["threshold"] is None:
        raise ValueError("search.threshold: the threshold pruner needs a lowest PublicTest "
                         "accuracy, e.g. 0.2")
    unknown = sorted(set(search["space"]) - {"all", *MODEL_NAMES})
    if unknown:
        raise ValueError(f"unknown key 'search.space.{unknown[0]}'; allowed keys: all, "
                         f"{', '.join(MODEL_NAMES)}")
    for name in MODEL_NAMES:
        check = name in params["models"] or name in search["space"]
        if not check:
            continue
        fixed = dict(search["fixed"])
        for group in ("all", name):
            for path, spec in (search["space"].get(group) or {}).items():
                where = f"search.space.{group}.{path}"
                expected, _ = search_target(path, name, where)
                _validate_range(spec, expected, where)
        for path, value in fixed.items():
            search_target(path, name, f"search.fixed.{path}")
        _check_vit_shapes(params, name, search)
        _validate(deep_merge(params, search_overrides(fixed, name)), SCHEMA, "", partial=True)


def _validate_ablation(params: dict) -> None:
    """Known models, at least one seed, and variants of known paths with values of the right
    type and range for every ablated model."""
    ablation = params["ablation"]
    for name in ablation["models"]:
        if name not in MODEL_NAMES:
            raise ValueError(f"ablation.models: unknown model {name!r}; allowed values: "
                             f"{', '.join(MODEL_NAMES)}")
    if ablation["seeds"] < 1:
        raise ValueError(f"ablation.seeds: expected at least 1, got {ablation['seeds']}")
    for variant, values in ablation["variants"].items():
        where = f"ablation.variants.{variant}"
        if variant == "baseline" or not re.fullmatch(r"[A-Za-z0-9_.-]+", str(variant)):
            raise ValueError(f"{where}: a variant name is letters, digits, '_', '.' or '-', and "
                             f"not 'baseline' (the recipe as it is, always run)")
        if not isinstance(values, dict) or not values:
            raise ValueError(f"{where}: expected a mapping of dotted paths to values, e.g. "
                             f"{{train.ema_momentum: 0.999}}; got {values!r}")
        for name in ablation["models"]:
            for path in values:
                search_target(path, name, f"{where}.{path}")
            _validate(deep_merge(params, search_overrides(values, name)), SCHEMA, "",
                      partial=True)


def _check_vit_shapes(params: dict, name: str, search: dict) -> None:
    """Every searched patch size divides the input, every width splits into the heads."""
    if not name.startswith("vit"):
        return
    space = {**(search["space"].get("all") or {}), **(search["space"].get(name) or {})}
    model = params["model_params"][name]

    def values(key):
        spec = space.get(f"model.{key}")
        if spec is None:
            return [model[key]]
        return spec["choices"] if "choices" in spec else [spec["low"], spec["high"]]

    for patch in values("patch_size"):
        if model["input_size"] % patch or patch % 2 ** model.get("stem_layers", 0):
            raise ValueError(f"search.space: model.patch_size {patch} of {name} must divide "
                             f"input_size {model['input_size']}"
                             + (" and be a multiple of 2**stem_layers" if "stem_layers" in model
                                else ""))
    for width in values("hidden_dim"):
        for heads in values("num_heads"):
            if width % heads:
                raise ValueError(f"search.space: model.hidden_dim {width} of {name} does not "
                                 f"split into {heads} heads (model.num_heads)")


def _reject_unknown_keys(mapping: dict, allowed, where: str) -> None:
    """The one-line unknown-key error for a mapping whose keys are a fixed set."""
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key '{where}.{unknown[0]}'; allowed keys: "
                         f"{', '.join(allowed)}")


def _validate_range(spec, expected, where: str) -> None:
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{where}: expected {{low: .., high: ..[, log: true][, step: ..]}} or "
                         f"{{choices: [..]}}, got {spec!r}")
    _reject_unknown_keys(spec, SEARCH_RANGE_KEYS, where)
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise ValueError(f"{where}: give either choices or low/high, not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{where}.choices: expected a non-empty list, got {choices!r}")
        for index, choice in enumerate(choices):
            _validate({"value": choice}, {"value": (expected, None)}, f"{where}.choices[{index}]",
                      partial=True)
        return
    numeric = expected in (int, NUMBER) or expected == (*NUMBER,)
    if not numeric:
        raise ValueError(f"{where}: a {_type_name(expected)} setting takes choices, not a range")
    for bound in ("low", "high"):
        value = spec.get(bound)
        if isinstance(value, bool) or not isinstance(value, NUMBER):
            raise ValueError(f"{where}.{bound}: expected a number, got {value!r}")
        if expected is int and not isinstance(value, int):
            raise ValueError(f"{where}.{bound}: this setting is an integer, got {value!r}")
    if spec["low"] > spec["high"]:
        raise ValueError(f"{where}: low {spec['low']} is above high {spec['high']}")
    if spec.get("log") and spec["low"] <= 0:
        raise ValueError(f"{where}: a log range needs low > 0, got {spec['low']}")
    if spec.get("log") and spec.get("step"):
        raise ValueError(f"{where}: give log or step, not both")


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


def read_profile_yaml(path: Path) -> dict:
    """A profile file as a mapping; YAML mistakes are one line with the file, line and column."""
    try:
        with open(path) as handle:
            raw = load_yaml(handle)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings (key: value lines), got a "
                         f"{type(raw).__name__}")
    return raw


def load_params(profile: str = "smoke", overrides: dict | None = None) -> dict:
    """Load ``params/<profile>.yaml``, apply ``overrides`` (nested dict), validate.

    The data path is resolved here: ``FER2013_PATH`` beats the file; relative paths are taken
    from the project root.
    """
    path = profile_path(profile)
    raw = read_profile_yaml(path)
    raw.setdefault("profile", Path(profile).stem)
    from ferlib.data import resolve_data_path

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
    augment = deep_merge(params["augment"], params["augment_overrides"].get(model_name, {}))
    return {"model": model_name, "seed": params["seed"], "train": train,
            "augment": augment,
            "model_params": copy.deepcopy(params["model_params"][model_name]),
            "data": {k: params["data"][k] for k in ("val_fraction", "limit_per_split",
                                                   "on_error")},
            "cv_folds": params["cv_folds"]}
