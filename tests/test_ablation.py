"""Tests for ferlib.ablation: every (variant, seed) runs once under the search's protocol, the
table pairs each variant with the baseline of the same seed, a run that failed mid-way is run
again (never counted), the committed journal seeds a new machine, and a bad variant is one
error naming the key."""

from pathlib import Path

import pytest
import yaml

from ferlib.config import deep_merge, load_params
from test_search import BASE, _synthetic_without_test

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
    "ignore::optuna.exceptions.ExperimentalWarning")


def ablation_profile(tmp_path: Path, ablation: dict, record: bool = True) -> dict:
    profile = deep_merge(BASE, {
        "profile": "abtest", "ablation": ablation,
        "search": {"epochs": 2, "train_images": None,
                   "record": str(tmp_path / "record") if record else None}})
    path = tmp_path / "abtest.yaml"
    path.write_text(yaml.safe_dump(profile))
    return load_params(str(path))


@pytest.mark.train
def test_every_variant_and_seed_runs_once_paired_with_the_baseline(tmp_path, capsys,
                                                                   monkeypatch):
    from ferlib import ablation, train as train_module

    params = ablation_profile(tmp_path, {
        "models": ["alexnet"], "seeds": 2,
        "variants": {"frozen": {"train.learning_rate": 1e-9}}})  # learns nothing
    assert ablation.grid(params) == [("baseline", 0), ("frozen", 0), ("baseline", 1),
                                     ("frozen", 1)]
    data = _synthetic_without_test()
    real_train, calls = train_module.train, []

    def dies_once(*args, **kwargs):  # the second run dies mid-way, as a killed process would
        calls.append(args[2]["seed"])
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_train(*args, **kwargs)

    # The training code's fingerprint is computed once per process: from the real ``train``
    # first (conftest does it too), or every later training in this pytest process (and its
    # resume by a child process) would carry the fingerprint of ``dies_once``.
    train_module.training_code()
    monkeypatch.setattr(train_module, "train", dies_once)
    with pytest.raises(RuntimeError, match="killed"):
        ablation.run_ablation(params, "alexnet", run_dir=tmp_path / "run", data=data)
    study = ablation.open_ablation(params, "alexnet", run_dir=tmp_path / "run")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "FAIL"]
    assert ablation.remaining(study, params) == [("frozen", 0), ("baseline", 1), ("frozen", 1)]

    ablation.run_ablation(params, "alexnet", run_dir=tmp_path / "run", data=data)
    out = capsys.readouterr().out
    assert "frozen seed 1: PublicTest" in out and "4/4 runs complete" in out
    assert calls == [0, 0, 0, 1, 1]  # the failed point ran again; each seed as the baseline's
    table = ablation.ablation_table(study).set_index("variant")
    assert table.loc["baseline", "sets"] == "the adopted recipe"
    assert table.loc["frozen", "sets"] == "train.learning_rate=1e-09"
    assert (table.runs == 2).all()
    assert table.loc["frozen", "vs baseline (paired mean)"] < -0.2  # it never learns
    assert table.loc["frozen", "paired max"] < 0
    assert not list((tmp_path / "run").rglob("*.keras"))  # no model files are kept
    from ferlib import plots

    assert len(plots.ablation_bars({"alexnet": table.reset_index()}).axes) == 1
    assert plots.ablation_bars({"alexnet": table.reset_index().iloc[:1]}) is None  # baseline

    # Finished: a second run trains nothing; a new machine seeds from the committed journal.
    ablation.run_ablation(params, "alexnet", run_dir=tmp_path / "run", data=data)
    assert "done: 4 of 4 runs complete" in capsys.readouterr().out
    assert (tmp_path / "record" / "alexnet.ablation.journal").exists()
    moved = ablation.load_ablations(params, run_dir=tmp_path / "elsewhere")["alexnet"]
    assert ablation.ablation_table(moved).equals(ablation.ablation_table(study))


@pytest.mark.parametrize("ablation, message", [
    ({"models": ["alexnet"], "variants": {"ema": {"train.nope": 1}}},
     "ablation.variants.ema.train.nope: 'nope' is not a train setting"),
    ({"models": ["alexnet"], "variants": {"baseline": {"train.ema_momentum": 0.9}}},
     "ablation.variants.baseline: a variant name"),
    ({"models": ["alexnet"], "variants": {"ema": {}}}, "ablation.variants.ema: expected a "),
    ({"models": ["alexnet"], "variants": {"ema": {"train.ema_momentum": 2.0}}},
     "ema_momentum: 2.0 is out of range"),
    ({"models": ["alexnet"], "seeds": 0}, "ablation.seeds: expected at least 1"),
    ({"models": ["lenet"]}, "ablation.models: unknown model 'lenet'"),
])
def test_a_bad_ablation_is_one_error_naming_the_key(tmp_path, ablation, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        ablation_profile(tmp_path, ablation)


def test_the_shipped_full_profile_declares_a_valid_ablation():
    from ferlib import ablation

    params = load_params("full")
    assert params["ablation"]["models"]
    assert set(ablation.variants(params)) >= {"baseline"}
