"""Tests for ferlib.search: a search runs and a test pruner stops the clearly worse recipe, a
search killed with ``kill -9`` mid-trial resumes without counting the killed trial, two workers
on one storage finish the budget between them, a bad space is one clear error, the best recipe
comes out as profile YAML, and PrivateTest is never read (its images here are not even valid
files).

Real data is never needed: the subprocess tests use a generated image folder, the in-process
ones the synthetic arrays of ``test_train``.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import make_fer_folder
from ferlib import PROJECT_ROOT
from ferlib.config import deep_merge, load_params, model_settings, validate
from ferlib.data import FERDataError, load_fer2013

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
    "ignore::optuna.exceptions.ExperimentalWarning")

TINY = {"alexnet": {"width": 0.25, "dense_units": 16}}
BASE = {"seed": 0, "models": ["alexnet"], "model_params": TINY,
        "train": {"batch_size": 32, "learning_rate": 3e-3, "warmup_epochs": 0}}


def search_profile(tmp_path: Path, search: dict, data_path: Path | None = None,
                   name: str = "searchtest") -> Path:
    profile = deep_merge(BASE, {"search": search, "profile": name})
    if data_path is not None:
        profile["data"] = {"path": str(data_path)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


@pytest.fixture(scope="module")
def folder_without_readable_privatetest(tmp_path_factory):
    """A FER image folder whose PrivateTest files are garbage: reading one raises."""
    root = make_fer_folder(tmp_path_factory.mktemp("fer"),
                           {"Training": ("train", 30), "PublicTest": ("test", 10),
                            "PrivateTest": ("test", 4)})
    broken = sorted(root.rglob("PrivateTest_*"))
    assert broken
    for file in broken:
        file.write_bytes(b"not an image")
    return root


def test_a_search_never_reads_privatetest(folder_without_readable_privatetest, tmp_path):
    root = folder_without_readable_privatetest
    with pytest.raises(FERDataError, match="cannot decode"):
        load_fer2013(root, cache=False)  # the whole dataset: a PrivateTest file is read
    data = load_fer2013(root, splits=("train", "val"), cache_dir=tmp_path)
    assert set(data.split) == {"train", "val"}
    assert (data.split == "val").sum() == 70


# ----------------------------------------------------------------------------- the space

@pytest.mark.parametrize("space, message", [
    ({"all": {"train.learnin_rate": {"low": 1e-4, "high": 1e-3}}}, "'learnin_rate' is not a train"),
    ({"all": {"train.learning_rate": {"low": 1e-2, "high": 1e-3}}}, "low 0.01 is above high"),
    ({"alexnet": {"model.width": {"choices": []}}}, "search.space.alexnet.model.width.choices"),
    ({"all": {"train.learning_rate": {"low": 0.0, "high": 1e-3, "log": True}}}, "log range"),
    ({"all": {"train.optimizer": {"low": 1, "high": 2}}}, "takes choices"),
    ({"all": {"train.optimizer": {"choices": ["adamw", "rmsprop"]}}}, "'rmsprop' is not allowed"),
    ({"all": {"train.batch_size": {"low": 16, "high": 64.5}}}, "is an integer"),
    ({"all": {"optimizer": {"choices": ["adamw"]}}}, "expected train.<key>"),
    ({"vit": {"model.patch_size": {"choices": [5]}}}, "patch_size 5 of vit must divide"),
    ({"vit": {"model.hidden_dim": {"choices": [90]}}}, "does not split into 4 heads"),
    ({"vgg": {}}, "unknown key 'search.space.vgg'"),
    ({"all": {"train.learning_rate": {"low": 1e-4, "high": 1e-3, "by": 2}}},
     "unknown key 'search.space.all.train.learning_rate.by'"),
])
def test_a_bad_space_is_one_error_naming_the_key(space, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(deep_merge(BASE, {"search": {"space": space}}))


def test_the_shipped_full_profile_declares_a_valid_search():
    params = load_params("full")
    assert params["search"]["trials"] >= 8
    for name in ("alexnet", "resnet50v2", "vit", "vit_conv"):
        assert params["search"]["space"].get(name), name


def test_trial_values_reach_only_their_model():
    from ferlib.search import trial_params

    params = validate(deep_merge(BASE, {"models": ["alexnet", "vit"], "search": {
        "epochs": 3, "fixed": {"train.schedule": "constant"}}}))
    trial = trial_params(params, "alexnet", {"train.learning_rate": 0.01, "augment.zoom": 0.2,
                                             "model.width": 0.5})
    settings = model_settings(trial, "alexnet")
    assert settings["train"]["learning_rate"] == 0.01
    assert settings["train"]["epochs"] == 3 and settings["train"]["schedule"] == "constant"
    assert settings["augment"]["zoom"] == 0.2 and settings["model_params"]["width"] == 0.5
    untouched = model_settings(trial, "vit")
    assert untouched["train"]["learning_rate"] == 3e-3 and untouched["augment"]["zoom"] == 0.0


# ----------------------------------------------------------------------------- searching

def _synthetic_without_test():
    from test_train import synthetic_data

    data = synthetic_data(per_split=(30, 10, 0))
    return data.select(data.split != "test")


@pytest.mark.train
def test_search_runs_prunes_the_worse_recipe_and_prints_the_best(tmp_path, capsys):
    import optuna

    from ferlib.search import best_recipe_yaml, budget_summary, open_study, run_search

    path = search_profile(tmp_path, {
        "trials": 2, "epochs": 3, "train_images": None, "pruner": "threshold",
        "threshold": 0.3, "space": {"all": {"train.learning_rate": {"choices": [1e-9, 3e-3]}}}})
    params = load_params(str(path))
    study = open_study(params, "alexnet", run_dir=tmp_path / "run")
    study.enqueue_trial({"train.learning_rate": 1e-9})   # learns nothing: chance is 1/7
    study.enqueue_trial({"train.learning_rate": 3e-3})
    run_search(params, "alexnet", run_dir=tmp_path / "run", data=_synthetic_without_test())
    states = {t.params["train.learning_rate"]: t.state for t in study.get_trials()}
    assert states == {1e-9: optuna.trial.TrialState.PRUNED,
                      3e-3: optuna.trial.TrialState.COMPLETE}
    pruned = [t for t in study.get_trials() if t.state.name == "PRUNED"][0]
    assert pruned.user_attrs["epochs"] == 1  # stopped at its first report
    assert study.best_value > 0.5
    summary = budget_summary(study)
    assert (summary["complete"], summary["pruned"], summary["epochs_trained"]) == (1, 1, 4)
    out = capsys.readouterr().out
    assert "trial #0 pruned after 1 epochs" in out and "2/2 finished" in out
    # No model files are kept, no PrivateTest scoring happened.
    assert not list((tmp_path / "run").rglob("*.keras"))
    assert not list((tmp_path / "run").rglob("privatetest_scorings.json"))
    # The best recipe is profile YAML that sets exactly that model's value.
    block = best_recipe_yaml(study, "alexnet")
    assert block.startswith("# from the Optuna study searchtest/alexnet, trial 1")
    adopted = validate(deep_merge(BASE, yaml.safe_load(block)))
    assert model_settings(adopted, "alexnet")["train"]["learning_rate"] == 3e-3
    # The report's tables and figures come from the study.
    from ferlib import plots
    from ferlib.search import curves_table, importances, trials_table

    trials, curves = trials_table(study), curves_table(study)
    assert list(curves.groupby("trial").epoch.max()) == [1, 3]
    assert plots.search_history(trials, curves).axes
    assert plots.search_slices(trials, study.user_attrs["space"]) is not None
    assert importances(study) == {}  # one complete trial: nothing to attribute
    assert plots.search_importances({}) is None
    assert plots.search_importances({"train.learning_rate": 0.7, "augment.zoom": 0.3}).axes
    # Resuming a finished search trains nothing.
    run_search(params, "alexnet", run_dir=tmp_path / "run", data=_synthetic_without_test())
    assert "budget spent: 2 of 2" in capsys.readouterr().out
    assert len(study.get_trials()) == 2


def test_any_complete_trial_can_be_adopted_and_says_which_is_best(tmp_path, capsys):
    """``--trial N`` prints trial N's recipe, naming the best one beside it; a pruned trial
    is refused, naming the complete ones."""
    import optuna

    from ferlib.__main__ import main
    from ferlib.search import best_recipe_yaml, open_study

    profile = search_profile(tmp_path, {
        "space": {"all": {"train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}}})
    study = open_study(load_params(str(profile)), "alexnet", run_dir=tmp_path / "run")
    rate = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    for value, state, lr in [(0.50, "COMPLETE", 1e-3), (0.48, "COMPLETE", 2e-4),
                             (None, "PRUNED", 5e-3)]:
        study.add_trial(optuna.trial.create_trial(
            params={"train.learning_rate": lr}, distributions={"train.learning_rate": rate},
            value=value, state=getattr(optuna.trial.TrialState, state),
            user_attrs={"epochs": 3}, intermediate_values={1: 0.3}))
    block = best_recipe_yaml(study, "alexnet", trial=1)
    assert "trial 1: PublicTest accuracy 0.4800 after 3 epochs (the best is trial 0, 0.5000)" \
        in block
    assert yaml.safe_load(block) == {"train_overrides": {"alexnet": {"learning_rate": 2e-4}}}
    assert "(the best is" not in best_recipe_yaml(study, "alexnet")
    code = main(["search", "--profile", str(profile), "--model", "alexnet", "--trial", "2",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert "trial 2 is not a complete trial; complete trials: 0, 1" in capsys.readouterr().err
    assert main(["search", "--profile", str(profile), "--model", "alexnet", "--trial", "1",
                 "--run-dir", str(tmp_path / "run")]) == 0
    assert "learning_rate: 0.0002" in capsys.readouterr().out


def _search_command(profile: Path, run_dir: Path, *extra):
    return [sys.executable, "-m", "ferlib", "search", "--profile", str(profile), "--model",
            "alexnet", "--run-dir", str(run_dir), *extra]


def _environment(data: Path, cache: Path) -> dict:
    env = dict(os.environ, FER2013_PATH=str(data), FERLIB_CACHE=str(cache),
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")])
    return env


def _load(profile: Path, run_dir: Path):
    from ferlib.search import open_study

    return open_study(load_params(str(profile)), "alexnet", run_dir=run_dir)


@pytest.mark.train
def test_a_search_killed_mid_trial_resumes_and_never_counts_the_killed_trial(
        folder_without_readable_privatetest, tmp_path):
    profile = search_profile(tmp_path, {
        "trials": 2, "epochs": 8, "train_images": None, "pruner": "none",
        "heartbeat_seconds": 1,
        "space": {"all": {"train.learning_rate": {"low": 1e-3, "high": 3e-3}}}})
    run_dir = tmp_path / "run"
    env = _environment(folder_without_readable_privatetest, tmp_path / "cache")
    process = subprocess.Popen(_search_command(profile, run_dir), env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    deadline = time.time() + 300
    for line in process.stdout:
        seen.append(line)
        if "epoch 2/8" in line or time.time() > deadline:
            break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert any("epoch 2/8" in line for line in seen), "".join(seen)
    killed = _load(profile, run_dir).get_trials()
    assert [t.state.name for t in killed] == ["RUNNING"]
    killed_rate = killed[0].params["train.learning_rate"]

    time.sleep(4)  # the grace period (3 heartbeats of 1 s) passes: the dead trial is stale
    finished = subprocess.run(_search_command(profile, run_dir), env=env, text=True,
                              capture_output=True, timeout=600)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    trials = _load(profile, run_dir).get_trials()
    states = [t.state.name for t in trials]
    assert states[0] == "FAIL" and states.count("COMPLETE") == 2, states
    retried = trials[1]
    assert retried.params["train.learning_rate"] == killed_rate  # re-queued with its recipe
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retried) == 0
    assert trials[0].value is None
    assert not list(run_dir.rglob("*.keras")) and not list(run_dir.rglob("*.h5"))
    assert not (run_dir / "privatetest_scorings.json").exists()


@pytest.mark.train
def test_two_workers_on_one_storage_finish_the_budget_between_them(
        folder_without_readable_privatetest, tmp_path):
    profile = search_profile(tmp_path, {
        "trials": 4, "epochs": 2, "train_images": None, "pruner": "none",
        "space": {"all": {"train.learning_rate": {"low": 1e-3, "high": 3e-3, "log": True}}}})
    run_dir = tmp_path / "run"
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    env = _environment(folder_without_readable_privatetest, tmp_path / "cache")
    load_fer2013(folder_without_readable_privatetest, splits=("train", "val"),
                 cache_dir=tmp_path / "cache")  # one cache, not two writers racing for it
    workers = [subprocess.Popen(_search_command(profile, run_dir, "--storage", storage),
                                env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], "\n".join(
        output[-3000:] for output in outputs)
    from ferlib.search import open_study

    study = open_study(load_params(str(profile)), "alexnet", storage)
    trials = study.get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4, [t.state.name for t in trials]
    assert len({t.user_attrs["directory"] for t in complete}) == 4
    assert {t.user_attrs["worker"] for t in complete} <= {
        f"{__import__('socket').gethostname()}:{worker.pid}" for worker in workers}
    # Nothing else ran or failed: any extra trial is one that found the budget reached.
    for trial in trials:
        assert trial.state.name in ("COMPLETE", "FAIL")
    assert np.isfinite([t.value for t in complete]).all()


def test_the_cli_prints_the_best_recipe_or_says_how_to_get_one(tmp_path, capsys):
    from ferlib.__main__ import main

    profile = search_profile(tmp_path, {
        "space": {"all": {"train.learning_rate": {"low": 1e-3, "high": 3e-3}}}})
    code = main(["search", "--profile", str(profile), "--model", "alexnet", "--best",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert "no complete trial yet" in capsys.readouterr().err


def test_the_committed_record_seeds_a_new_machine_and_feeds_the_report(tmp_path):
    """``search.record`` keeps each study's trials in a journal file: a machine with no study
    database starts from it with the same trial numbers, a trial that was running is kept as
    failed (not a result), and load_studies reads the record when there is no database."""
    import optuna

    from ferlib.search import counted_trials, load_studies, open_study, record_path, run_search

    record = tmp_path / "record"
    path = search_profile(tmp_path, {
        "trials": 2, "record": str(record),
        "space": {"all": {"train.learning_rate": {"low": 1e-3, "high": 3e-3}}}})
    params = load_params(str(path))
    first = open_study(params, "alexnet", run_dir=tmp_path / "machine-1")
    distributions = {"train.learning_rate": optuna.distributions.FloatDistribution(1e-3, 3e-3)}
    for value, state in ((0.41, "COMPLETE"), (0.2, "PRUNED")):
        first.add_trial(optuna.trial.create_trial(
            params={"train.learning_rate": 2e-3}, distributions=distributions, value=value,
            state=getattr(optuna.trial.TrialState, state), intermediate_values={1: value}))
    running = first.ask(distributions)  # a trial in flight when the copy is written
    # With the budget already spent, run_search only writes the record and returns.
    run_search(params, "alexnet", run_dir=tmp_path / "machine-1", progress=False)
    assert record_path(params, "alexnet") == record / "alexnet.journal"
    assert (record / "alexnet.journal").is_file()
    assert not list(record.glob(".*"))  # no temporary or lock file left beside it

    assert load_studies(params, run_dir=tmp_path / "no-database")["alexnet"].best_value == 0.41
    second = open_study(params, "alexnet", run_dir=tmp_path / "machine-2")
    trials = second.get_trials()
    assert [(t.number, t.state.name) for t in trials] == [
        (0, "COMPLETE"), (1, "PRUNED"), (running.number, "FAIL")]
    assert trials[1].intermediate_values == {1: 0.2}
    assert trials[2].user_attrs["recorded_while"] == "running"
    assert len(counted_trials(second)) == 2 and second.best_trial.number == 0
    assert second.user_attrs["budget"]["trials"] == 2
    # A study that already has trials is not seeded twice.
    assert len(open_study(params, "alexnet", run_dir=tmp_path / "machine-2").trials) == 3
