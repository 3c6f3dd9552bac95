"""Tests for ferlib.results: loading official-split and cross-validated runs, the
duplicate-aware headline, fold tables and tests, the PrivateTest ledger and the recipe table.

Two tiny models are cross-validated once (2 folds, 1 epoch) on synthetic data and shared by
the tests; hand-made predictions cover the arithmetic.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ferlib import artifacts, results
from ferlib.config import validate
from ferlib.train import train, train_cv
from test_train import TINY_ALEXNET, synthetic_data

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

TINY_VIT = {"patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}


def tiny_params(**top):
    return validate({"seed": 0, "models": ["alexnet", "vit"],
                     "train": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0,
                               "early_stopping_patience": None, "tta": False},
                     "augment": {"flip": False},
                     "model_params": {"alexnet": TINY_ALEXNET, "vit": TINY_VIT}, **top})


@pytest.fixture(scope="module")
def data():
    return synthetic_data(per_split=(12, 4, 4))


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("cv")
    params = tiny_params(cv_folds=2)
    for name in params["models"]:
        train_cv(name, data, params, run_dir, progress=False)
    return run_dir, artifacts.load_results(run_dir, params["models"], cv_folds=2)


@pytest.mark.train
def test_cv_result_is_the_fold_ensemble_with_pooled_validation(cv_run, data):
    _, models = cv_run
    result = models["alexnet"]
    assert len(result.folds) == 2 and result.cv["folds"] == 2
    labels, proba = result.test()
    np.testing.assert_array_equal(labels, data.labels[data.split == "test"])
    fold_probas = [fold.test()[1] for fold in result.folds]
    np.testing.assert_allclose(proba, np.mean(fold_probas, axis=0))
    assert result.metrics["test"]["accuracy"] == pytest.approx(
        float((proba.argmax(1) == labels).mean()))
    # validation = every train+val image once, out of fold
    assert len(result.predictions["val_labels"]) == int((data.split != "test").sum())
    # curves averaged over folds, with the spread
    assert {"loss", "val_accuracy", "loss_sd", "val_accuracy_sd"} <= set(result.history)
    first = [fold.history.loss.iloc[0] for fold in result.folds]
    assert result.history.loss.iloc[0] == pytest.approx(np.mean(first))
    assert result.metrics["privatetest_scorings"] == 1


@pytest.mark.train
def test_fold_table_has_every_fold_then_mean_and_sd(cv_run):
    _, models = cv_run
    table = results.fold_table(models["vit"])
    assert table["fold"].tolist() == ["1", "2", "mean", "sd"]
    values = table["test_accuracy"].to_numpy(float)
    assert values[2] == pytest.approx(values[:2].mean())
    assert values[3] == pytest.approx(values[:2].std(ddof=1))


@pytest.mark.train
def test_cv_tables_compare_models_on_the_same_folds(cv_run):
    _, models = cv_run
    table = results.cv_table(models)
    assert table["model"].tolist() == [models["alexnet"].display_name,
                                       models["vit"].display_name]
    assert " ± " in table["PrivateTest accuracy (mean ± sd)"].iloc[0]
    significance = results.cv_significance(models)
    assert len(significance) == 1
    row = significance.iloc[0]
    a = pd.DataFrame(models["alexnet"].cv["per_fold"])["test_accuracy"]
    b = pd.DataFrame(models["vit"].cv["per_fold"])["test_accuracy"]
    assert row["mean fold difference (PrivateTest accuracy)"] == pytest.approx((a - b).mean())
    assert 0 <= row["McNemar on pooled out-of-fold p"] <= 1


@pytest.mark.train
def test_test_scorings_table_reads_the_ledger(cv_run):
    run_dir, models = cv_run
    table = results.test_scorings_table(models, run_dir)
    assert table["PrivateTest scorings"].tolist() == [1, 1]
    assert table["scored once"].all()


def test_loading_a_missing_cv_run_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cv_metrics.json missing"):
        artifacts.load_cv_result(tmp_path, "alexnet")


@pytest.mark.train
def test_summary_adds_the_accuracy_without_duplicates(tmp_path, data):
    params = tiny_params(models=["alexnet"])
    train("alexnet", data, params, tmp_path, progress=False)
    models = artifacts.load_results(tmp_path, ["alexnet"])
    labels, proba = models["alexnet"].test()
    unseen = np.arange(len(labels)) % 3 != 0
    summary = results.summary_table(models, n_boot=50, seed=0, unseen=unseen)
    expected = float((proba.argmax(1) == labels)[unseen].mean())
    assert summary["accuracy_unseen"].iloc[0] == pytest.approx(expected, abs=1e-4)
    assert summary["unseen_images"].iloc[0] == unseen.sum()
    headline = results.headline(summary)
    assert f"Accuracy without duplicates (n={unseen.sum()})" in headline.columns
    with pytest.raises(ValueError, match="mask of 3 images"):
        results.summary_table(models, n_boot=10, unseen=unseen[:3])
    log = results.epoch_log(models["alexnet"])
    assert list(log.columns) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy",
                                 "learning_rate", "seconds", "images_per_second"]


def test_recipe_experiments_table(tmp_path):
    assert list(results.recipe_experiments(tmp_path / "none.csv").columns) == \
        results.EXPERIMENT_COLUMNS
    file = tmp_path / "experiments.csv"
    pd.DataFrame([{column: 1 for column in results.EXPERIMENT_COLUMNS}]).to_csv(file,
                                                                                  index=False)
    assert len(results.recipe_experiments(file)) == 1
    pd.DataFrame({"profile": ["quick"]}).to_csv(file, index=False)
    with pytest.raises(ValueError, match="missing column"):
        results.recipe_experiments(file)
    shipped = results.recipe_experiments()
    assert set(shipped["profile"]) <= {"quick", "full", "all", "smoke", "paper"}


def _hand_result(name, val_proba, val_labels, test_proba, test_labels):
    return artifacts.ModelResult(
        name=name, directory=Path("."), history=pd.DataFrame(), timing=pd.DataFrame(),
        metrics={"val": {"accuracy": float((val_proba.argmax(1) == val_labels).mean())}},
        settings={}, predictions={"val_proba": val_proba, "val_labels": val_labels,
                                  "test_proba": test_proba, "test_labels": test_labels,
                                  "test_ids": np.arange(len(test_labels))})


def _noisy_proba(labels, strength, rng):
    logits = rng.normal(0, 1, (len(labels), 7))
    logits[np.arange(len(labels)), labels] += strength
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_ensembles_average_probabilities_and_fitted_weights_favour_the_better_model():
    rng = np.random.default_rng(0)
    val_labels, test_labels = rng.integers(0, 7, 600), rng.integers(0, 7, 400)
    good = _hand_result("good", _noisy_proba(val_labels, 3.0, rng), val_labels,
                        _noisy_proba(test_labels, 3.0, rng), test_labels)
    useless = _hand_result("useless", np.full((600, 7), 1 / 7), val_labels,
                           np.full((400, 7), 1 / 7), test_labels)
    models = {"good": good, "useless": useless}
    weights = results.fit_ensemble_weights(models)
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights["good"] > 0.9
    equal = results.ensemble_result(models)
    np.testing.assert_allclose(equal.predictions["test_proba"],
                               (good.predictions["test_proba"] + 1 / 7) / 2)
    both = results.ensembles(models)
    assert set(both) == {"ensemble_equal", "ensemble_fitted"}
    assert both["ensemble_fitted"].metrics["weights"] == weights
    tests = results.ensemble_significance(models, both, n_boot=50)
    assert len(tests) == 2 and set(tests["model_b"]) == {good.display_name}
    assert results.ensembles({"good": good}) == {}


def test_ensemble_refuses_models_scored_on_different_images():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, 50)
    first = _hand_result("a", _noisy_proba(labels, 2, rng), labels,
                         _noisy_proba(labels, 2, rng), labels)
    second = _hand_result("b", _noisy_proba(labels, 2, rng), labels,
                          _noisy_proba(labels, 2, rng), labels)
    second.predictions["test_ids"] = second.predictions["test_ids"][::-1]
    with pytest.raises(ValueError, match="other images"):
        results.ensemble_result({"a": first, "b": second})


def test_distribution_sentence_states_batch_split_and_learning_rate():
    assert results.distribution_sentence({}) == "Trained on one device."
    one = {"distribution": {"mode": "none", "devices": 1, "global_batch_size": 64}}
    assert results.distribution_sentence(one) == "Trained on one device, batch 64."
    parallel = {"distribution": {"mode": "data_parallel", "devices": 4, "global_batch_size": 256,
                                 "per_device_batch_size": 64, "learning_rate": 1e-3}}
    sentence = results.distribution_sentence(parallel)
    assert "over 4 devices" in sentence and "global batch 256 = 4 x 64 per device" in sentence
    assert "1.00e-03 used as given" in sentence and "not scaled" in sentence


def _curve_result(val_accuracy, best_epoch, patience, stopped):
    epochs = np.arange(1, len(val_accuracy) + 1)
    history = pd.DataFrame({"epoch": epochs, "accuracy": np.linspace(0.3, 0.7, len(epochs)),
                            "val_accuracy": val_accuracy})
    return artifacts.ModelResult(
        name="m", directory=Path("."), history=history, timing=pd.DataFrame(),
        metrics={"best_epoch": best_epoch, "stopped_reason": stopped, "train_seconds": 600},
        settings={"train": {"epochs": 40, "early_stopping_patience": patience}}, predictions={})


def test_convergence_needs_patience_epochs_after_the_best():
    """The issue's rule: converged when the best PublicTest epoch is at least ``patience``
    epochs before the last one; a cap or a budget that cuts earlier is 'not converged'."""
    stopped_early = results.convergence(_curve_result(
        [0.40, 0.50, 0.55, 0.54, 0.55, 0.53, 0.54], 3, 4, "early_stopping"))
    assert stopped_early["converged"] and stopped_early["epochs_after_best"] == 4
    assert stopped_early["verdict"].startswith("converged: best epoch 3, then 4 epochs")
    capped = results.convergence(_curve_result(
        [0.40, 0.50, 0.55, 0.54, 0.55, 0.53], 3, 4, "completed"))
    assert not capped["converged"]
    assert "fewer than the patience (4); stopped by completed" in capped["verdict"]
    rising = results.convergence(_curve_result([0.4, 0.5, 0.6], 3, None, "budget"))
    assert not rising["converged"] and rising["patience"] == 3
    summary = pd.DataFrame([{"model": "m", "accuracy": 0.5, "accuracy_ci": "[0.4, 0.6]"}])
    text = results.conclusion(summary, pd.DataFrame(), [capped])
    assert "Not converged when stopped: m" in text
    assert "Not converged" not in results.conclusion(summary, pd.DataFrame(), [stopped_early])


def test_status_table_says_which_finished_models_converged(tmp_path):
    """``python -m ferlib status`` reads state.json files only: epochs of the cap, best epoch,
    epochs since it, the convergence verdict of finished models (the same rule as the
    reports), why they stopped and the time left."""
    from ferlib.config import load_params
    from ferlib.artifacts import progress_table
    from ferlib.runs import write_json

    params = load_params("smoke", overrides={"train": {"epochs": 10,
                                                       "early_stopping_patience": 3}})

    def state(best, done, finished, reason):
        return {"history": [{}] * done, "timing": [{"seconds": 60.0}] * done,
                "best_epoch": best, "best_val_accuracy": 0.5, "finished": finished,
                "stopped_reason": reason}
    for name, value in {"alexnet": state(4, 7, True, "early_stopping"),
                        "resnet50v2": state(10, 10, True, "completed")}.items():
        write_json(tmp_path / "models" / name / "state.json", value)
    table = progress_table(tmp_path, params).set_index("model")
    assert table.loc["alexnet", "converged"] == "yes"
    assert table.loc["alexnet", "state"] == "finished: early stop"
    assert table.loc["alexnet", "since best / patience"] == "3/3"
    assert table.loc["resnet50v2", "converged"] == "no"
    assert table.loc["resnet50v2", "state"] == "finished: epoch cap"
    assert table.loc["vit", "state"] == "not started" and pd.isna(table.loc["vit", "converged"])
    write_json(tmp_path / "models" / "vit" / "state.json", state(2, 3, False, None))
    vit = progress_table(tmp_path, params).set_index("model").loc["vit"]
    assert vit["state"] == "in progress" and pd.isna(vit["converged"])
    assert vit["epochs done"] == "3/10" and vit["left at most (h)"] == round(7 / 60, 2)


@pytest.mark.train
def test_readme_tables_quote_the_compare_outputs(cv_run, tmp_path):
    run_dir, models = cv_run
    params = tiny_params(cv_folds=2)
    with pytest.raises(FileNotFoundError, match="make report PROFILE="):
        results.readme_tables(tmp_path, params)
    summary = results.summary_table({**models, **results.ensembles(models)}, n_boot=20)
    (run_dir / "compare").mkdir(exist_ok=True)
    summary.to_csv(run_dir / "compare" / "summary_full.csv", index=False)
    results.significance_table(models, n_boot=20).to_csv(
        run_dir / "compare" / "significance.csv", index=False)
    text = results.readme_tables(run_dir, params)
    headline, significance = text.strip().split("\n\n")
    rows = headline.splitlines()
    assert rows[0].startswith("| model | accuracy | macro F1 | AUC (OvR) |")
    assert len(rows) == 2 + len(models) + 2  # header, rule, models, two ensembles
    alexnet = next(row for row in rows if row.startswith("| AlexNet"))
    accuracy = summary.set_index("model").loc[models["alexnet"].display_name, "accuracy"]
    assert f"{accuracy:.3f}" in alexnet and "**no** (0 after best" in alexnet
    assert "Ensemble (equal weights)" in headline
    assert significance.splitlines()[2].startswith(f"| {models['alexnet'].display_name} vs")


def test_timing_table_uses_the_median_epoch_so_one_paused_epoch_does_not_dominate():
    result = _curve_result([0.4, 0.5, 0.6, 0.6], 3, 1, "early_stopping")
    result.timing = pd.DataFrame({"epoch": [1, 2, 3, 4], "seconds": [100.0, 110.0, 900.0, 105.0],
                                  "images_per_second": [300.0, 280.0, 30.0, 290.0]})
    row = results.timing_table({"alexnet": result}).iloc[0]
    assert row["seconds_per_epoch (median)"] == 107.5 and row["fastest_epoch_seconds"] == 100.0
    assert row["total_hours"] == round(1215 / 3600, 2) and row["train_images_per_second"] == 285.0


def test_equal_compute_compares_each_model_within_the_least_trained_ones_hours():
    fast = _curve_result([0.40, 0.50, 0.60, 0.55], 3, 1, "early_stopping")
    fast.name = "alexnet"
    fast.timing = pd.DataFrame({"epoch": [1, 2, 3, 4], "seconds": [900.0, 900.0, 5000.0, 900.0],
                                "images_per_second": [1.0] * 4})
    slow = _curve_result([0.30, 0.45, 0.48, 0.52, 0.58, 0.66], 6, 1, "completed")
    slow.name = "vit"
    slow.timing = pd.DataFrame({"epoch": range(1, 7), "seconds": [600.0] * 6,
                                "images_per_second": [1.0] * 6})
    curves = results.compute_curves({"alexnet": fast, "vit": slow})
    # hours: epochs x the median epoch (900 s: the paused 5000 s epoch is left out)
    assert curves[curves.model == fast.display_name].hours.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert curves.best_so_far.tolist()[:4] == [0.40, 0.50, 0.60, 0.60]
    table = results.equal_compute_table(curves).set_index("model")
    assert table["equal compute (hours)"].unique().tolist() == [1.0]  # AlexNet's 4 x 900 s
    vit = table.loc["ViT"]
    assert vit["epochs within it"] == 6 and vit["best PublicTest within it"] == 0.66
    slow.timing["seconds"] = 1200.0  # now 6 x 1200 s = 2 h: within 1 h only 3 epochs
    table = results.equal_compute_table(results.compute_curves(
        {"alexnet": fast, "vit": slow})).set_index("model")
    assert table.loc["ViT", "epochs within it"] == 3
    assert table.loc["ViT", "best PublicTest within it"] == 0.48
    assert table.loc["ViT", "best PublicTest, own compute"] == 0.66
    from ferlib import plots

    assert plots.compute_curves(results.compute_curves({"vit": slow}), 1.0) is not None


def _timed(result, seconds, images=1000):
    epochs = range(1, len(result.history) + 1)
    result.timing = pd.DataFrame({"epoch": epochs, "seconds": seconds,
                                  "train_seconds": [s * 0.9 for s in seconds],
                                  "images_per_second": [images / (s * 0.9) for s in seconds]})
    return result


def test_training_flops_are_three_forwards_per_image_trained_on_and_budgets_are_shared():
    cheap = _timed(_curve_result([0.40, 0.50, 0.60, 0.55], 3, 1, "early_stopping"),
                   [1800.0] * 4)
    cheap.name = "alexnet"
    costly = _timed(_curve_result([0.30, 0.45, 0.58, 0.62, 0.66, 0.67], 6, 1, "completed"),
                    [2400.0] * 6)
    costly.name = "vit"
    curves = results.compute_curves({"alexnet": cheap, "vit": costly},
                                    {"alexnet": 1e9, "vit": 1e10})
    alexnet = curves[curves.model == cheap.display_name]
    # 1,000 images per epoch x 3 x 1e9 forward FLOPs, cumulative
    assert np.allclose(alexnet.flops, [3e12, 6e12, 9e12, 1.2e13])
    assert np.allclose(curves[curves.model == "ViT"].flops.iloc[0], 3e13)
    # at the AlexNet's 1.2e13 FLOPs the ViT has not finished one epoch: no score at all
    flops = results.equal_compute_table(curves, "flops").set_index("model")
    assert flops.loc["ViT", "epochs within it"] == 0
    assert np.isnan(flops.loc["ViT", "best PublicTest within it"])
    # fixed budgets: powers of 2 hours from a quarter of the smallest total (2 h) to the largest
    # (4 h); powers of 10 FLOPs from a tenth of the smallest
    assert results.compute_budgets([2.0, 4.0], "hours") == [0.5, 1.0, 2.0, 4.0]
    assert results.compute_budgets([2e12, 5e14], "flops") == [1e12, 1e13, 1e14]
    hours = results.budget_table(curves, "hours").set_index("model")
    assert list(hours.columns) == ["30 min", "1 h", "2 h", "4 h", "compute used"]
    assert np.isnan(hours.loc["ViT", "30 min"])  # its first epoch took 0.67 h
    assert hours.loc["ViT"][["1 h", "2 h", "4 h"]].tolist() == [0.30, 0.58, 0.67]
    # AlexNet stopped at 2 h: it keeps its best (0.60) at the later budget
    assert hours.loc[cheap.display_name, "4 h"] == 0.60
    assert hours.loc["ViT", "compute used"] == "4.00 h"
    sentence = results.equal_compute_sentence(curves)
    assert sentence.startswith(f"At equal training time (2.00 h, the least-trained model's), "
                               f"**{cheap.display_name}** leads on PublicTest by 2.0 points")
    assert f"ranking is ViT 0.670, {cheap.display_name} 0.600" in sentence
    assert "ViT: no epoch within it" in sentence  # the FLOPs half
    # without FLOPs (another backend) the FLOPs half is left out, and the plot has one panel
    no_flops = results.compute_curves({"alexnet": cheap, "vit": costly})
    assert no_flops.flops.isna().all() and results.equal_compute_table(no_flops, "flops").empty
    assert "FLOPs" not in results.equal_compute_sentence(no_flops)
    from ferlib import plots

    assert len(plots.compute_curves(curves, 2.0, 1.2e13).axes) == 2
    assert len(plots.compute_curves(no_flops, 2.0).axes) == 1


def test_forward_flops_counts_a_tiny_model_built_from_its_settings():
    from ferlib.config import load_params, model_settings

    result = _curve_result([0.4], 1, 1, "completed")
    result.name = "alexnet"
    result.settings = model_settings(load_params("smoke"), "alexnet")
    counted = results.forward_flops({"alexnet": result})
    assert counted["alexnet"] > 1e6
