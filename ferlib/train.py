"""Training: fit one model on the official split (or k folds), resumable, timed, with artifacts.

``train(model_name, data, params, run_dir)`` writes ``run_dir/models/<name>/``:

- ``best.keras``: the model at its best validation (PublicTest) accuracy, without optimizer state
- ``history.csv``: per epoch train/val loss and accuracy, learning rate
- ``timing.csv``: per epoch seconds (training, evaluation) and training images per second
- ``predictions.npz``: validation and test probabilities (and test with flip TTA), labels
- ``metrics.json``: best epoch, why training stopped, validation and test metrics
- ``settings.json``: everything that determined the training (compared on resume)
- ``calibration.json``: the temperature fitted on PublicTest (``ferlib.calibration``)

The names are ``ferlib.artifacts``' (the run directory's contract).

After every epoch an epoch-numbered checkpoint (model + optimizer) and ``state.json`` are
written atomically; ``state.json`` is the commit point, so a run killed at any moment (even
``kill -9``) resumes from its last completed epoch and lists every epoch exactly once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ferlib import NUM_CLASSES, metrics, tensorboard_logs
from ferlib.config import model_settings
from ferlib.data import FERData, class_weights, stratified_folds
from ferlib.artifacts import ModelRun, Run
from ferlib.inference import predict_proba
from ferlib.runs import atomic_save, code_fingerprint, fingerprint, read_json, write_json

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"]
# Code that evaluates, reads inputs or writes files: it does not change what a model learns, and
# its inputs (settings, data) are fingerprinted by value. Everything else that ``train`` runs,
# wherever it lives, is "the training code" (see training_code).
NOT_TRAINING_MODULES = ("ferlib.metrics", "ferlib.runs", "ferlib.config", "ferlib.data",
                        "ferlib.artifacts", "ferlib.calibration", "ferlib.card",
                        "ferlib.tensorboard_logs")
TIMING_COLUMNS = ["epoch", "seconds", "train_seconds", "eval_seconds", "images_per_second"]


# ----------------------------------------------------------------------------- schedule

def learning_rate_at(step: int, steps_per_epoch: int, planned_epochs: int, train: dict,
                     plateau_scale: float = 1.0) -> float:
    """Learning rate at an optimizer step: linear warm-up, then cosine / plateau / constant."""
    base = train["learning_rate"]
    warmup_steps = int(train["warmup_epochs"] * steps_per_epoch)
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if train["schedule"] == "cosine":
        total = max(planned_epochs * steps_per_epoch - warmup_steps, 1)
        progress = min(1.0, (step - warmup_steps) / total)
        floor = train["min_learning_rate"]
        return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return base * plateau_scale


def _make_callbacks(state: dict, steps_per_epoch: int, train_settings: dict, show_bar: bool):
    import keras

    class LearningRateController(keras.callbacks.Callback):
        """Sets the learning rate every step from the resumable state (no hidden schedule).

        The JAX trainer keeps the variables in a separate state during an epoch: reading
        ``iterations`` mid-epoch gives the epoch's first step, and an assigned rate would only
        reach the state at the next epoch. So the step is counted here, and on JAX a change of
        rate syncs the state back, assigns, and makes the trainer read the state again (the
        hook Keras' JAX trainer offers callbacks). Only steps whose rate changes pay for it.
        """

        def on_epoch_begin(self, epoch, logs=None):
            self.first_step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            self.current = None

        def on_train_batch_begin(self, batch, logs=None):
            rate = learning_rate_at(self.first_step + batch, steps_per_epoch,
                                    state["planned_epochs"], train_settings,
                                    state["plateau_scale"])
            if rate == self.current:
                return
            on_jax = hasattr(self.model, "jax_state_sync")
            if on_jax:
                self.model.jax_state_sync()
            self.model.optimizer.learning_rate = rate
            self.current = rate
            if on_jax:
                self.model._jax_state_synced = True  # re-read the variables before the step

    callbacks = [LearningRateController()]
    if show_bar:
        from tqdm.auto import tqdm

        class Bar(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.bar = tqdm(total=steps_per_epoch, leave=False, unit="batch",
                                desc=f"epoch {epoch + 1}")

            def on_train_batch_end(self, batch, logs=None):
                self.bar.update(1)
                if logs and batch % 20 == 0:
                    self.bar.set_postfix(loss=f"{logs.get('loss', 0):.3f}")

            def on_epoch_end(self, epoch, logs=None):
                self.bar.close()

        callbacks.append(Bar())
    return callbacks


# ----------------------------------------------------------------------------- batches

def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of the training images in ``epoch``: new every epoch, a function of
    (seed, epoch) only, so an interrupted run resumes with the orders it would have seen."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def _batches(images, onehot, batch_size, augment, seed, epoch, drop_remainder=False):
    """This epoch's shuffled arrays, or a PyDataset applying Keras core MixUp / CutMix to whole
    batches (with generators seeded from (seed, epoch), like everything random here).

    ``drop_remainder``: leave out the last incomplete batch (data-parallel training splits
    every batch evenly across devices); the order is new every epoch, so no image is always
    left out."""
    order = epoch_order(len(images), seed, epoch)
    if drop_remainder and len(order) > batch_size:
        order = order[:len(order) - len(order) % batch_size]
    if not (augment.get("mixup") or augment.get("cutmix")):
        return images[order], onehot[order]
    import keras

    from ferlib.models import derived_seed

    class MixedBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng([seed, epoch, 1])
            self.mixup = keras.layers.MixUp(seed=derived_seed(seed, "mixup", epoch))
            self.cutmix = keras.layers.CutMix(seed=derived_seed(seed, "cutmix", epoch))
            # Decide per batch up front: the draws then do not depend on the order in which
            # batches are requested.
            self.draws = self.rng.random((len(self), 2))

        def __len__(self):
            return math.ceil(len(images) / batch_size)

        def __getitem__(self, index):
            chosen = order[index * batch_size:(index + 1) * batch_size]
            # Keras reads a rank-3 batch as one (H, W, C) image: give it (B, H, W, 1).
            x, y = images[chosen][..., None].astype("float32"), onehot[chosen]
            for column, (layer, probability) in enumerate(((self.mixup, augment["mixup"]),
                                                           (self.cutmix, augment["cutmix"]))):
                if probability and self.draws[index, column] < probability:
                    mixed = layer({"images": x, "labels": y}, training=True)
                    x = keras.ops.convert_to_numpy(mixed["images"])
                    y = keras.ops.convert_to_numpy(mixed["labels"])
            return np.clip(np.rint(x), 0, 255).astype("uint8"), y

    return MixedBatches(), None


def reseed_generators(model, seed: int, epoch: int) -> int:
    """Set every random generator inside the model (augmentation, dropout) to a state derived
    from (seed, epoch, its position). An epoch's randomness then depends on nothing but the
    seed and the epoch number, so a resumed run draws exactly what the uninterrupted run drew,
    and no two layers share a stream. Returns the number of generators set."""
    from ferlib.models import derived_seed

    states = [v for v in model.variables if v.path.endswith("seed_generator_state")]
    for index, state in enumerate(states):
        value = np.array([derived_seed(seed, "generator", epoch, index), 0])
        state.assign(value.astype(state.dtype))
    return len(states)


# ----------------------------------------------------------------------------- model set-up

def resolve_distribution(setting: str) -> dict:
    """What ``train.distribution`` means on this backend and machine.

    ``none``: one device. ``data_parallel``: ``keras.distribution.DataParallel`` over every
    visible device (JAX backend only: Keras 3's distribution API is JAX's). ``auto``:
    data-parallel when the JAX backend sees more than one accelerator, else one device.
    ``batch_size`` is always the global batch, split evenly across the devices, and the
    learning rate is used as given for that global batch (no automatic scaling).
    """
    import keras

    backend = keras.backend.backend()
    if setting == "none":
        return {"mode": "none", "devices": 1}
    if backend != "jax":
        if setting == "data_parallel":
            raise ValueError(f"train.distribution: data_parallel needs KERAS_BACKEND=jax (Keras 3 "
                             f"distributes only on JAX); this process runs on {backend}")
        return {"mode": "none", "devices": 1}
    devices = keras.distribution.list_devices()
    accelerators = [d for d in devices if not d.lower().startswith("cpu")]
    if setting == "auto" and len(accelerators) < 2:
        return {"mode": "none", "devices": 1}
    chosen = accelerators if setting == "auto" else devices
    return {"mode": "data_parallel", "devices": len(chosen), "device_names": chosen}


def prepare_backend(settings: dict) -> dict:
    """Seed, precision, determinism and distribution; returns the resolved distribution."""
    import keras

    keras.utils.set_random_seed(settings["seed"])
    keras.mixed_precision.set_global_policy(settings["train"]["precision"])
    if settings["train"]["deterministic"] and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    train = settings["train"]
    distribution = resolve_distribution(train["distribution"])
    if distribution["mode"] == "data_parallel":
        if train["batch_size"] % distribution["devices"]:
            raise ValueError(f"train.batch_size: {train['batch_size']} does not split evenly "
                             f"across {distribution['devices']} devices")
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=distribution["device_names"]))
    elif keras.backend.backend() == "jax":
        keras.distribution.set_distribution(None)
    distribution.update(global_batch_size=train["batch_size"],
                        per_device_batch_size=train["batch_size"] // distribution["devices"],
                        learning_rate=train["learning_rate"])
    return distribution


def build_for_settings(settings: dict):
    from ferlib.models import build_model

    return build_model(settings["model"], augment=settings["augment"], seed=settings["seed"],
                       **settings["model_params"])


# Weights that small-data recipes leave out of weight decay (``train.decay_all_weights:
# false``): besides every 1-D variable (biases, normalisation scales and offsets), these by name.
NO_DECAY_NAMES = ("embedding", "class_token", "cls_token", "position")


def _per_epoch_optimizer(base):
    """``base`` (a Keras optimizer class) as ferlib trains with it, registered so checkpoints
    load with it:

    - ``finalize_variable_values`` does nothing. Keras calls it at the end of every ``fit``,
      and with ``use_ema`` it overwrites the weights with their average. ferlib calls ``fit``
      once per epoch, so that would reset training to the average every epoch; ferlib scores
      and keeps the averaged weights itself (:func:`averaged_weights`).
    - ``no_decay``: variable-name patterns excluded from weight decay, kept in the config so a
      resumed run (the optimizer comes back from the checkpoint) excludes them too.
    """
    import keras

    class PerEpoch(base):
        def __init__(self, *args, no_decay=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.no_decay = list(no_decay or [])
            if self.no_decay:
                self.exclude_from_weight_decay(var_names=self.no_decay)

        def finalize_variable_values(self, var_list):
            pass

        def get_config(self):
            return {**super().get_config(), "no_decay": self.no_decay}

    PerEpoch.__name__ = PerEpoch.__qualname__ = f"PerEpoch{base.__name__}"
    return keras.saving.register_keras_serializable(package="ferlib")(PerEpoch)


@functools.cache
def _optimizers():
    """The registered optimizer classes, created once (checkpoints name them)."""
    import keras

    return {name: _per_epoch_optimizer(base) for name, base in (
        ("adam", keras.optimizers.Adam), ("adamw", keras.optimizers.AdamW),
        ("sgd", keras.optimizers.SGD))}


def no_decay_names(model) -> list[str]:
    """Patterns of variable names (what Keras' ``exclude_from_weight_decay`` matches) that
    ``decay_all_weights: false`` exempts: the names of every 1-D variable of ``model`` (bias,
    gamma, beta: never a kernel's name), exactly, and the embeddings and tokens."""
    import re

    # TensorFlow's optimizer sees "conv1_bn/gamma:0", the other backends "gamma".
    one_d = {rf"(^|/){re.escape(variable.name)}(:\d+)?$"
             for variable in model.trainable_variables if len(variable.shape) <= 1}
    return sorted(one_d) + list(NO_DECAY_NAMES)


def compile_model(model, settings: dict) -> None:
    """Compile ``model`` as training does: the optimizer (with ``weight_decay``, optionally not
    on biases, norms and embeddings, and an optional weight average), loss (logits, label
    smoothing), accuracy and ``jit_compile`` of ``settings["train"]`` (benchmarks use it
    too)."""
    import keras

    train = settings["train"]
    lr, decay = train["learning_rate"], train["weight_decay"] or None
    common = {"use_ema": train.get("ema_momentum") is not None,
              "ema_momentum": train.get("ema_momentum") or 0.99,
              "no_decay": None if train.get("decay_all_weights", True) or not decay
              else no_decay_names(model)}
    classes = _optimizers()
    optimizer = {
        "adam": lambda: classes["adam"](lr, weight_decay=decay, **common),
        "adamw": lambda: classes["adamw"](lr, weight_decay=train["weight_decay"], **common),
        "sgd": lambda: classes["sgd"](lr, momentum=train["momentum"], nesterov=True,
                                      weight_decay=decay, **common),
    }[train["optimizer"]]()
    model.compile(optimizer=optimizer,
                  loss=keras.losses.CategoricalCrossentropy(
                      from_logits=True, label_smoothing=train["label_smoothing"]),
                  metrics=["accuracy"], jit_compile=train["jit_compile"])


@contextlib.contextmanager
def averaged_weights(model):
    """The optimizer's moving average of the weights in ``model`` for the block (scoring
    PublicTest, saving the best weights), the trained weights back after it; nothing changes
    without ``use_ema``. (Keras keeps the averages in ``_model_variables_moving_average``, the
    attribute its own ``SwapEMAWeights`` callback reads; there is no public accessor.)"""
    optimizer = model.optimizer
    if optimizer is None or not optimizer.use_ema or not optimizer.built:
        yield
        return
    variables = optimizer._trainable_variables
    averages = optimizer._model_variables_moving_average
    import keras

    trained = [keras.ops.convert_to_numpy(variable) for variable in variables]
    for variable, average in zip(variables, averages):
        if average is not None:
            variable.assign(average)
    try:
        yield
    finally:
        for variable, value in zip(variables, trained):
            variable.assign(value)


def machine_description() -> str:
    """Where training ran: CPU model and cores, or the accelerator, and the Keras backend."""
    import keras

    from ferlib.runs import cpu_name

    devices = ""
    if keras.backend.backend() == "jax":
        import jax

        devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (f"{devices or cpu_name()} ({os.cpu_count()} CPU cores), "
            f"Keras {keras.__version__} on {keras.backend.backend()}")


def _cross_entropy(labels: np.ndarray, proba: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(labels)), labels], 1e-12, 1))))


# ----------------------------------------------------------------------------- training

def training_key_parts(settings: dict, data: FERData) -> dict:
    """The parts of a training's fingerprint: its settings, its data and split, and the code
    that trains. Stored with the run, so a changed key can say which part changed."""
    counts = [int((data.split == split).sum()) for split in ("train", "val", "test")]
    return {"settings": fingerprint(settings),
            "data": fingerprint({"data": data.source_hash, "counts": counts,
                                 "ids": fingerprint(data.source_ids.tolist()),
                                 "split": fingerprint(data.split.tolist())}),
            "code": training_code()}


@functools.cache
def training_code() -> str:
    """Fingerprint of the functions, classes and constants that training runs (``train`` and
    what it calls: the loop, schedule, batches, model builders, layers), by their source text
    and not by file, so moving a function to another module leaves finished runs current while
    an edit to one of them marks them stale.

    Computed once per process: the code does not change while it runs, and a test that
    replaces a function later (to slow or interrupt a training) must not change the key."""
    return code_fingerprint(train, exclude_modules=NOT_TRAINING_MODULES)


def training_key(settings: dict, data: FERData) -> str:
    """The fingerprint of one training: settings, data, split and the training code. The code
    that trains is part of the key: a fix to training retrains, a fix to a plot does not."""
    return fingerprint(training_key_parts(settings, data))


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {key: leaf for name, item in value.items()
                for key, leaf in _flat(item, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): value}


def describe_change(old_settings: dict | None, old_parts: dict | None, settings: dict,
                    parts: dict) -> str:
    """What differs between a stored training and the one asked for, in words: each changed
    setting with both values, then the data or the training code (runs that stored their key
    parts), e.g. ``train.learning_rate: 0.003 -> 0.001``."""
    old = _flat(old_settings or {})
    new = _flat(json.loads(json.dumps(settings)))  # as settings.json stores it
    changes = [f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
               for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if old_parts:
        if old_parts.get("data") != parts["data"]:
            changes.append("the data or its split")
        if old_parts.get("code") != parts["code"]:
            changes.append("the training code (a function that train() runs)")
    elif not changes:
        changes.append("the data, its split or the training code")
    shown = changes[:6] + ([f"{len(changes) - 6} more"] if len(changes) > 6 else [])
    return "; ".join(shown)


def finished_result(model_name: str, data: FERData, params: dict, run_dir,
                    subdir: str | None = None) -> dict | None:
    """``metrics.json`` of a finished training that is current for these settings and data,
    else None (never trains)."""
    files = Run(run_dir).model(model_name, subdir)
    state = files.read_state()
    key = training_key(model_settings(params, model_name), data)
    if state and state.get("finished") and state.get("fingerprint") == key:
        return read_json(files.metrics)
    return None


def train(model_name: str, data: FERData, params: dict, run_dir, *, progress: bool = True,
          subdir: str | None = None, on_epoch=None, build=None) -> dict:
    """Train ``model_name`` on ``data``'s train split, select on val, report test once.

    Parameters
    ----------
    model_name : str
    data : FERData
        Uses the ``train`` split to fit, ``val`` (PublicTest) for selection and early stopping,
        ``test`` (PrivateTest) only for the final report.
    params : dict
        Resolved parameters (``ferlib.config.load_params``).
    run_dir : path
        Artifacts go to ``run_dir/models/<model_name>[/<subdir>]``.
    progress : bool
        Print one line per epoch (and a batch bar on a terminal).
    on_epoch : callable, optional
        Called with each finished epoch's history row (a dict) once that epoch is committed;
        the recipe search reports to Optuna here, and may stop the training by raising.
    build : callable, optional
        ``build(settings) -> keras.Model``, the model to start from and to rebuild the best
        one in (default :func:`build_for_settings`); fine-tuning passes one that loads a
        trained model (``ferlib.finetune``). Its inputs belong in ``settings``.

    Returns
    -------
    dict
        The content of ``metrics.json``.

    Raises
    ------
    ferlib.artifacts.RunBusy
        Another process is training the same model into the same run directory.
    """
    with Run(run_dir).lock(model_name, subdir):  # one writer per model run
        return _train_unlocked(model_name, data, params, run_dir, progress=progress,
                               subdir=subdir, on_epoch=on_epoch, build=build)


def _train_unlocked(model_name, data, params, run_dir, *, progress, subdir, on_epoch,
                    build=None) -> dict:
    import keras

    import ferlib.models  # noqa: F401  (registers custom layers for loading checkpoints)

    settings = model_settings(params, model_name)
    train_settings = settings["train"]
    live = files = Run(run_dir).model(model_name, subdir)
    say = (lambda text: print(f"[{model_name}{'/' + subdir if subdir else ''}] {text}",
                              flush=True)) if progress else (lambda text: None)

    x_train, y_train = data.subset("train")
    x_val, y_val = data.subset("val")
    x_test, y_test = data.subset("test")
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError(f"training {model_name}: need train and val images, got "
                         f"{len(x_train)} train and {len(x_val)} val")
    key_parts = training_key_parts(settings, data)
    key = fingerprint(key_parts)

    # Replace, don't displace: a changed run trains in <name>.next and takes the live folder's
    # place only once it has finished; until then status, results and reports use the old one,
    # and a failed retrain leaves it untouched.
    successor = live.successor()
    if not live.directory.exists() and (successor.read_state() or {}).get("finished"):
        successor.directory.rename(live.directory)  # a swap interrupted between its renames
    state = live.read_state()
    replacing = None
    if state and state.get("fingerprint") != key:
        change = describe_change(read_json(live.settings), state.get("key_parts"),
                                 settings, key_parts)
        pending = successor.read_state()
        if pending and pending.get("fingerprint") != key:
            # an unfinished attempt at yet other settings: kept aside, never deleted
            shutil.move(str(successor.directory), successor.stale_copy())
            pending = None
        say(f"changed since the last run: {change}. Training the new run in "
            f"{successor.directory.name}; the finished run stays in place until it is done")
        files, state, replacing = successor, pending, live
    out = files.directory
    if state and state["finished"] and files.metrics.exists():
        if replacing is not None:
            _replace(replacing, files, say)
            return read_json(live.metrics)
        say(f"already trained ({state['stopped_reason']}, {len(state['history'])} epochs): "
            f"skipping")
        return read_json(files.metrics)

    out.mkdir(parents=True, exist_ok=True)
    write_json(files.settings, settings)
    distribution = prepare_backend(settings)
    batch_size = train_settings["batch_size"]
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    weights = class_weights(y_train) if train_settings["class_weights"] else None

    if state:
        _optimizers()  # registers the optimizer classes the checkpoint names
        model = keras.models.load_model(out / state["checkpoint"])
        say(f"resuming after epoch {len(state['history'])} ({state['checkpoint']})")
        # epochs committed just before the process died, before their logs were written
        tensorboard_logs.log_epochs(out, state["history"], state["timing"], only_missing=True)
    else:
        model = (build or build_for_settings)(settings)
        compile_model(model, settings)
        tensorboard_logs.log_graph(out, model, x_train.shape[1:])
        state = {"fingerprint": key, "key_parts": key_parts, "finished": False, "history": [],
                 "timing": [], "planned_epochs": train_settings["epochs"], "plateau_scale": 1.0,
                 "best_val_accuracy": -1.0, "best_epoch": None, "best_weights": None,
                 "checkpoint": None, "wait": 0, "best_val_loss": float("inf"),
                 "plateau_wait": 0, "stopped_reason": None, "train_seconds": 0.0}
    onehot = keras.utils.to_categorical(y_train, model.output_shape[-1]).astype("float32")
    show_bar = progress and sys.stderr.isatty()
    callbacks = _make_callbacks(state, steps_per_epoch, train_settings, show_bar)
    budget = (train_settings["budget_minutes"] or 0) * 60
    if not state["history"]:
        say(f"{model.count_params():,} parameters; {len(x_train):,} train / {len(x_val):,} val "
            f"images; up to {train_settings['epochs']} epochs"
            + (f", safety stop after {train_settings['budget_minutes']:g} min" if budget
               else "")
            + (f"; data-parallel over {distribution['devices']} devices, global batch "
               f"{batch_size} ({distribution['per_device_batch_size']} per device)"
               if distribution["mode"] == "data_parallel" else ""))

    while state["stopped_reason"] is None:
        epoch = len(state["history"])
        started = time.time()
        reseed_generators(model, settings["seed"], epoch)
        inputs, targets = _batches(x_train, onehot, batch_size, settings["augment"],
                                   settings["seed"], epoch,
                                   drop_remainder=distribution["mode"] == "data_parallel")
        # shuffle=False: the order comes from epoch_order. Keras' own shuffle reuses one seed
        # for every fit() call once set_random_seed was called: every epoch had one order.
        fitted = model.fit(inputs, targets, batch_size=batch_size if targets is not None
                           else None, epochs=epoch + 1, initial_epoch=epoch, verbose=0,
                           shuffle=False, class_weight=weights, callbacks=callbacks)
        fit_seconds = time.time() - started
        with averaged_weights(model):  # the weight average, if any, is what is scored and kept
            val_proba = predict_proba(model, x_val)
            val_accuracy = float((val_proba.argmax(1) == y_val).mean())
            val_loss = _cross_entropy(y_val, val_proba)
            if val_accuracy > state["best_val_accuracy"]:
                _save_best(state, model, out, epoch + 1, val_accuracy)
        epoch_seconds = time.time() - started
        state["history"].append({
            "epoch": epoch + 1, "loss": float(fitted.history["loss"][-1]),
            "accuracy": float(fitted.history["accuracy"][-1]), "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "learning_rate": float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))})
        state["timing"].append({"epoch": epoch + 1, "seconds": epoch_seconds,
                                "train_seconds": fit_seconds,
                                "eval_seconds": epoch_seconds - fit_seconds,
                                "images_per_second": len(x_train) / fit_seconds})
        state["train_seconds"] += epoch_seconds
        _update_state(state, epoch + 1, val_loss, train_settings, budget)
        _save_checkpoint(state, model, out, epoch + 1)
        tensorboard_logs.log_epochs(out, state["history"][-1:], state["timing"][-1:])
        _log_epoch(say, state, train_settings, budget)
        if on_epoch is not None:
            on_epoch(dict(state["history"][-1]))

    result = _finish(model_name, state, settings, out, (x_val, y_val), (x_test, y_test),
                     data, say, run_dir=Path(run_dir), part=subdir or "",
                     distribution=distribution, build=build)
    if replacing is not None:
        _replace(replacing, files, say)
    return result


def _replace(live: ModelRun, finished: ModelRun, say) -> None:
    """Put a finished retrain in the live folder's place; the earlier run moves aside."""
    stale = live.stale_copy()
    if live.directory.exists():
        live.directory.rename(stale)
    finished.directory.rename(live.directory)
    say(f"replaced the earlier run (kept as {stale.name}; python -m ferlib runs --prune "
        f"removes such copies)")


def _save_best(state, model, out, epoch, val_accuracy) -> None:
    path = ModelRun(out).best_weights(epoch)
    atomic_save(model.save_weights, path)
    state.update(best_val_accuracy=val_accuracy, best_epoch=epoch, best_weights=path.name,
                 wait=0)


def _update_state(state, epoch, val_loss, train, budget) -> None:
    """Early stopping, plateau and the stop decision (the best model is kept by
    :func:`_save_best`).

    The plan (and so the cosine schedule) is fixed by the epoch count: the same profile trains
    identically on a fast or a slow machine. ``budget`` (seconds) is only a safety stop."""
    if state["best_epoch"] != epoch:  # not a new best (:func:`_save_best` saved that)
        state["wait"] += 1
    if val_loss < state["best_val_loss"]:
        state.update(best_val_loss=val_loss, plateau_wait=0)
    else:
        state["plateau_wait"] += 1
        if train["schedule"] == "plateau" and state["plateau_wait"] >= train["plateau_patience"]:
            state.update(plateau_scale=state["plateau_scale"] * train["plateau_factor"],
                         plateau_wait=0)
    mean_epoch = state["train_seconds"] / epoch
    patience = train["early_stopping_patience"]
    if epoch >= train["epochs"]:
        state["stopped_reason"] = "completed"
    elif patience is not None and state["wait"] >= patience:
        state["stopped_reason"] = "early_stopping"
    elif budget and state["train_seconds"] + mean_epoch > budget:
        state["stopped_reason"] = "budget"  # the next epoch would not fit: a safety stop


def _save_checkpoint(state, model, out, epoch) -> None:
    files = ModelRun(out)
    path = files.checkpoint(epoch)
    atomic_save(model.save, path)
    state["checkpoint"] = path.name
    write_json(files.state, state)  # the commit point
    pd.DataFrame(state["history"], columns=HISTORY_COLUMNS).to_csv(files.history, index=False)
    pd.DataFrame(state["timing"], columns=TIMING_COLUMNS).to_csv(files.timing, index=False)
    for stale in files.epoch_files():
        if stale.name not in (state["checkpoint"], state["best_weights"]):
            stale.unlink(missing_ok=True)


def _log_epoch(say, state, train, budget) -> None:
    row, timing = state["history"][-1], state["timing"][-1]
    epoch = row["epoch"]
    remaining = (state["planned_epochs"] - epoch) * state["train_seconds"] / epoch
    if budget:
        remaining = min(remaining, max(budget - state["train_seconds"], 0))
    stop = f"  stop: {state['stopped_reason']}" if state["stopped_reason"] else ""
    say(f"epoch {epoch}/{state['planned_epochs']}  loss {row['loss']:.3f}  "
        f"acc {row['accuracy']:.3f}  val_loss {row['val_loss']:.3f}  "
        f"val_acc {row['val_accuracy']:.3f}  (best {state['best_val_accuracy']:.3f} "
        f"@{state['best_epoch']})  lr {row['learning_rate']:.2e}  "
        f"{timing['seconds']:.0f}s  {timing['images_per_second']:.0f} img/s  "
        f"ETA {'<= ' if train['early_stopping_patience'] else ''}{remaining / 60:.1f} min"
        f"{stop}")


def _finish(model_name, state, settings, out, val, test, data, say, *, run_dir: Path,
            part: str, distribution: dict, build=None) -> dict:
    """Reload the best weights into a clean model, predict val/test, write metrics."""
    model = (build or build_for_settings)(settings)
    files = ModelRun(out)
    model.load_weights(out / state["best_weights"])
    atomic_save(model.save, files.best_model)
    (x_val, y_val), (x_test, y_test) = val, test
    val_proba = predict_proba(model, x_val)
    arrays = {"val_proba": val_proba, "val_labels": y_val,
              "val_ids": data.source_ids[data.split == "val"]}
    result = {"model": model_name, "best_epoch": state["best_epoch"],
              "epochs_run": len(state["history"]), "stopped_reason": state["stopped_reason"],
              "budget_minutes": settings["train"]["budget_minutes"],
              "train_seconds": state["train_seconds"],
              "seconds_per_epoch": float(np.mean([t["seconds"] for t in state["timing"]])),
              "train_images_per_second": float(np.median(
                  [t["images_per_second"] for t in state["timing"]])),
              "parameters": int(model.count_params()),
              "machine": machine_description(),
              "distribution": {k: v for k, v in distribution.items() if k != "device_names"},
              "val": metrics.classification_metrics(y_val, val_proba)}
    if len(x_test):
        result["privatetest_scorings"] = Run(run_dir).record_test_scoring(
            model_name, part, state["fingerprint"])
        test_proba = predict_proba(model, x_test)
        arrays.update(test_proba=test_proba, test_labels=y_test,
                      test_ids=data.source_ids[data.split == "test"])
        result["test"] = metrics.classification_metrics(y_test, test_proba)
        if settings["train"]["tta"]:
            crops, choice = _choose_tta(model, x_val, y_val, settings["train"]["tta_crops"])
            result["tta_choice"] = choice
            tta = metrics.tta_probabilities(lambda x: predict_proba(model, x), x_test,
                                            crops=crops)
            arrays["test_proba_tta"] = tta
            result["test_tta"] = metrics.classification_metrics(y_test, tta)
    atomic_save(lambda path: np.savez_compressed(path, **arrays), files.predictions)
    tensorboard_logs.log_confusion_matrices(out, state["best_epoch"], {
        split: (arrays[f"{key}_labels"], arrays[f"{key}_proba"].argmax(1))
        for split, key in (("PublicTest", "val"), ("PrivateTest", "test"))
        if f"{key}_proba" in arrays}, num_classes=val_proba.shape[1])
    write_json(files.metrics, result)
    state["finished"] = True
    write_json(files.state, state)
    for leftover in files.epoch_files():
        leftover.unlink()  # large (weights + optimizer); best.keras is what we keep
    from ferlib.calibration import calibrate_model_dir

    calibrate_model_dir(out)  # a trained folder is complete: evaluate / predict use it
    from ferlib.card import write_model_card

    write_model_card(out, data)  # MODEL_CARD.md, from the files just written
    test_text = f", test acc {result['test']['accuracy']:.3f}" if "test" in result else ""
    say(f"done ({state['stopped_reason']}): best val acc {state['best_val_accuracy']:.3f} at "
        f"epoch {state['best_epoch']}{test_text}")
    return result


def _choose_tta(model, x_val, y_val, max_crops: int) -> tuple[int, dict]:
    """The test-time augmentation applied to PrivateTest, chosen on PublicTest: the mirror
    alone, or the mirror with ``max_crops`` shifted crops, whichever scores higher there (the
    mirror on a tie). Returns (crops, a record of the PublicTest accuracies)."""
    candidates = {"flip": 0, **({f"flip+{max_crops} crops": max_crops} if max_crops else {})}
    scores = {}
    for name, crops in candidates.items():
        proba = metrics.tta_probabilities(lambda x: predict_proba(model, x), x_val, crops=crops)
        scores[name] = float((proba.argmax(1) == y_val).mean())
    chosen = max(candidates, key=lambda name: (scores[name], -candidates[name]))
    return candidates[chosen], {"chosen": chosen, "publictest_accuracy": scores}


def train_cv(model_name: str, data: FERData, params: dict, run_dir, *,
             progress: bool = True, folds: list[int] | None = None) -> dict | None:
    """Stratified k-fold cross-validation over train+val; each fold is tested on PrivateTest.

    Writes ``models/<name>/fold<k>/`` per fold (as :func:`train` does), and in
    ``models/<name>/``:

    - ``cv_predictions.npz``: pooled out-of-fold probabilities over train+val (each image
      predicted by the one fold model that did not train on it), every fold's PrivateTest
      probabilities and their mean (the k-fold ensemble)
    - ``cv_metrics.json``: per-fold metrics, their mean and standard deviation, and the metrics
      of the pooled out-of-fold and the ensemble predictions

    ``folds`` (1-based) trains only those folds, e.g. one per device in separate processes
    (``python -m ferlib train --fold 2 --device 1``). The merge is written by whichever call
    finds every fold finished; until then the call returns None.
    """
    k = params["cv_folds"]
    unknown = sorted(set(folds or []) - set(range(1, k + 1)))
    if unknown:
        raise ValueError(f"fold: {unknown[0]} is not one of the {k} folds (1..{k})")
    pool = np.flatnonzero(data.split != "test")
    splits = stratified_folds(data.labels[pool], k=k, seed=params["seed"])
    results = []
    for index, (train_index, val_index) in enumerate(splits, start=1):
        split = data.split.copy()
        split[pool[train_index]], split[pool[val_index]] = "train", "val"
        fold_data = FERData(**{**data.__dict__, "split": split})
        if folds is None or index in folds:
            results.append(train(model_name, fold_data, params, run_dir, progress=progress,
                                 subdir=f"fold{index}"))
        else:
            results.append(finished_result(model_name, fold_data, params, run_dir,
                                           f"fold{index}"))
    missing = [index for index, result in enumerate(results, start=1) if result is None]
    if missing:
        if progress:
            print(f"[{model_name}] folds {', '.join(map(str, missing))} of {k} not trained yet: "
                  f"the fold merge waits for them", flush=True)
        return None
    files = Run(run_dir).model(model_name)
    oof_proba = np.zeros((len(pool), NUM_CLASSES))
    fold_of = np.zeros(len(pool), np.int64)
    test_probas = []
    for index, (_, val_index) in enumerate(splits, start=1):
        with np.load(files.fold(index).predictions) as archive:
            # train() predicts val in dataset order, which is pool order restricted to the fold
            oof_proba[np.sort(val_index)] = archive["val_proba"]
            fold_of[val_index] = index
            if "test_proba" in archive.files:
                test_probas.append(archive["test_proba"])
                test_labels, test_ids = archive["test_labels"], archive["test_ids"]
    oof_labels = data.labels[pool]
    arrays = {"oof_proba": oof_proba, "oof_labels": oof_labels,
              "oof_ids": data.source_ids[pool], "oof_fold": fold_of}
    summary = {"model": model_name, "folds": k,
               "per_fold": [{"fold": index, "best_epoch": r["best_epoch"],
                             "epochs_run": r["epochs_run"],
                             "stopped_reason": r["stopped_reason"],
                             "train_seconds": r["train_seconds"],
                             **{f"{part}_{key}": value for part in ("val", "test")
                                if part in r for key, value in r[part].items()
                                if isinstance(value, float)}}
                            for index, r in enumerate(results, start=1)],
               "oof": metrics.classification_metrics(oof_labels, oof_proba)}
    if test_probas:
        arrays.update(fold_test_proba=np.stack(test_probas),
                      test_proba=np.mean(test_probas, axis=0), test_labels=test_labels,
                      test_ids=test_ids)
        summary["ensemble_test"] = metrics.classification_metrics(test_labels,
                                                                  arrays["test_proba"])
    for part in ("val", "test"):
        frame = pd.DataFrame([{key: value for key, value in r[part].items()
                               if isinstance(value, float)} for r in results if part in r])
        summary[part] = {"mean": frame.mean().to_dict(), "std": frame.std().to_dict()}
    atomic_save(lambda path: np.savez_compressed(path, **arrays), files.cv_predictions)
    write_json(files.cv_metrics, summary)
    return summary
