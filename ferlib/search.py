"""Recipe search with Optuna: one study per (profile, model), stored in a database.

Each trial samples a recipe from the profile's ``search.space``, trains on (a stratified subset
of) Training with :func:`ferlib.train.train` and reports PublicTest accuracy after every epoch;
Optuna's pruner stops trials that fall behind. The objective is the best PublicTest accuracy of
the trial, the epoch that ``train`` keeps. PrivateTest is never read: the search loads the
dataset with ``splits=("train", "val")``, so no PrivateTest image is even decoded.

The study lives in ``runs/<profile>/search/studies.db`` (SQLite) unless ``storage`` names
another Optuna storage URL (``postgresql://...``, ``mysql://...``), so a second machine can work
on the same study. Trials send a heartbeat: a trial whose process died (``kill -9``, a lost
machine) is marked failed once its heartbeat is overdue and re-queued once with the same
recipe (Optuna's ``RetryHeartbeatStaleTrialCallback``); failed trials never count as results. The
budget is a number of finished (complete or pruned) trials per study, each of at most
``search.epochs`` epochs, the same for every model.

``search.record`` (a folder, ``params/search/<profile>`` in the shipped profiles) keeps a
committed copy of every study: one Optuna journal file per model holding its finished trials,
rewritten after each trial. A machine without the database (a fresh clone, a new session)
seeds a new study from that copy and goes on, with the same trial numbers; the report reads the
copy when there is no database. A trial that was running when the copy was written is kept in
it as failed: it never counts as a result.

Nothing here re-implements what Optuna has: sampling (TPE), pruning, storage, heartbeat and
retry are Optuna's.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from pathlib import Path

from ferlib import MODEL_NAMES
from ferlib.config import deep_merge, record_path, search_overrides, search_target, validate

STORAGE_FILE = "studies.db"
# Trials of these states are results and count towards the budget; a failed trial does not.
COUNTED_STATES = ("COMPLETE", "PRUNED")


class BudgetReached(RuntimeError):
    """Raised inside a trial that another worker's running trials have made unnecessary."""


def search_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "search"


def study_name(profile: str, model_name: str) -> str:
    return f"{profile}/{model_name}"


def default_storage(run_dir: Path) -> str:
    """The SQLite URL of a run directory's study database (the folder is created)."""
    path = search_dir(run_dir) / STORAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def open_storage(url: str, heartbeat_seconds: int = 60, retry: bool = True):
    """An Optuna RDB storage with heartbeats: a trial is stale after 3 missed beats and is
    then marked failed and (``retry``) re-queued once with its recipe."""
    from filelock import FileLock
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    def create():
        engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
        return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_seconds,
                          grace_period=3 * heartbeat_seconds,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                              max_retry=1) if retry else None)

    # Two workers opening a new SQLite file at once would both create its tables (and one
    # fail); a lock beside the file makes the first create them and the second find them.
    # Server databases handle this themselves.
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
    with FileLock(f"{path}.lock", timeout=300) if path else contextlib.nullcontext():
        return create()


def make_pruner(search: dict):
    """The pruner ``search.pruner`` names, from Optuna."""
    import optuna

    kind = search["pruner"]
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=search["startup_trials"],
                                           n_warmup_steps=search["warmup_epochs"])
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=search["epochs"])
    if kind == "threshold":
        return optuna.pruners.ThresholdPruner(lower=search["threshold"])
    return optuna.pruners.NopPruner()


def model_space(params: dict, model_name: str) -> dict:
    """Dotted path -> range or choices for one model: ``search.space.all`` then its own."""
    space = params["search"]["space"]
    return {**(space.get("all") or {}), **(space.get(model_name) or {})}


def suggest(trial, path: str, spec: dict, expected):
    """One value from Optuna's ``suggest_*`` for a validated range or list of choices."""
    if "choices" in spec:
        return trial.suggest_categorical(path, spec["choices"])
    step, log = spec.get("step"), bool(spec.get("log"))
    if expected is int:
        return trial.suggest_int(path, spec["low"], spec["high"], step=step or 1, log=log)
    return trial.suggest_float(path, float(spec["low"]), float(spec["high"]), step=step,
                               log=log)


def trial_params(params: dict, model_name: str, values: dict) -> dict:
    """The profile with one trial's values (and ``search.fixed``, ``search.epochs``) set for
    ``model_name`` only, validated like any profile."""
    search = params["search"]
    chosen = {**search["fixed"], "train.epochs": search["epochs"], **values}
    merged = deep_merge(params, search_overrides(chosen, model_name))
    merged["models"] = [model_name]
    return validate(merged)


def open_study(params: dict, model_name: str, storage: str | None = None, *,
               run_dir: Path | None = None):
    """The study of (profile, model) in ``storage`` (default: the run directory's SQLite)."""
    import optuna

    from ferlib.runs import run_dir as default_run_dir

    directory = Path(run_dir or default_run_dir(params["profile"]))
    url = storage or default_storage(directory)
    search = params["search"]
    name = study_name(params["profile"], model_name)
    # Each worker samples from its own stream: two workers seeded alike would start with the
    # same recipes. The study's trials, not the sampler's seed, are the record of the search.
    sampler = optuna.samplers.TPESampler(
        seed=(params["seed"] * 1_000_003 + os.getpid() + hash(socket.gethostname())) % 2**31,
        n_startup_trials=search["startup_trials"])
    storage_object = open_storage(url, search["heartbeat_seconds"])
    study = optuna.create_study(study_name=name, storage=storage_object, sampler=sampler,
                                pruner=make_pruner(search), direction="maximize",
                                load_if_exists=True)
    record = record_path(params, model_name)
    if record is not None and record.exists() and not study.get_trials(deepcopy=False):
        copied = optuna.load_study(study_name=name, storage=journal_storage(record))
        study.add_trials(copied.get_trials(deepcopy=False))
        for key, value in copied.user_attrs.items():
            study.set_user_attr(key, value)
        print(f"[search {name}] seeded from {shown_path(record)}: {len(copied.trials)} trials")
    budget = {key: search[key] for key in ("trials", "epochs", "train_images", "pruner")}
    study.set_user_attr("budget", budget)
    study.set_user_attr("space", model_space(params, model_name))
    study.set_user_attr("fixed", search["fixed"])
    return study


def shown_path(path: Path) -> str:
    from ferlib import PROJECT_ROOT

    try:
        return str(path.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def journal_storage(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def save_record(study, path: Path) -> Path:
    """Write ``study``'s trials to the Optuna journal file ``path`` (replaced atomically), so the
    file is a loadable study of its own. Trials still running or waiting are written as failed:
    seeded elsewhere, they are not results and must not block the budget."""
    import optuna

    from ferlib.runs import atomic_save

    trials = []
    for trial in study.get_trials(deepcopy=True):
        if not trial.state.is_finished():
            trial = optuna.trial.create_trial(
                state=optuna.trial.TrialState.FAIL, params=trial.params,
                distributions=trial.distributions,
                user_attrs={**trial.user_attrs, "recorded_while": trial.state.name.lower()},
                system_attrs=trial.system_attrs, intermediate_values=trial.intermediate_values)
        trials.append(trial)

    def write(temporary: str):
        copy = optuna.create_study(study_name=study.study_name,
                                   storage=journal_storage(Path(temporary)),
                                   directions=study.directions)
        for key, value in study.user_attrs.items():
            copy.set_user_attr(key, value)
        copy.add_trials(trials)

    atomic_save(write, path)
    return path


def counted_trials(study) -> list:
    import optuna

    states = tuple(getattr(optuna.trial.TrialState, state) for state in COUNTED_STATES)
    return study.get_trials(deepcopy=False, states=states)


def drop_weights(directory: Path) -> None:
    """Keep a trial's history, timing and metrics; its model files are not needed later."""
    for pattern in ("*.keras", "*.h5"):
        for file in Path(directory).rglob(pattern):
            file.unlink(missing_ok=True)


def train_trial(trial, model_name: str, data, settings: dict, trial_dir: Path, run_dir: Path,
                *, progress: bool = True, prune_before: int | None = None) -> float:
    """Train one trial's settings into ``trial_dir`` (its model files dropped after), reporting
    PublicTest accuracy to Optuna after every epoch; the trial's value is the best epoch's.
    With ``prune_before``, the pruner may stop the trial after any earlier epoch."""
    import optuna

    from ferlib.train import train

    trial.set_user_attr("directory", str(trial_dir.relative_to(run_dir)))
    began = time.time()

    def report(row):
        trial.report(row["val_accuracy"], row["epoch"])
        trial.set_user_attr("epochs", row["epoch"])
        trial.set_user_attr("train_accuracy", row["accuracy"])
        trial.set_user_attr("seconds", time.time() - began)
        # A trial that reached the last epoch is complete: pruning it then saves nothing and
        # would drop its score from the search.
        if prune_before is not None and row["epoch"] < prune_before and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {row['epoch']} "
                                     f"(PublicTest {row['val_accuracy']:.3f})")

    try:
        result = train(model_name, data, settings, trial_dir, progress=progress,
                       on_epoch=report)
    finally:
        drop_weights(trial_dir)
    trial.set_user_attr("best_epoch", result["best_epoch"])
    return result["val"]["accuracy"]


def search_data(params: dict, progress: bool = True):
    """Training (or its stratified ``search.train_images`` subset) and PublicTest; PrivateTest
    is not read."""
    from ferlib.data import load_dataset, subsample

    data = load_dataset(params, progress=progress, splits=("train", "val"))
    limit = params["search"]["train_images"]
    if limit:
        data = subsample(data, {"train": limit}, seed=params["seed"])
    return data


def run_search(params: dict, model_name: str, *, trials: int | None = None,
               storage: str | None = None, timeout_hours: float | None = None,
               run_dir: Path | None = None, progress: bool = True, data=None):
    """Run (or resume, or join) the search of one model until the study has ``trials``
    finished trials (default ``search.trials``) or ``timeout_hours`` pass.

    Parameters
    ----------
    params : dict
        The resolved profile (``ferlib.config.load_params``).
    model_name : str
    trials : int, optional
        The study's budget of finished (complete + pruned) trials, counted over every worker
        and every earlier run of the search.
    storage : str, optional
        An Optuna storage URL; default ``sqlite:///runs/<profile>/search/studies.db``.
    timeout_hours : float, optional
        Stop starting new trials after this long.
    run_dir : Path, optional
        Default ``runs/<profile>``; trials train in ``<run_dir>/search/<model>/trial-NNNN``.
    data : FERData, optional
        Use these arrays instead of loading (tests); must not hold PrivateTest images.

    Returns
    -------
    optuna.Study
    """
    import optuna

    from ferlib.runs import run_dir as default_run_dir

    if model_name not in MODEL_NAMES:
        raise ValueError(f"model: unknown model {model_name!r}; allowed values: "
                         f"{', '.join(MODEL_NAMES)}")
    space = model_space(params, model_name)
    if not space:
        raise ValueError(f"search.space: nothing to search for {model_name}; declare ranges "
                         f"under search.space.all or search.space.{model_name}")
    directory = Path(run_dir or default_run_dir(params["profile"]))
    study = open_study(params, model_name, storage, run_dir=directory)
    target = trials or params["search"]["trials"]
    say = print if progress else (lambda *args, **kwargs: None)
    record = record_path(params, model_name)
    if record is not None:
        save_record(study, record)
    done = len(counted_trials(study))
    if done >= target:
        say(f"[search {study.study_name}] budget spent: {done} of {target} trials finished")
        return study
    if data is None:
        data = search_data(params, progress)
    if (data.split == "test").any():
        raise ValueError("search: the data hold PrivateTest images; a search must not see them")
    trials_dir = search_dir(directory) / model_name
    started, seconds = time.time(), []
    say(f"[search {study.study_name}] {done} of {target} trials finished; "
        f"{int((data.split == 'train').sum()):,} train / {int((data.split == 'val').sum()):,} "
        f"PublicTest images, at most {params['search']['epochs']} epochs per trial, "
        f"pruner {params['search']['pruner']}")

    def objective(trial):
        running = [t for t in study.get_trials(deepcopy=False,
                                               states=(optuna.trial.TrialState.RUNNING,))
                   if t.number != trial.number]
        if len(counted_trials(study)) + len(running) >= target:
            study.stop()
            raise BudgetReached(f"the budget of {target} trials is reached by the trials "
                                f"running elsewhere")
        values = {path: suggest(trial, path, spec, search_target(path, model_name)[0])
                  for path, spec in space.items()}
        settings = trial_params(params, model_name, values)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        return train_trial(trial, model_name, data, settings,
                           trials_dir / f"trial-{trial.number:04d}", directory,
                           progress=progress, prune_before=params["search"]["epochs"])

    def log_trial(study, trial):
        if record is not None:
            save_record(study, record)
        if trial.state.name not in COUNTED_STATES:
            return
        seconds.append(trial.user_attrs.get("seconds", 0.0))
        finished = len(counted_trials(study))
        remaining = max(target - finished, 0)
        eta = remaining * (sum(seconds) / len(seconds)) / 60
        try:
            best = f"best {study.best_value:.3f} (#{study.best_trial.number})"
        except ValueError:  # no complete trial yet
            best = "no complete trial yet"
        value = "" if trial.value is None else f" PublicTest {trial.value:.3f}"
        say(f"[search {study.study_name}] trial #{trial.number} {trial.state.name.lower()} "
            f"after {trial.user_attrs.get('epochs', 0)} epochs{value}; {best}; "
            f"{finished}/{target} finished, {(time.time() - started) / 60:.1f} min so far, "
            f"ETA {eta:.0f} min", flush=True)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, callbacks=[
        optuna.study.MaxTrialsCallback(target, states=tuple(
            getattr(optuna.trial.TrialState, state) for state in COUNTED_STATES)),
        log_trial], timeout=timeout_hours * 3600 if timeout_hours else None,
        catch=(BudgetReached,), gc_after_trial=True)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        if trial.user_attrs.get("directory"):
            drop_weights(directory / trial.user_attrs["directory"])  # a dead worker's
    return study


# ----------------------------------------------------------------------------- results

def trials_table(study):
    """One row per trial: number, state, PublicTest accuracy, epochs, minutes, the values."""
    import pandas as pd

    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append({"trial": trial.number, "state": trial.state.name.lower(),
                     "publictest_accuracy": trial.value,
                     "epochs": trial.user_attrs.get("epochs"),
                     "best_epoch": trial.user_attrs.get("best_epoch"),
                     "train_accuracy": trial.user_attrs.get("train_accuracy"),
                     "minutes": (trial.user_attrs.get("seconds") or math.nan) / 60,
                     **trial.params})
    return pd.DataFrame(rows)


def curves_table(study):
    """PublicTest accuracy after every epoch of every counted trial (long format: trial,
    state, epoch, publictest_accuracy): what the pruner saw."""
    import pandas as pd

    rows = [{"trial": trial.number, "state": trial.state.name.lower(), "epoch": int(epoch),
             "publictest_accuracy": value}
            for trial in counted_trials(study)
            for epoch, value in sorted(trial.intermediate_values.items())]
    return pd.DataFrame(rows, columns=["trial", "state", "epoch", "publictest_accuracy"])


def importances(study) -> dict:
    """Optuna's parameter importances (fANOVA) over the complete trials; empty with fewer
    than two complete trials or when every trial scored alike."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2 or len({t.value for t in complete}) < 2:
        return {}
    try:
        return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # e.g. a parameter that never varied
        return {}


def budget_summary(study) -> dict:
    """The declared budget and what was spent: trials by state, epochs trained, CPU hours."""
    table = trials_table(study)
    counted = table[table.state.isin([state.lower() for state in COUNTED_STATES])]
    budget = study.user_attrs.get("budget", {})
    return {"study": study.study_name, "trials_budget": budget.get("trials"),
            "epochs_per_trial": budget.get("epochs"), "train_images": budget.get("train_images"),
            "pruner": budget.get("pruner"),
            "complete": int((table.state == "complete").sum()),
            "pruned": int((table.state == "pruned").sum()),
            "failed": int((table.state == "fail").sum()),
            "running": int((table.state == "running").sum()),
            "epochs_trained": int(counted.epochs.fillna(0).sum()) if len(counted) else 0,
            "hours": float(counted.minutes.fillna(0).sum() / 60) if len(counted) else 0.0}


def chosen_trial(study, number: int | None = None):
    """Trial ``number`` of the study (it must be complete), or the best one when ``None``."""
    import optuna

    if number is None:
        return study.best_trial
    complete = {trial.number: trial for trial in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
    if number not in complete:
        raise ValueError(f"search {study.study_name}: trial {number} is not a complete trial; "
                         f"complete trials: {', '.join(map(str, sorted(complete))) or 'none'}")
    return complete[number]


def best_recipe(study, model_name: str, trial: int | None = None) -> dict:
    """The best complete trial's values (or trial ``trial``'s) as the profile mapping that
    sets them for ``model_name`` (``train_overrides`` / ``augment_overrides`` /
    ``model_params``)."""
    return search_overrides(dict(chosen_trial(study, trial).params), model_name)


def best_recipe_yaml(study, model_name: str, storage_text: str = "",
                     trial: int | None = None) -> str:
    """The best recipe (or trial ``trial``'s) as a YAML block to paste into
    ``params/<profile>.yaml``, with a comment naming the study and trial it came from."""
    import yaml

    chosen = chosen_trial(study, trial)
    best = study.best_trial
    rank = ("" if chosen.number == best.number
            else f" (the best is trial {best.number}, {best.value:.4f})")
    budget = study.user_attrs.get("budget", {})
    header = (f"# from the Optuna study {study.study_name}{storage_text}, trial {chosen.number}: "
              f"PublicTest accuracy {chosen.value:.4f} after {chosen.user_attrs.get('epochs')} "
              f"epochs{rank}\n# (search protocol: at most {budget.get('epochs')} epochs, "
              f"{budget.get('train_images') or 'all'} Training images, fixed "
              f"{study.user_attrs.get('fixed') or {}}); merge into the profile by hand.\n")
    body = yaml.safe_dump(search_overrides(dict(chosen.params), model_name), sort_keys=True,
                          default_flow_style=None)
    return header + body


def load_studies(params: dict, storage: str | None = None, run_dir: Path | None = None) -> dict:
    """{model name: study} for the profile's studies that exist in the storage (no creation),
    else in the committed record (``search.record``); empty when neither has one."""
    import optuna

    from ferlib.runs import run_dir as default_run_dir

    directory = Path(run_dir or default_run_dir(params["profile"]))
    if storage is None:
        path = search_dir(directory) / STORAGE_FILE
        storage = f"sqlite:///{path.resolve()}" if path.exists() else None
    names = ({summary.study_name for summary in optuna.get_all_study_summaries(storage)}
             if storage else set())
    studies = {}
    for model_name in MODEL_NAMES:
        name = study_name(params["profile"], model_name)
        record = record_path(params, model_name)
        if name in names:
            studies[model_name] = optuna.load_study(study_name=name, storage=storage)
        elif record is not None and record.exists():  # the committed copy, e.g. a fresh clone
            studies[model_name] = optuna.load_study(study_name=name,
                                                    storage=journal_storage(record))
    return studies

