"""The run directory as one contract: every file name of ``runs/<profile>/`` and its readers.

::

    runs/<profile>/
      params.yaml                 resolved parameters of the last report
      manifest.json               versions, seed, data hash, commit, step timings
      data_summary.json           the dataset as 02_preprocess saw it
      split.csv, folds.csv        the split (and folds) every later step uses
      privatetest_scorings.json   the ledger: one entry per PrivateTest scoring
      notebooks/, figures/        executed notebooks, figures of the pages
      compare/                    the comparison tables of 04_compare
      search/studies.db           the Optuna recipe searches (ferlib.search)
      device_sessions.json        lent-GPU sessions merged here (ferlib.device)
      models/<name>/[fold<k>/]    one training (ModelRun):
        best.keras, history.csv, timing.csv, predictions.npz, metrics.json,
        settings.json, state.json, calibration.json, dataset.json, MODEL_CARD.md,
        classes.json (a fine-tuned head), cross_dataset.json, saliency_check.json (optional),
        checkpoint-NNN.keras, best-NNN.weights.h5 (while training)
      models/<name>/cv_metrics.json, cv_predictions.npz   (cross-validation)

No other module spells these names: they ask a :class:`Run` or :class:`ModelRun` for paths,
and read results with :func:`load_result` / :func:`load_results`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ferlib.runs import (atomic_save, atomic_write_text, converged_by_curve, read_json,
                         write_json)

# ----------------------------------------------------------------------------- file names

PARAMS = "params.yaml"
MANIFEST = "manifest.json"
DATA_SUMMARY = "data_summary.json"
SPLIT = "split.csv"
FOLDS = "folds.csv"
LEDGER = "privatetest_scorings.json"
SEARCH_STORAGE = "search/studies.db"
COMPARE_SUMMARY = "compare/summary.csv"
COMPARE_SUMMARY_FULL = "compare/summary_full.csv"
SIGNIFICANCE = "significance.csv"               # in compare/
ENSEMBLE_SIGNIFICANCE = "ensemble_significance.csv"
EDA = "eda.json"
DEVICE_SESSIONS = "device_sessions.json"
COMPARE_TABLES = {"summary": "summary.csv", "summary_full": "summary_full.csv",
                  "significance": SIGNIFICANCE, "ensemble_significance": ENSEMBLE_SIGNIFICANCE,
                  "cv_significance": "cv_significance.csv", "calibration": "calibration.csv"}
"""The tables 04_compare writes into ``compare/`` (and readme_tables reads back)."""

BEST_MODEL = "best.keras"
HISTORY = "history.csv"
TIMING = "timing.csv"
PREDICTIONS = "predictions.npz"
METRICS = "metrics.json"
SETTINGS = "settings.json"
STATE = "state.json"
CALIBRATION = "calibration.json"
CV_METRICS = "cv_metrics.json"
CV_PREDICTIONS = "cv_predictions.npz"
CLASSES = "classes.json"            # a head's own class names (fine-tuned); absent: EMOTIONS
DATASET = "dataset.json"            # the data a model was trained on: name, sha256, splits
MODEL_CARD = "MODEL_CARD.md"
CROSS_DATASET = "cross_dataset.json"   # results on other datasets (05_cross; the card shows them)
SALIENCY_CHECK = "saliency_check.json"  # optional: explain.randomization_check's result
FINETUNE = "finetune.json"          # what `finetune` did: source, head, splits, baseline
FINETUNE_REPORT = "report.html"


class RunBusy(RuntimeError):
    """Another process holds the run's lock: one line naming it (pid, host, since when)."""


def _read_holder(path: Path) -> dict:
    try:
        return read_json(path, {})
    except ValueError:  # a holder file of an older writer, cut short
        return {}


@contextlib.contextmanager
def _exclusive(path: Path, doing: str):
    """An exclusive, non-waiting ``filelock`` at ``path``; a ``.holder.json`` beside it names
    the holder for the :class:`RunBusy` message of a second process."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    holder = path.with_suffix(".holder.json")
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        for _ in range(20):  # the holder may have just taken the lock: its name follows at once
            who = _read_holder(holder)
            if who:
                break
            time.sleep(0.1)
        raise RunBusy(f"{doing} by another process (pid {who.get('pid', '?')} on "
                      f"{who.get('host', '?')} since {who.get('since', '?')}); wait for it to "
                      f"finish, or stop it and rerun to resume (lock: {path})") from None
    try:
        write_json(holder, {"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        yield
    finally:
        holder.unlink(missing_ok=True)  # never names a writer that has finished
        lock.release()


@dataclasses.dataclass(frozen=True)
class ModelRun:
    """The folder of one training (a model, or one fold of it) and its files."""

    directory: Path

    def __post_init__(self):
        object.__setattr__(self, "directory", Path(self.directory))

    best_model = property(lambda self: self.directory / BEST_MODEL)
    history = property(lambda self: self.directory / HISTORY)
    timing = property(lambda self: self.directory / TIMING)
    predictions = property(lambda self: self.directory / PREDICTIONS)
    metrics = property(lambda self: self.directory / METRICS)
    settings = property(lambda self: self.directory / SETTINGS)
    state = property(lambda self: self.directory / STATE)
    calibration = property(lambda self: self.directory / CALIBRATION)
    cv_metrics = property(lambda self: self.directory / CV_METRICS)
    cv_predictions = property(lambda self: self.directory / CV_PREDICTIONS)
    classes = property(lambda self: self.directory / CLASSES)
    dataset = property(lambda self: self.directory / DATASET)
    model_card = property(lambda self: self.directory / MODEL_CARD)
    cross_dataset = property(lambda self: self.directory / CROSS_DATASET)
    saliency_check = property(lambda self: self.directory / SALIENCY_CHECK)
    finetune = property(lambda self: self.directory / FINETUNE)
    finetune_report = property(lambda self: self.directory / FINETUNE_REPORT)

    def checkpoint(self, epoch: int) -> Path:
        """The model + optimizer after ``epoch`` (kept until the next epoch commits)."""
        return self.directory / f"checkpoint-{epoch:03d}.keras"

    def best_weights(self, epoch: int) -> Path:
        return self.directory / f"best-{epoch:03d}.weights.h5"

    def epoch_files(self) -> list[Path]:
        """Checkpoints and best-epoch weights on disk (the large files of a running training)."""
        return [*self.directory.glob("checkpoint-*.keras"),
                *self.directory.glob("best-*.weights.h5")]

    def fold(self, k: int) -> "ModelRun":
        return ModelRun(self.directory / f"fold{k}")

    def successor(self) -> "ModelRun":
        """Where a retrain with changed settings or code trains until it replaces this one."""
        return ModelRun(self.directory.with_name(f"{self.directory.name}.next"))

    def stale_copy(self) -> Path:
        """Where a replaced training is moved: ``<name>.stale-<date>`` beside it."""
        return self.directory.with_name(
            f"{self.directory.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")

    def read_state(self) -> dict | None:
        return read_json(self.state)


@dataclasses.dataclass(frozen=True)
class Run:
    """``runs/<profile>/``: the run-level files and one :class:`ModelRun` per model."""

    directory: Path

    def __post_init__(self):
        object.__setattr__(self, "directory", Path(self.directory))

    params = property(lambda self: self.directory / PARAMS)
    manifest = property(lambda self: self.directory / MANIFEST)
    data_summary = property(lambda self: self.directory / DATA_SUMMARY)
    split = property(lambda self: self.directory / SPLIT)
    folds = property(lambda self: self.directory / FOLDS)
    ledger = property(lambda self: self.directory / LEDGER)
    search_storage = property(lambda self: self.directory / SEARCH_STORAGE)
    compare_summary = property(lambda self: self.directory / COMPARE_SUMMARY)
    compare_summary_full = property(lambda self: self.directory / COMPARE_SUMMARY_FULL)
    notebooks = property(lambda self: self.directory / "notebooks")
    figures = property(lambda self: self.directory / "figures")
    compare = property(lambda self: self.directory / "compare")

    eda = property(lambda self: self.directory / EDA)
    device_sessions = property(lambda self: self.directory / DEVICE_SESSIONS)

    def mean_maps(self, model_name: str) -> Path:
        """Mean saliency maps per class of one model (03_train writes, 04_compare reuses)."""
        return self.directory / "explain" / f"mean_maps_{model_name}.npy"

    def moved_aside(self) -> list[Path]:
        """Replaced trainings kept as ``<name>.stale-<date>`` (models and folds), oldest first."""
        models = self.directory / "models"
        return sorted([*models.glob("*.stale-*"), *models.glob("*/*.stale-*")],
                      key=lambda path: path.name.rsplit(".stale-", 1)[-1])

    def pending(self) -> list[Path]:
        """Retrains in progress (``<name>.next``) that have not replaced their run yet."""
        models = self.directory / "models"
        return sorted([*models.glob("*.next"), *models.glob("*/*.next")])

    # ------------------------------------------------------------------- writers

    def save_table(self, name: str, frame: pd.DataFrame) -> Path:
        """Write one of ``COMPARE_TABLES`` atomically into ``compare/``."""
        if name not in COMPARE_TABLES:
            raise ValueError(f"compare table {name!r}: expected one of "
                             f"{', '.join(COMPARE_TABLES)}")
        path = self.compare / COMPARE_TABLES[name]
        atomic_write_text(path, frame.to_csv(index=False))
        return path

    def save_split(self, split: pd.DataFrame, folds: pd.DataFrame | None = None) -> None:
        """The split (source id, split, label) and, with cross-validation, the folds."""
        atomic_write_text(self.split, split.to_csv(index=False))
        if folds is not None:
            atomic_write_text(self.folds, folds.to_csv(index=False))

    def save_mean_maps(self, model_name: str, maps: np.ndarray) -> Path:
        path = self.mean_maps(model_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(lambda temp: np.save(temp, maps), path)
        return path

    def load_mean_maps(self, model_name: str) -> np.ndarray | None:
        path = self.mean_maps(model_name)
        return np.load(path) if path.exists() else None

    def model(self, name: str, part: str | None = "") -> ModelRun:
        return ModelRun(self.directory / "models" / name / (part or ""))

    def result_file(self, name: str, cv_folds: int = 0) -> Path:
        """The file whose presence says a model's training (or cross-validation) finished."""
        model = self.model(name)
        return model.cv_metrics if cv_folds else model.metrics

    def lock(self, name: str, part: str | None = ""):
        """Hold the one-writer lock of a model's training (``filelock``: an OS lock, so the
        lock of a process that died, even by ``kill -9``, is free again at once).

        Raises
        ------
        RunBusy
            When another process holds it; the message names that process.
        """
        label = f"{name}/{part}" if part else name
        return _exclusive(self.directory / "models" / f".{label.replace('/', '.')}.lock",
                          f"{label} is being trained")

    def step_lock(self, step: str):
        """Hold the one-writer lock of a report step (its notebook, page and marker), like
        :meth:`lock`."""
        return _exclusive(self.directory / "steps" / f".{step}.lock",
                          f"report step {step} is being run")

    # ------------------------------------------------------------------- PrivateTest ledger

    def record_test_scoring(self, model_name: str, part: str, key: str) -> int:
        """Add one PrivateTest scoring of ``model_name`` (``part``: fold, or "") and return how
        many times it has been scored, replaced runs included.

        The protocol allows one look at PrivateTest per model; the ledger makes the count
        visible instead of asking readers to take "scored once" on trust."""
        ledger = read_json(self.ledger, [])
        ledger.append({"model": model_name, "part": part, "fingerprint": key,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        write_json(self.ledger, ledger)
        return self.count_test_scorings(model_name, part)

    def count_test_scorings(self, model_name: str, part: str = "") -> int:
        return sum(entry["model"] == model_name and entry["part"] == part
                   for entry in self.test_scorings())

    def test_scorings(self) -> list[dict]:
        return read_json(self.ledger, [])


# ----------------------------------------------------------------------------- results

@dataclasses.dataclass
class ModelResult:
    """Everything ``ferlib.train`` wrote for one model."""

    name: str
    directory: Path
    history: pd.DataFrame
    timing: pd.DataFrame
    metrics: dict
    settings: dict
    predictions: dict
    folds: list["ModelResult"] | None = None   # cross-validation: the fold models
    cv: dict | None = None                      # cross-validation: cv_metrics.json

    @property
    def parameters_text(self) -> str:
        return f"{self.metrics.get('parameters', 0):,} parameters"

    @property
    def display_name(self) -> str:
        from ferlib.paper import MODEL_DISPLAY_NAMES

        return MODEL_DISPLAY_NAMES.get(self.name, self.name)

    @property
    def model_file(self) -> Path:
        return ModelRun(self.directory).best_model

    def test(self, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """PrivateTest labels and probabilities (flip-TTA probabilities if ``tta``)."""
        key = "test_proba_tta" if tta else "test_proba"
        return self.predictions["test_labels"], self.predictions[key]


def load_result(run_dir, name: str) -> ModelResult:
    """Load ``run_dir/models/<name>/``; a clear error if training has not finished."""
    return load_directory(Run(run_dir).model(name).directory, name)


def load_directory(directory: Path, name: str) -> ModelResult:
    """Load what ``ferlib.train.train`` wrote into ``directory`` (one model or one fold)."""
    model = ModelRun(directory)
    if not model.metrics.exists():
        raise FileNotFoundError(f"{model.directory}: no finished training for {name!r} "
                                f"({METRICS} missing); run `python -m ferlib train --model "
                                f"{name}` or the 03_train notebook first")
    with np.load(model.predictions) as archive:
        predictions = {key: archive[key] for key in archive.files}
    return ModelResult(name=name, directory=model.directory,
                       history=pd.read_csv(model.history), timing=pd.read_csv(model.timing),
                       metrics=read_json(model.metrics), settings=read_json(model.settings),
                       predictions=predictions)


def load_cv_result(run_dir, name: str) -> ModelResult:
    """A cross-validated model as one result: the k-fold ensemble on PrivateTest (mean of the
    fold models' probabilities), pooled out-of-fold predictions as validation, and learning
    curves averaged over folds (``<column>_sd`` holds the spread); ``folds`` holds each fold.
    """
    model = Run(run_dir).model(name)
    if not model.cv_metrics.exists():
        raise FileNotFoundError(f"{model.directory}: no finished cross-validation for {name!r} "
                                f"({CV_METRICS} missing); run `python -m ferlib train "
                                f"--model {name}` with cv_folds set, or the 03_train notebook")
    cv = read_json(model.cv_metrics)
    folds = [load_directory(model.fold(k).directory, name) for k in range(1, cv["folds"] + 1)]
    with np.load(model.cv_predictions) as archive:
        pooled = {key: archive[key] for key in archive.files}
    stacked = pd.concat([fold.history.assign(fold=k) for k, fold in enumerate(folds, 1)])
    history = stacked.groupby("epoch").mean(numeric_only=True).drop(columns="fold")
    spread = stacked.groupby("epoch").std(numeric_only=True).drop(columns="fold")
    history = history.join(spread.add_suffix("_sd")).reset_index()
    timing = pd.concat([fold.timing for fold in folds]).groupby("epoch").mean().reset_index()
    first = folds[0].metrics
    metrics_ = {"model": name, "folds": cv["folds"],
                "best_epoch": int(np.argmax(history.val_accuracy.values)) + 1,
                "epochs_run": len(history),
                "stopped_reason": ", ".join(sorted({f.metrics["stopped_reason"] for f in folds})),
                "budget_minutes": first.get("budget_minutes"),
                "train_seconds": float(sum(f.metrics["train_seconds"] for f in folds)),
                "seconds_per_epoch": float(timing.seconds.mean()),
                "parameters": first.get("parameters"), "machine": first.get("machine"),
                "privatetest_scorings": max(f.metrics.get("privatetest_scorings", 1)
                                            for f in folds),
                "val": cv["oof"]}
    predictions = {"val_proba": pooled["oof_proba"], "val_labels": pooled["oof_labels"],
                   "val_ids": pooled["oof_ids"]}
    if "test_proba" in pooled:
        metrics_["test"] = cv["ensemble_test"]
        predictions.update(test_proba=pooled["test_proba"], test_labels=pooled["test_labels"],
                           test_ids=pooled["test_ids"], fold_test_proba=pooled["fold_test_proba"])
    return ModelResult(name=name, directory=model.directory, history=history, timing=timing,
                       metrics=metrics_, settings=folds[0].settings, predictions=predictions,
                       folds=folds, cv=cv)


def load_results(run_dir, names, cv_folds: int = 0) -> dict[str, ModelResult]:
    """Every model's result: the official-split model, or with ``cv_folds`` the k-fold
    cross-validation (see :func:`load_cv_result`)."""
    load = load_cv_result if cv_folds else load_result
    return {name: load(run_dir, name) for name in names}


BACKEND_NAMES = {"jax": "JAX", "tensorflow": "TensorFlow", "torch": "PyTorch"}


def training_machine(machine: str) -> str:
    """A model's ``metrics.json`` ``machine`` ("NVIDIA H200 (16 CPU cores), Keras 3.15.1 on
    jax", as ``ferlib.train.machine_description`` writes it) as "NVIDIA H200 (JAX)"."""
    device = machine.split(" (", 1)[0]
    backend = machine.rsplit(" on ", 1)[1] if " on " in machine else ""
    return f"{device} ({BACKEND_NAMES.get(backend, backend)})" if backend else device


def trained_on(run_dir, names) -> str | None:
    """Where a run's models were trained, from their own ``metrics.json`` (the first fold's
    under cross-validation), not from the machine that renders: "NVIDIA H200 (JAX)" when all
    agree, else per model ("alexnet: ...; vit: ..."); None before any model has finished."""
    machines = {}
    for name in names:
        model = Run(run_dir).model(name)
        metrics = read_json(model.metrics) or read_json(model.fold(1).metrics) or {}
        if metrics.get("machine"):
            machines[name] = training_machine(metrics["machine"])
    if not machines:
        return None
    if len(set(machines.values())) == 1:
        return next(iter(machines.values()))
    return "; ".join(f"{name}: {machine}" for name, machine in machines.items())


# ----------------------------------------------------------------------------- progress

STOP_WORDS = {"early_stopping": "early stop", "completed": "epoch cap", "budget": "time budget"}


def progress_table(directory: Path, params: dict):
    """One row per model of a run: epochs done of the cap, best PublicTest accuracy and epoch,
    epochs since the best (against the early-stopping patience), whether a finished model
    converged (:func:`converged_by_curve`), state, mean seconds per epoch
    and the time left if it runs to the cap. Reads ``state.json`` files only (safe while a
    training is running)."""
    import pandas as pd

    from ferlib.config import model_settings

    rows = []
    for name in params["models"]:
        train = model_settings(params, name)["train"]
        parts = ([f"fold{k}" for k in range(1, params["cv_folds"] + 1)] if params["cv_folds"]
                 else [""])
        for part in parts:
            state = Run(directory).model(name, part).read_state() or {}
            history, timing = state.get("history", []), state.get("timing", [])
            done = len(history)
            seconds = (sum(t["seconds"] for t in timing) / len(timing)) if timing else None
            finished = state.get("finished")
            rows.append({
                "model": f"{name}/{part}" if part else name,
                "epochs done": f"{done}/{train['epochs']}",
                "best PublicTest acc": (state.get("best_val_accuracy")
                                        if state.get("best_epoch") else None),
                "best epoch": state.get("best_epoch"),
                "since best / patience": (f"{done - state['best_epoch']}/"
                                          f"{train['early_stopping_patience']}"
                                          if state.get("best_epoch") else None),
                "converged": (("yes" if converged_by_curve(
                    done, state["best_epoch"], train["early_stopping_patience"]) else "no")
                    if finished and state.get("best_epoch") else None),
                "state": ("finished: " + STOP_WORDS.get(state.get("stopped_reason"),
                                                        str(state.get("stopped_reason")))
                          if finished
                          else "stopping" if state.get("stopped_reason")
                          else "in progress" if done else "not started"),
                "s/epoch": round(seconds) if seconds else None,
                "left at most (h)": (0.0 if finished or state.get("stopped_reason") else
                                     round((train["epochs"] - done) * seconds / 3600, 2)
                                     if seconds else None),
            })
    frame = pd.DataFrame(rows)
    for column in ("best epoch", "s/epoch"):  # whole numbers, even next to missing values
        frame[column] = frame[column].astype("Int64")
    return frame
