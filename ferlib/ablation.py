"""A/B runs of training techniques on top of a profile's adopted recipes, with Optuna.

``python -m ferlib ablation --profile P --model M`` trains the model's recipe as it is in the
profile ("baseline") and once per variant of ``ablation.variants`` (EMA of the weights, SGD
with Nesterov momentum, no weight decay on norms and embeddings, MixUp / CutMix, ...), each
with the same ``ablation.seeds`` training seeds, under the recipe search's protocol: the same
stratified subset of Training (``search.train_images``), ``search.epochs`` epochs and
``search.fixed``. Every run is scored on PublicTest (its best epoch); PrivateTest is never read.
The paired difference to the baseline (same seed) says whether a technique helps; adopting it
is an explicit edit of the profile.

The runs are trials of one Optuna study per model, ``<profile>/<model>/ablation``, in the
search's storage and, like a search, copied after every trial to a committed journal
(``<search.record>/<model>.ablation.journal``), so a killed or moved run resumes. Each point of
the grid (variant x seed) is enqueued until it has a complete trial: Optuna's GridSampler is
not used because it counts a failed trial (one killed mid-run and recorded as failed) as
visited, and would never run that point again on a new machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from ferlib.config import record_path
from ferlib.search import (default_storage, journal_storage, open_storage, save_record,
                           search_data, search_dir, shown_path, train_trial, trial_params)

BASELINE = "baseline"


def study_name(profile: str, model_name: str) -> str:
    return f"{profile}/{model_name}/ablation"


def variants(params: dict) -> dict[str, dict]:
    """{name: dotted path -> value}, the baseline (nothing changed) first."""
    return {BASELINE: {}, **params["ablation"]["variants"]}


def grid(params: dict) -> list[tuple[str, int]]:
    """Every (variant, seed index) to run, in order: each seed through every variant."""
    return [(name, seed) for seed in range(params["ablation"]["seeds"])
            for name in variants(params)]


def ablation_record(params: dict, model_name: str) -> Path | None:
    base = record_path(params, model_name)
    return None if base is None else base.with_name(f"{model_name}.ablation.journal")


def open_ablation(params: dict, model_name: str, storage: str | None = None, *,
                  run_dir: Path | None = None):
    """The (profile, model) ablation study, created or loaded, seeded from its committed
    journal when the storage has none of its trials."""
    import optuna

    from ferlib.runs import run_dir as default_run_dir

    directory = Path(run_dir or default_run_dir(params["profile"]))
    url = storage or default_storage(directory)
    name = study_name(params["profile"], model_name)
    # No retry of a stale trial: its grid point has no complete trial, so it runs again anyway.
    storage_object = open_storage(url, params["search"]["heartbeat_seconds"], retry=False)
    study = optuna.create_study(study_name=name, direction="maximize", load_if_exists=True,
                                storage=storage_object)
    record = ablation_record(params, model_name)
    if record is not None and record.exists() and not study.get_trials(deepcopy=False):
        copied = optuna.load_study(study_name=name, storage=journal_storage(record))
        study.add_trials(copied.get_trials(deepcopy=False))
        print(f"[ablation {name}] seeded from {shown_path(record)}: {len(copied.trials)} trials")
    search = params["search"]
    study.set_user_attr("protocol", {"epochs": search["epochs"],
                                     "train_images": search["train_images"],
                                     "fixed": search["fixed"],
                                     "seeds": params["ablation"]["seeds"]})
    study.set_user_attr("variants", variants(params))
    return study


def _point(trial) -> tuple[str, int] | None:
    params = trial.params or trial.system_attrs.get("fixed_params") or {}
    if "variant" not in params:
        return None
    return params["variant"], int(params["seed"])


def remaining(study, params: dict) -> list[tuple[str, int]]:
    """The grid points without a complete trial, in grid order."""
    import optuna

    done = {_point(trial) for trial in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
    return [point for point in grid(params) if point not in done]


def run_ablation(params: dict, model_name: str, *, storage: str | None = None,
                 run_dir: Path | None = None, progress: bool = True, data=None):
    """Run (or resume) every missing (variant, seed) of one model; returns the study.

    ``data`` (tests) replaces the loaded Training subset and PublicTest; it must not hold
    PrivateTest images."""
    import optuna

    from ferlib.runs import run_dir as default_run_dir

    if model_name not in params["ablation"]["models"]:
        raise ValueError(f"ablation.models: {model_name} is not among the models to A/B "
                         f"({', '.join(params['ablation']['models']) or 'none'}); add it to the "
                         f"profile's ablation.models")
    directory = Path(run_dir or default_run_dir(params["profile"]))
    study = open_ablation(params, model_name, storage, run_dir=directory)
    record = ablation_record(params, model_name)
    say = print if progress else (lambda *args, **kwargs: None)
    todo = remaining(study, params)
    total = len(grid(params))
    if not todo:
        say(f"[ablation {study.study_name}] done: {total} of {total} runs complete")
        return study
    if data is None:
        data = search_data(params, progress)
    if (data.split == "test").any():
        raise ValueError("ablation: the data hold PrivateTest images; an A/B must not see them")
    table = variants(params)
    runs_dir = search_dir(directory) / f"{model_name}-ablation"
    say(f"[ablation {study.study_name}] {total - len(todo)} of {total} runs complete; "
        f"{len(table)} variants x {params['ablation']['seeds']} seeds, "
        f"{int((data.split == 'train').sum()):,} train / {int((data.split == 'val').sum()):,} "
        f"PublicTest images, {params['search']['epochs']} epochs each")
    seconds = []

    def objective(trial):
        name = trial.suggest_categorical("variant", list(table))
        seed = trial.suggest_categorical("seed", list(range(params["ablation"]["seeds"])))
        settings = trial_params(params, model_name, table[name])
        settings["seed"] = params["seed"] + seed
        return train_trial(trial, model_name, data, settings,
                           runs_dir / f"{name}-seed{seed}-trial{trial.number:04d}", directory,
                           progress=progress)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    waiting = (optuna.trial.TrialState.WAITING,)
    while todo:
        # A trial enqueued by a run killed before it started is run first, not enqueued twice.
        if not study.get_trials(deepcopy=False, states=waiting):
            study.enqueue_trial({"variant": todo[0][0], "seed": todo[0][1]})
        began = time.time()
        study.optimize(objective, n_trials=1, gc_after_trial=True)
        seconds.append(time.time() - began)
        if record is not None:
            save_record(study, record)
        trial = max((t for t in study.get_trials(deepcopy=False) if t.state.is_finished()),
                    key=lambda t: t.datetime_complete)
        todo = remaining(study, params)
        name, seed = _point(trial)
        value = "failed" if trial.value is None else f"PublicTest {trial.value:.3f}"
        say(f"[ablation {study.study_name}] {name} seed {seed}: {value}; "
            f"{total - len(todo)}/{total} runs complete, "
            f"ETA {len(todo) * np.mean(seconds) / 60:.0f} min", flush=True)
    return study


def load_ablations(params: dict, storage: str | None = None,
                   run_dir: Path | None = None) -> dict:
    """{model name: ablation study} from the storage, else the committed journals."""
    import optuna

    from ferlib.runs import run_dir as default_run_dir
    from ferlib.search import STORAGE_FILE

    directory = Path(run_dir or default_run_dir(params["profile"]))
    if storage is None:
        path = search_dir(directory) / STORAGE_FILE
        storage = f"sqlite:///{path.resolve()}" if path.exists() else None
    names = ({summary.study_name for summary in optuna.get_all_study_summaries(storage)}
             if storage else set())
    studies = {}
    for model_name in params["ablation"]["models"]:
        name = study_name(params["profile"], model_name)
        record = ablation_record(params, model_name)
        if name in names:
            studies[model_name] = optuna.load_study(study_name=name, storage=storage)
        elif record is not None and record.exists():
            studies[model_name] = optuna.load_study(study_name=name,
                                                    storage=journal_storage(record))
    return studies


def ablation_table(study) -> pd.DataFrame:
    """One row per variant: what it sets, the runs (seeds) complete, the mean PublicTest
    accuracy and its sd over seeds, the mean paired difference to the baseline (same seeds)
    with its min and max, and minutes per run."""
    import optuna

    rows = [{"variant": point[0], "seed": point[1], "accuracy": trial.value,
             "minutes": (trial.user_attrs.get("seconds") or np.nan) / 60}
            for trial in study.get_trials(deepcopy=False,
                                          states=(optuna.trial.TrialState.COMPLETE,))
            if (point := _point(trial)) is not None]
    columns = ["variant", "sets", "runs", "PublicTest (mean)", "sd over seeds",
               "vs baseline (paired mean)", "paired min", "paired max", "minutes per run"]
    if not rows:
        return pd.DataFrame(columns=columns)
    runs = pd.DataFrame(rows).drop_duplicates(["variant", "seed"], keep="last")
    baseline = runs[runs.variant == BASELINE].set_index("seed").accuracy
    declared = study.user_attrs.get("variants", {})
    table = []
    for name in dict.fromkeys([*declared, *runs.variant]):
        mine = runs[runs.variant == name].set_index("seed")
        if mine.empty:
            continue
        paired = (mine.accuracy - baseline).dropna()
        table.append({
            "variant": name,
            "sets": ", ".join(f"{path}={value}" for path, value in declared.get(name, {}).items())
            or "the adopted recipe",
            "runs": len(mine), "PublicTest (mean)": mine.accuracy.mean(),
            "sd over seeds": mine.accuracy.std() if len(mine) > 1 else np.nan,
            "vs baseline (paired mean)": paired.mean() if len(paired) and name != BASELINE
            else np.nan,
            "paired min": paired.min() if len(paired) and name != BASELINE else np.nan,
            "paired max": paired.max() if len(paired) and name != BASELINE else np.nan,
            "minutes per run": mine.minutes.mean()})
    return pd.DataFrame(table, columns=columns)
