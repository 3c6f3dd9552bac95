"""Read a run's training artifacts and assemble the study's comparison tables and conclusion.

The compare notebook and the report index call these; they only read artifacts written by
``ferlib.train`` (so models trained elsewhere, e.g. on a GPU box, compare the same way).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ferlib import EMOTIONS, PROJECT_ROOT, metrics, paper
from ferlib.artifacts import (ENSEMBLE_SIGNIFICANCE, SIGNIFICANCE,
                              ModelResult, Run, load_results)
from ferlib.runs import converged_by_curve, read_json

HEADLINE_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auc_macro")
PAPER_COLUMNS = {"accuracy": "accuracy", "precision_macro": "precision",
                 "recall_macro": "recall", "auc_macro": "auc"}


def epoch_log(result: ModelResult) -> pd.DataFrame:
    """The per-epoch log as training printed it: losses, accuracies, learning rate, seconds
    and throughput (shown again when a report is rendered from an existing run)."""
    columns = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"]
    return result.history[columns].merge(
        result.timing[["epoch", "seconds", "images_per_second"]], on="epoch", how="left")


def fold_table(result: ModelResult) -> pd.DataFrame:
    """Cross-validation, one row per fold and mean ± sd rows: epochs, validation (the fold's
    held-out part of train+val) and PrivateTest accuracy, macro F1 and AUC."""
    rows = pd.DataFrame(result.cv["per_fold"])
    keep = ["fold", "epochs_run", "best_epoch", "stopped_reason"] + [
        f"{part}_{metric}" for part in ("val", "test")
        for metric in ("accuracy", "f1_macro", "auc_macro") if f"{part}_{metric}" in rows]
    rows = rows[keep].astype({"fold": str})
    numeric = rows.select_dtypes("number")
    summary = pd.DataFrame([{"fold": "mean", **numeric.mean().to_dict()},
                            {"fold": "sd", **numeric.std().to_dict()}])
    return pd.concat([rows, summary], ignore_index=True)


def cv_table(results: dict[str, ModelResult]) -> pd.DataFrame:
    """Models compared on their folds: mean ± sd over folds of the fold-validation and
    PrivateTest metrics, pooled out-of-fold and k-fold-ensemble PrivateTest accuracy."""
    rows = []
    for result in results.values():
        folds = pd.DataFrame(result.cv["per_fold"])
        row = {"model": result.display_name, "folds": result.cv["folds"]}
        for part, label in (("val", "fold val"), ("test", "PrivateTest")):
            for metric in ("accuracy", "f1_macro", "auc_macro"):
                column = f"{part}_{metric}"
                if column in folds:
                    row[f"{label} {metric} (mean ± sd)"] = (f"{folds[column].mean():.3f} ± "
                                                           f"{folds[column].std():.3f}")
        row["pooled out-of-fold accuracy"] = result.cv["oof"]["accuracy"]
        if "ensemble_test" in result.cv:
            row["k-fold ensemble PrivateTest accuracy"] = result.cv["ensemble_test"]["accuracy"]
        rows.append(row)
    return pd.DataFrame(rows)


def cv_significance(results: dict[str, ModelResult]) -> pd.DataFrame:
    """Every pair of cross-validated models, two ways, both stated in the table: a paired
    t-test over folds of the PrivateTest accuracy (the folds are the same images for every
    model, so fold k pairs with fold k), and McNemar's test on the pooled out-of-fold
    predictions (every train+val image predicted once by a model that did not train on it)."""
    from scipy import stats

    rows = []
    for first, second in itertools.combinations(results.values(), 2):
        if not np.array_equal(first.predictions["val_ids"], second.predictions["val_ids"]):
            raise ValueError(f"{first.name} and {second.name}: out-of-fold predictions cover "
                             f"different images; were they trained on the same folds?")
        a = pd.DataFrame(first.cv["per_fold"])["test_accuracy"].to_numpy()
        b = pd.DataFrame(second.cv["per_fold"])["test_accuracy"].to_numpy()
        t_test = stats.ttest_rel(a, b) if len(a) > 1 else None
        labels = first.predictions["val_labels"]
        test = metrics.mcnemar(labels, first.predictions["val_proba"].argmax(1),
                               second.predictions["val_proba"].argmax(1))
        rows.append({"model_a": first.display_name, "model_b": second.display_name,
                     "mean fold difference (PrivateTest accuracy)": float(np.mean(a - b)),
                     "paired t-test over folds p": (float(t_test.pvalue) if t_test is not None
                                                    and np.isfinite(t_test.pvalue) else None),
                     "pooled out-of-fold difference": float(
                         (first.predictions["val_proba"].argmax(1) == labels).mean()
                         - (second.predictions["val_proba"].argmax(1) == labels).mean()),
                     "McNemar on pooled out-of-fold p": test["p_value"],
                     "McNemar method": test["method"]})
    return pd.DataFrame(rows)


def test_scorings_table(results: dict[str, ModelResult], run_dir) -> pd.DataFrame:
    """How many times each model was scored on PrivateTest, per the run's ledger (replaced
    runs included). The protocol's "scored once" holds only where the count is 1."""
    run = Run(run_dir)
    rows = []
    for name, result in results.items():
        parts = [f"fold{k}" for k in range(1, len(result.folds) + 1)] if result.folds else [""]
        counts = [run.count_test_scorings(name, part) for part in parts]
        rows.append({"model": result.display_name,
                     "PrivateTest scorings": max(counts) if counts else 0,
                     "scored once": all(count == 1 for count in counts)})
    return pd.DataFrame(rows)


def convergence(result: ModelResult) -> dict:
    """Whether a training converged by its own curve, and how far it was from it.

    Converged means the best PublicTest epoch lies at least ``early_stopping_patience`` epochs
    before the last epoch run: the model had that many epochs to improve and did not. A run
    cut by its epoch cap or time budget before that is "not converged", even if its curve
    looks flat. ``patience`` falls back to 3 epochs when the profile has no early stopping.
    """
    history = result.history
    tail = history.tail(3)
    slope = (float(np.polyfit(tail.epoch, tail.val_accuracy, 1)[0]) if len(tail) >= 2
             else float("nan"))
    best_epoch = result.metrics["best_epoch"]
    epochs = len(history)
    patience = result.settings["train"].get("early_stopping_patience") or 3
    after_best = epochs - best_epoch
    converged = converged_by_curve(epochs, best_epoch, patience)
    gap = float(history.accuracy.iloc[-1] - history.val_accuracy.iloc[-1])
    if converged:
        verdict = (f"converged: best epoch {best_epoch}, then {after_best} epochs without a "
                   f"better PublicTest accuracy (patience {patience})")
    else:
        verdict = (f"not converged: best epoch {best_epoch} is {after_best} epoch(s) before the "
                   f"last ({epochs}), fewer than the patience ({patience}); stopped by "
                   f"{result.metrics['stopped_reason'].replace('_', ' ')}")
    return {"model": result.display_name, "epochs_run": epochs, "best_epoch": best_epoch,
            "epochs_after_best": after_best, "patience": patience, "converged": converged,
            "stopped_reason": result.metrics["stopped_reason"],
            "planned_epochs": result.settings["train"]["epochs"],
            "train_minutes": round(result.metrics["train_seconds"] / 60, 1),
            "final_val_accuracy": round(float(history.val_accuracy.iloc[-1]), 4),
            "val_accuracy_slope_last3": round(slope, 4),
            "train_minus_val_accuracy": round(gap, 4),
            "verdict": verdict}


def summary_table(results: dict[str, ModelResult], n_boot: int = 1000, seed: int = 0,
                  tta: bool = False, unseen: np.ndarray | None = None) -> pd.DataFrame:
    """PrivateTest metrics with 95% bootstrap CIs per model, beside the paper's Table 4.

    ``unseen``: a boolean mask over the PrivateTest images (in prediction order), True for
    images that occur in neither Training nor PublicTest (``ferlib.data.seen_elsewhere``). It
    adds the accuracy on those images alone (``accuracy_unseen``, with its CI): how much the
    official score owes to memorised duplicates.
    """
    claims = paper.table4()
    rows = []
    for name, result in results.items():
        labels, proba = result.test(tta)
        intervals = metrics.bootstrap_ci(labels, proba, n_boot=n_boot, seed=seed,
                                         metric_names=HEADLINE_METRICS).set_index("metric")
        row = {"model": result.display_name}
        if unseen is not None:
            unseen = np.asarray(unseen, bool)
            if len(unseen) != len(labels):
                raise ValueError(f"unseen: mask of {len(unseen)} images for {len(labels)} "
                                 f"PrivateTest predictions of {name}")
            clean = metrics.bootstrap_ci(labels[unseen], proba[unseen], n_boot=n_boot,
                                         seed=seed, metric_names=("accuracy",)).iloc[0]
            row.update(accuracy_unseen=round(float(clean["value"]), 4),
                       accuracy_unseen_low=float(clean["low"]),
                       accuracy_unseen_high=float(clean["high"]),
                       accuracy_unseen_ci=f"[{clean['low']:.3f}, {clean['high']:.3f}]",
                       unseen_images=int(unseen.sum()))
        for metric in HEADLINE_METRICS:
            value, low, high = intervals.loc[metric, ["value", "low", "high"]]
            row[metric] = round(float(value), 4)
            row[f"{metric}_low"], row[f"{metric}_high"] = float(low), float(high)
            row[f"{metric}_ci"] = f"[{low:.3f}, {high:.3f}]"
            if metric in PAPER_COLUMNS and name in claims.index:
                row[f"paper_{PAPER_COLUMNS[metric]}"] = claims.loc[name, PAPER_COLUMNS[metric]]
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_bars(summary: pd.DataFrame) -> pd.DataFrame:
    """Our metrics with CI bounds, indexed by model key, in the paper's Table 4 columns
    (the layout ``ferlib.plots.metric_comparison`` takes)."""
    keys = {name: key for key, name in paper.MODEL_DISPLAY_NAMES.items()}
    measured = summary.set_index(summary["model"].map(lambda name: keys.get(name, name)))
    columns = {}
    for ours, theirs in PAPER_COLUMNS.items():
        for suffix in ("", "_low", "_high"):
            columns[f"{theirs}{suffix}"] = measured[f"{ours}{suffix}"]
    return pd.DataFrame(columns)


def headline(summary: pd.DataFrame) -> pd.DataFrame:
    """Compact display: 'value [low, high]' per metric, and the paper's claim next to it."""
    out = pd.DataFrame({"model": summary["model"]})
    labels = {"accuracy": "Accuracy", "precision_macro": "Precision (macro)",
              "recall_macro": "Recall (macro)", "f1_macro": "F1 (macro)",
              "auc_macro": "AUC (OvR macro)"}
    for metric, label in labels.items():
        out[label] = [f"{v:.3f} {ci}" for v, ci in zip(summary[metric], summary[f"{metric}_ci"])]
        paper_column = f"paper_{PAPER_COLUMNS.get(metric, '')}"
        if paper_column in summary:
            out[f"paper {label.split(' ')[0]}"] = summary[paper_column]
    if "accuracy_unseen" in summary:
        count = int(summary["unseen_images"].iloc[0])
        out[f"Accuracy without duplicates (n={count:,})"] = [
            f"{v:.3f} {ci}" for v, ci in zip(summary["accuracy_unseen"],
                                             summary["accuracy_unseen_ci"])]
    return out


def significance_table(results: dict[str, ModelResult], n_boot: int = 1000,
                       seed: int = 0) -> pd.DataFrame:
    """McNemar's test and a paired bootstrap CI of the accuracy difference, every pair."""
    rows = []
    pairs = list(itertools.combinations(results.values(), 2))
    for first, second in pairs:
        labels, proba_first = first.test()
        _, proba_second = second.test()
        pred_first, pred_second = proba_first.argmax(1), proba_second.argmax(1)
        test = metrics.mcnemar(labels, pred_first, pred_second)
        diff = metrics.paired_bootstrap_accuracy_diff(labels, pred_first, pred_second,
                                                      n_boot=n_boot, seed=seed)
        rows.append({"model_a": first.display_name, "model_b": second.display_name,
                     "accuracy_a": float((pred_first == labels).mean()),
                     "accuracy_b": float((pred_second == labels).mean()),
                     "difference": diff["diff"], "diff_low": diff["low"],
                     "diff_high": diff["high"], "a_right_b_wrong": test["b"],
                     "a_wrong_b_right": test["c"], "mcnemar_p": test["p_value"],
                     "test": test["method"]})
    table = pd.DataFrame(rows)
    if len(table):
        # Holm correction over the pairs: we test several differences on one test set.
        order = np.argsort(table.mcnemar_p.values)
        adjusted = np.empty(len(table))
        running = 0.0
        for rank, index in enumerate(order):
            running = max(running, min(1.0, (len(table) - rank) * table.mcnemar_p.values[index]))
            adjusted[index] = running
        table["p_holm"] = adjusted
        table["significant_at_0.05"] = table.p_holm < 0.05
    return table


def tta_table(results: dict[str, ModelResult]) -> pd.DataFrame:
    """PrivateTest accuracy and macro F1 without and with horizontal-flip TTA."""
    rows = []
    for result in results.values():
        row = {"model": result.display_name}
        for label, tta in (("plain", False), ("flip TTA", True)):
            if tta and "test_proba_tta" not in result.predictions:
                continue
            values = metrics.classification_metrics(*result.test(tta))
            row[f"accuracy ({label})"] = round(values["accuracy"], 4)
            row[f"F1 macro ({label})"] = round(values["f1_macro"], 4)
        rows.append(row)
    return pd.DataFrame(rows)


def timing_table(results: dict[str, ModelResult]) -> pd.DataFrame:
    """Seconds per epoch and training throughput per model, beside the paper's seconds.

    The median epoch, and the fastest, describe the machine; the mean would let one epoch that
    waited (a paused or heavily shared machine) stand for all of them. Total hours are what
    the training took, waits included."""
    rows = []
    for name, result in results.items():
        paper_seconds = (paper.paper_epochs(name).seconds_per_epoch.mean()
                         if name in ("vit", "resnet50v2") else np.nan)
        rows.append({"model": result.display_name, "epochs": len(result.timing),
                     "seconds_per_epoch (median)": round(result.timing.seconds.median(), 1),
                     "fastest_epoch_seconds": round(result.timing.seconds.min(), 1),
                     "total_hours": round(result.timing.seconds.sum() / 3600, 2),
                     "train_images_per_second": round(result.timing.images_per_second.median(),
                                                      1),
                     "parameters": result.metrics.get("parameters"),
                     "paper_seconds_per_epoch (A100)": round(paper_seconds, 1)})
    return pd.DataFrame(rows)


# Training FLOPs per image: the forward pass and a backward pass of about twice its cost
# (the usual 3x rule of thumb, Kaplan et al. 2020). Validation passes are not counted.
TRAIN_FLOPS_PER_FORWARD = 3


def forward_flops(results: dict[str, ModelResult]) -> dict[str, float]:
    """Forward FLOPs per image of each model, counted by TensorFlow's graph profiler on a model
    built from its ``settings.json`` (``ferlib.models.count_flops``); a model it cannot count
    (no TensorFlow, another backend) is left out."""
    from ferlib.models import build_model, count_flops

    counted = {}
    for name, result in results.items():
        settings = result.settings
        flops = count_flops(build_model(settings["model"], **settings["model_params"])) \
            if settings else None
        if flops:
            counted[name] = float(flops)
    return counted


def compute_curves(results: dict[str, ModelResult],
                   flops: dict[str, float] | None = None) -> pd.DataFrame:
    """PublicTest accuracy against training compute, per model and epoch: ``hours`` is the
    epoch number times the model's median epoch seconds on this machine (waits of a shared
    machine left out); ``flops`` the cumulative training FLOPs (``flops[name]`` forward FLOPs
    per image x :data:`TRAIN_FLOPS_PER_FORWARD` x the images trained on, NaN where not
    counted); ``best_so_far`` the best PublicTest accuracy up to that epoch (what early
    stopping would keep). Long format: model, epoch, hours, flops, val_accuracy, best_so_far."""
    frames = []
    for name, result in results.items():
        history = result.history[["epoch", "val_accuracy"]].copy()
        timing = result.timing
        median = float(timing.seconds.median()) if len(timing) else np.nan
        history["hours"] = history.epoch * median / 3600
        per_image = (flops or {}).get(name, np.nan) * TRAIN_FLOPS_PER_FORWARD
        if {"train_seconds", "images_per_second"} <= set(timing.columns) and len(timing):
            images = (timing.set_index("epoch").train_seconds
                      * timing.set_index("epoch").images_per_second).round()
            history["flops"] = history.epoch.map(images.cumsum()).to_numpy() * per_image
        else:
            history["flops"] = np.nan
        history["best_so_far"] = history.val_accuracy.cummax()
        history.insert(0, "model", result.display_name)
        frames.append(history)
    columns = ["model", "epoch", "hours", "flops", "val_accuracy", "best_so_far"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(
        columns=columns)


def equal_compute_table(curves: pd.DataFrame, axis: str = "hours") -> pd.DataFrame:
    """Each model's best PublicTest accuracy within the compute of the model that trained
    least (:func:`compute_curves`; ``axis`` "hours" or "flops"), beside its best with all of
    its own compute: the comparison at equal training compute. PublicTest only: PrivateTest
    chooses nothing."""
    unit = {"hours": "hours", "flops": "FLOPs"}[axis]
    curves = curves.dropna(subset=[axis]) if axis in curves else curves.iloc[:0]
    if curves.empty:
        return pd.DataFrame()
    totals = curves.groupby("model", sort=False)[axis].max()
    budget = float(totals.min())
    rows = []
    for model, curve in curves.groupby("model", sort=False):
        within = curve[curve[axis] <= budget * (1 + 1e-9)]
        rows.append({"model": model, f"equal compute ({unit})": budget,
                     "epochs within it": int(within.epoch.max()) if len(within) else 0,
                     "best PublicTest within it": within.best_so_far.max() if len(within)
                     else np.nan,
                     f"own compute ({unit})": float(totals[model]),
                     "best PublicTest, own compute": curve.best_so_far.max()})
    return pd.DataFrame(rows)


def compute_budgets(totals, axis: str) -> list[float]:
    """Round budgets that span the models' compute: powers of 2 hours, or powers of 10
    FLOPs, from about a quarter (hours) or a tenth (FLOPs) of the smallest model's compute up
    to the largest's, at most five (the largest kept)."""
    totals = [float(t) for t in totals if np.isfinite(t) and t > 0]
    if not totals:
        return []
    base, reach = (2.0, 4.0) if axis == "hours" else (10.0, 10.0)
    low = int(np.ceil(np.log(min(totals) / reach) / np.log(base) - 1e-9))
    high = int(np.floor(np.log(max(totals)) / np.log(base) + 1e-9))
    return [float(base ** k) for k in range(low, high + 1)][-5:]


def budget_table(curves: pd.DataFrame, axis: str = "hours",
                 budgets: list[float] | None = None) -> pd.DataFrame:
    """Each model's best PublicTest accuracy within each of the same fixed budgets (hours or
    FLOPs, :func:`compute_budgets` unless given): one row per model, one column per budget.
    A model that stopped (early stopping) before a budget keeps the best it reached; a model
    whose first epoch already exceeds a budget has none (NaN). ``compute used`` says how much
    each model trained."""
    curves = curves.dropna(subset=[axis]) if axis in curves else curves.iloc[:0]
    if curves.empty:
        return pd.DataFrame()
    totals = curves.groupby("model", sort=False)[axis].max()
    budgets = compute_budgets(totals, axis) if budgets is None else budgets
    def label(budget):
        if axis == "flops":
            return f"{budget:.0e} FLOPs"
        return f"{budget:g} h" if budget >= 1 else f"{budget * 60:.3g} min"

    rows = []
    for model, curve in curves.groupby("model", sort=False):
        row = {"model": model}
        for budget in budgets:
            within = curve[curve[axis] <= budget * (1 + 1e-9)]
            row[label(budget)] = within.best_so_far.max() if len(within) else np.nan
        row["compute used"] = (f"{totals[model]:.2f} h" if axis == "hours"
                               else f"{totals[model]:.2e} FLOPs")
        rows.append(row)
    return pd.DataFrame(rows)


def equal_compute_sentence(curves: pd.DataFrame) -> str:
    """Which architecture wins at equal compute (the least-trained model's hours, and FLOPs
    where counted), and whether that differs from the ranking with each model's own compute.
    Generated from PublicTest curves; PrivateTest chooses nothing."""
    sentences = []
    for axis, unit in (("hours", "h"), ("flops", "FLOPs")):
        table = equal_compute_table(curves, axis)
        if len(table) < 2:
            continue
        budget = table.iloc[0, 1]
        at_equal = table.sort_values("best PublicTest within it", ascending=False)
        at_own = table.sort_values("best PublicTest, own compute", ascending=False)
        amount = f"{budget:.2f} h" if axis == "hours" else f"{budget:.2e} FLOPs"
        order = ", ".join(f"{row.model} {row['best PublicTest within it']:.3f}"
                          if pd.notna(row["best PublicTest within it"]) else
                          f"{row.model}: no epoch within it" for _, row in at_equal.iterrows())
        same = list(at_equal.model) == list(at_own.model)
        verdict = ("the same ranking as with each model's own compute" if same else
                   "with each model's own compute the ranking is " + ", ".join(
                       f"{row.model} {row['best PublicTest, own compute']:.3f}"
                       for _, row in at_own.iterrows()))
        # a model with no epoch within the budget counts as behind by the leader's whole score
        scores = at_equal["best PublicTest within it"].fillna(0.0)
        lead = scores.iloc[0] - scores.iloc[1]
        sentences.append(f"At equal {'training time' if axis == 'hours' else 'training FLOPs'}"
                         f" ({amount}, the least-trained model's), **{at_equal.iloc[0].model}**"
                         f" leads on PublicTest by {100 * lead:.1f} points ({order}): "
                         f"{verdict}.")
    return " ".join(sentences) or "Fewer than two models to compare at equal compute."


def confusion_percent(result: ModelResult) -> pd.DataFrame:
    """Our PrivateTest confusion matrix in % of the true class, rows/cols in EMOTIONS order."""
    labels, proba = result.test()
    matrix = metrics.confusion(labels, proba.argmax(1), normalize=True)
    return pd.DataFrame(matrix, index=list(EMOTIONS), columns=list(EMOTIONS))


def conclusion(summary: pd.DataFrame, significance: pd.DataFrame,
               convergence_rows: list[dict], peer_accuracy: float | None = None) -> str:
    """A short, generated Markdown conclusion from the measured tables (no typed numbers)."""
    best = summary.sort_values("accuracy", ascending=False).iloc[0]
    lines = [f"- Best PrivateTest accuracy: **{best['model']}** at {best['accuracy']:.3f} "
             f"(95% CI {best['accuracy_ci']})."]
    if "accuracy_unseen" in best:
        lines.append(f"- Without the PrivateTest images that also occur in Training or "
                     f"PublicTest ({int(best['unseen_images']):,} left), {best['model']} scores "
                     f"{best['accuracy_unseen']:.3f} (95% CI {best['accuracy_unseen_ci']}): "
                     f"{best['accuracy'] - best['accuracy_unseen']:+.3f} of the official score "
                     f"comes with the duplicates.")
    for _, row in summary.iterrows():
        if "paper_accuracy" in row and pd.notna(row.get("paper_accuracy")):
            gap = row["accuracy"] - row["paper_accuracy"]
            lines.append(f"- {row['model']}: {row['accuracy']:.3f} measured vs "
                         f"{row['paper_accuracy']:.2f} claimed ({gap:+.3f}); AUC "
                         f"{row['auc_macro']:.3f} vs {row.get('paper_auc', float('nan')):.2f}.")
    for _, row in significance.iterrows():
        verdict = ("a statistically significant difference" if row["significant_at_0.05"]
                   else "no significant difference")
        lines.append(f"- {row['model_a']} vs {row['model_b']}: accuracy difference "
                     f"{row['difference']:+.3f} (95% CI [{row['diff_low']:+.3f}, "
                     f"{row['diff_high']:+.3f}]), McNemar p = {row['mcnemar_p']:.2g} "
                     f"(Holm {row['p_holm']:.2g}): {verdict}.")
    not_converged = [row["model"] for row in convergence_rows if not row["converged"]]
    if not_converged:
        lines.append(f"- Not converged when stopped: {', '.join(not_converged)}; their numbers "
                     f"are lower bounds on what the architectures reach with a larger budget.")
    if peer_accuracy is not None:
        lines.append(f"- Ready-made peer (`fer` package mini-Xception): {peer_accuracy:.3f} on "
                     f"PrivateTest; best model {'beats' if best['accuracy'] > peer_accuracy else 'does not beat'} it.")
    return "\n".join(lines)


PEER_FILE = PROJECT_ROOT / "benchmarks" / "peer_fer.json"


def peer_result(num_test_images: int, path: Path = PEER_FILE) -> dict | None:
    """The ready-made peer's PrivateTest metrics (``benchmarks/peer_fer.py``), if measured on
    a test set of the same size as ours (so a subsampled run never shows it)."""
    peer = read_json(path) if Path(path).exists() else None
    return peer if peer and peer.get("num_images") == num_test_images else None


def peer_row(peer: dict) -> pd.DataFrame:
    """The peer as one row in the layout of :func:`headline`."""
    row = {"model": f"peer: {peer['name']}"}
    for metric, label in (("accuracy", "Accuracy"), ("precision_macro", "Precision (macro)"),
                          ("recall_macro", "Recall (macro)"), ("f1_macro", "F1 (macro)"),
                          ("auc_macro", "AUC (OvR macro)")):
        value = peer["metrics"][metric]
        row[label] = f"{value['value']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"
    return pd.DataFrame([row])


def differences_from_paper(params: dict, models: dict[str, ModelResult]) -> str:
    """Markdown list of where this run's set-up differs from the paper's, from the settings."""
    lines = []
    weights = {name: r.settings["model_params"].get("weights") for name, r in models.items()}
    from_scratch = [models[n].display_name for n, w in weights.items() if not w]
    if from_scratch:
        lines.append(f"- **Trained from scratch**: {', '.join(from_scratch)} (the paper fine-tunes "
                     f"ImageNet weights; none can be downloaded on this offline machine).")
    for name, result in models.items():
        train, model = result.settings["train"], result.settings["model_params"]
        size = model.get("input_size", 48)
        extra = ""
        if name == "vit":
            extra = (f", ViT {model['num_layers']} layers x {model['hidden_dim']} dims, "
                     f"{model['num_heads']} heads, patch {model['patch_size']} "
                     f"({(size // model['patch_size']) ** 2 + 1} tokens; paper: 12 x 768, 8 heads)")
        budget = f"{train['epochs']} epochs planned" + (
            f", safety stop after {train['budget_minutes']:g} min" if train["budget_minutes"]
            else "")
        lines.append(f"- {result.display_name}: input {size}x{size}{extra}; {train['optimizer']} "
                     f"lr {train['learning_rate']:g}, batch {train['batch_size']}, {budget}; "
                     f"ran {len(result.history)} epochs ({result.metrics['stopped_reason']}), "
                     f"{result.parameters_text}.")
    from ferlib.runs import cpu_name

    here = f"not recorded; this report was rendered on {cpu_name()}, {os.cpu_count()} cores"
    machines = sorted({r.metrics.get("machine", here) for r in models.values()})
    lines.append(f"- Hardware: {'; '.join(machines)} vs the paper's NVIDIA A100.")
    lines.append("- Protocol: official split; selection and early stopping on PublicTest, "
                 "PrivateTest scored once" + (f"; {params['cv_folds']}-fold CV" if
                                              params["cv_folds"] else
                                              " (the paper used stratified 5-fold CV)") + ".")
    return "\n".join(lines)


EXPERIMENTS_FILE = PROJECT_ROOT / "params" / "experiments.csv"
EXPERIMENT_COLUMNS = ["profile", "model", "what was tried", "epochs", "PublicTest accuracy",
                      "kept", "note"]


def recipe_experiments(path: Path = EXPERIMENTS_FILE) -> pd.DataFrame:
    """The short recipe experiments behind the profiles (``params/experiments.csv``): what
    was tried, for how many epochs, the PublicTest accuracy reached, and whether it was kept."""
    if not Path(path).exists():
        return pd.DataFrame(columns=EXPERIMENT_COLUMNS)
    frame = pd.read_csv(path)
    missing = [column for column in EXPERIMENT_COLUMNS if column not in frame]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {EXPERIMENT_COLUMNS}")
    return frame[EXPERIMENT_COLUMNS]


def calibration_table(results: dict[str, ModelResult], n_boot: int = 1000, seed: int = 0,
                      bins: int = 15) -> pd.DataFrame:
    """PrivateTest calibration per model before and after temperature scaling on PublicTest.

    A model trained on the official split is read from (or, when missing or stale, written
    to) ``calibration.json`` in its folder (``ferlib.calibration.calibrate_model_dir``). A
    cross-validated model is calibrated on the fly: the temperature is fitted on its pooled
    out-of-fold predictions and applied to the fold ensemble's PrivateTest probabilities.

    Parameters
    ----------
    results : dict of str to ModelResult
        From :func:`load_results`.
    n_boot : int
        Bootstrap resamples for the ECE intervals.
    seed : int
        Seed of the bootstrap.
    bins : int
        Equal-width confidence bins of the ECE.

    Returns
    -------
    pandas.DataFrame
        One row per model: model, temperature, accuracy (a temperature does not change it),
        ece_before / ece_after with ``_low``, ``_high`` and ``_ci`` ("[low, high]"),
        classwise_ece, brier and nll before and after, evaluated_on.
    """
    from ferlib.calibration import calibrate_model_dir, calibration_report

    rows = []
    for result in results.values():
        if result.folds is None:
            report = calibrate_model_dir(result.directory, bins=bins, n_boot=n_boot, seed=seed)
        else:
            predictions = result.predictions
            report = calibration_report(predictions["val_labels"], predictions["val_proba"],
                                        predictions.get("test_labels"),
                                        predictions.get("test_proba"), bins=bins,
                                        n_boot=n_boot, seed=seed)
        before, after = report["before"], report["after"]
        row = {"model": result.display_name, "temperature": round(report["temperature"], 3),
               "accuracy": round(before["accuracy"], 4)}
        for stage, values in (("before", before), ("after", after)):
            row[f"ece_{stage}"] = round(values["ece"], 4)
            row[f"ece_{stage}_low"], row[f"ece_{stage}_high"] = values["ece_low"], \
                values["ece_high"]
            row[f"ece_{stage}_ci"] = f"[{values['ece_low']:.3f}, {values['ece_high']:.3f}]"
        for metric in ("classwise_ece", "brier", "nll"):
            for stage, values in (("before", before), ("after", after)):
                row[f"{metric}_{stage}"] = round(values[metric], 4)
        row["evaluated_on"] = report["evaluated_on"]
        rows.append(row)
    return pd.DataFrame(rows)


def calibration_headline(table: pd.DataFrame) -> pd.DataFrame:
    """The calibration table as displayed: ECE with its CI, Brier and NLL, before and after
    temperature scaling, and the temperature (accuracy is the same before and after)."""
    return pd.DataFrame({
        "model": table["model"], "temperature": table["temperature"],
        "accuracy": table["accuracy"],
        "ECE before [95% CI]": [f"{v:.3f} {ci}" for v, ci in zip(table.ece_before,
                                                                  table.ece_before_ci)],
        "ECE after [95% CI]": [f"{v:.3f} {ci}" for v, ci in zip(table.ece_after,
                                                                 table.ece_after_ci)],
        "classwise ECE before / after": [f"{a:.3f} / {b:.3f}" for a, b in zip(
            table.classwise_ece_before, table.classwise_ece_after)],
        "Brier before / after": [f"{a:.3f} / {b:.3f}" for a, b in zip(table.brier_before,
                                                                      table.brier_after)],
        "NLL before / after": [f"{a:.3f} / {b:.3f}" for a, b in zip(table.nll_before,
                                                                    table.nll_after)]})


def reliability_curves(result: ModelResult, temperature: float, bins: int = 15) -> dict:
    """PrivateTest reliability bins before and after temperature scaling (for
    ``ferlib.plots.reliability_diagram``)."""
    labels, proba = result.test()
    return {"before": metrics.reliability_bins(labels, proba, bins),
            f"after (T = {temperature:.2f})": metrics.reliability_bins(
                labels, metrics.apply_temperature(proba, temperature), bins)}


def saliency_source(result: ModelResult):
    """(the trained Keras model whose saliency a report shows, its PrivateTest labels and
    probabilities, a note): the model itself, or fold 1's model for a cross-validated one."""
    from ferlib.inference import load_model

    source = result.folds[0] if result.folds else result
    note = " (fold 1's model; the k-fold ensemble has no single network)" if result.folds else ""
    labels, proba = source.test()
    return load_model(source.model_file), labels, proba, note


SANITY_COLUMNS = ("spearman", "constant_maps", "images", "method", "passes")


def saliency_checks(models: dict[str, ModelResult], sources: dict, images) -> pd.DataFrame:
    """The model-randomisation sanity check (:func:`ferlib.explain.randomization_check`) of
    each model's saliency on the same ``images``, one row per model.

    ``sources`` maps each model to its :func:`saliency_source` (the network already loaded).
    Each check is also written to ``saliency_check.json`` in the folder of the network it ran
    on (fold 1's under cross-validation), where the model card reads it."""
    from ferlib import explain
    from ferlib.artifacts import ModelRun
    from ferlib.runs import write_json

    rows = []
    for name, result in models.items():
        check = explain.randomization_check(sources[name][0], images)
        source = result.folds[0] if result.folds else result
        write_json(ModelRun(source.directory).saliency_check, check)
        rows.append({"model": result.display_name,
                     **{key: check[key] for key in SANITY_COLUMNS}})
    return pd.DataFrame(rows)


def update_model_cards(models: dict[str, ModelResult]) -> list[Path]:
    """Write each model's ``MODEL_CARD.md`` again (each fold's under cross-validation).

    Training wrote the card before ``04_compare`` measured more; call this once the page has
    saved its summary (the accuracy without duplicates) and :func:`saliency_checks`. Returns
    the cards' paths."""
    from ferlib.card import write_model_card

    return [write_model_card(folder.directory)
            for result in models.values() for folder in (result.folds or [result])]


def fit_ensemble_weights(results: dict[str, ModelResult]) -> dict[str, float]:
    """Non-negative weights summing to 1 that minimise the ensemble's PublicTest NLL (the
    mean of the models' softmax probabilities, weighted). PrivateTest is never looked at."""
    from scipy.optimize import minimize

    names = list(results)
    labels = results[names[0]].predictions["val_labels"]
    for name in names[1:]:
        if not np.array_equal(results[name].predictions["val_labels"], labels):
            raise ValueError(f"ensemble: {name} was validated on other images than "
                             f"{names[0]}; an ensemble needs the same PublicTest predictions")
    stacked = np.stack([results[name].predictions["val_proba"] for name in names])
    picked = stacked[:, np.arange(len(labels)), labels]  # (models, images)

    def nll(logits):
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        return -np.mean(np.log(np.clip(weights @ picked, 1e-12, 1)))

    best = minimize(nll, np.zeros(len(names)), method="Nelder-Mead",
                    options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 2000})
    weights = np.exp(best.x - best.x.max())
    return dict(zip(names, (weights / weights.sum()).tolist()))


def ensemble_result(results: dict[str, ModelResult], weights: dict[str, float] | None = None,
                    name: str = "ensemble") -> ModelResult:
    """The ensemble of trained models as one result: the (weighted) mean of their softmax
    probabilities on PublicTest and PrivateTest. ``weights`` None = equal weights."""
    names = list(results)
    weights = weights or {model: 1 / len(names) for model in names}
    first = results[names[0]]
    for model in names[1:]:
        if not np.array_equal(results[model].predictions["test_ids"],
                              first.predictions["test_ids"]):
            raise ValueError(f"ensemble: {model} was tested on other images than {names[0]}")

    def mix(key):
        return sum(weights[model] * results[model].predictions[key] for model in names)

    predictions = {"val_proba": mix("val_proba"), "val_labels": first.predictions["val_labels"],
                   "test_proba": mix("test_proba"),
                   "test_labels": first.predictions["test_labels"],
                   "test_ids": first.predictions["test_ids"]}
    members = " + ".join(f"{results[m].display_name} ({weights[m]:.2f})" for m in names)
    scores = {"model": name, "members": members, "weights": weights,
              "val": metrics.classification_metrics(predictions["val_labels"],
                                                    predictions["val_proba"]),
              "test": metrics.classification_metrics(predictions["test_labels"],
                                                     predictions["test_proba"])}
    empty = pd.DataFrame()
    return ModelResult(name=name, directory=first.directory.parent, history=empty,
                       timing=empty, metrics=scores, settings={}, predictions=predictions)


def ensembles(results: dict[str, ModelResult]) -> dict[str, ModelResult]:
    """The study's two ensembles of its trained models: equal weights, and weights fitted on
    PublicTest (:func:`fit_ensemble_weights`). Empty for fewer than two models."""
    if len(results) < 2:
        return {}
    fitted = fit_ensemble_weights(results)
    return {"ensemble_equal": ensemble_result(results, name="Ensemble (equal weights)"),
            "ensemble_fitted": ensemble_result(results, fitted,
                                               name="Ensemble (weights fitted on PublicTest)")}


def ensemble_significance(results: dict[str, ModelResult], ensemble_results: dict,
                          n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Each ensemble against the best single model (by PublicTest accuracy, so PrivateTest
    chooses nothing): McNemar and the paired bootstrap CI of the accuracy difference."""
    best = max(results.values(), key=lambda result: result.metrics["val"]["accuracy"])
    rows = [significance_table({"ensemble": ensemble, "best": best}, n_boot=n_boot,
                               seed=seed).iloc[0] for ensemble in ensemble_results.values()]
    table = pd.DataFrame(rows).reset_index(drop=True)
    return table.drop(columns=["p_holm", "significant_at_0.05"], errors="ignore").assign(
        significant_at_0_05=lambda frame: frame.mcnemar_p < 0.05)


def distribution_sentence(metrics: dict) -> str:
    """How a model was trained across devices, from its ``metrics.json``, for the reports."""
    setup = metrics.get("distribution") or {"mode": "none", "devices": 1}
    if setup["mode"] != "data_parallel":
        batch = setup.get("global_batch_size")
        return "Trained on one device" + (f", batch {batch}." if batch else ".")
    return (f"Data-parallel over {setup['devices']} devices (keras.distribution.DataParallel): "
            f"global batch {setup['global_batch_size']} = {setup['devices']} x "
            f"{setup['per_device_batch_size']} per device; learning rate "
            f"{setup['learning_rate']:.2e} used as given for the global batch (not scaled); "
            f"each epoch leaves out its last incomplete batch.")


def readme_tables(run_dir, params: dict) -> str:
    """The README's headline and significance tables (Markdown) for a rendered run.

    Reads what ``04_compare`` wrote (``compare/summary_full.csv``, ``significance.csv``,
    ``ensemble_significance.csv``) and each model's training files, so the README quotes the
    report's numbers instead of retyping them: ``python -m ferlib results --profile full``.
    """
    compare = Run(run_dir).compare
    path = Run(run_dir).compare_summary_full
    if not path.exists():
        raise FileNotFoundError(f"{path}: no compare tables yet; render the run first "
                                f"(make report PROFILE={params['profile']})")
    summary = pd.read_csv(path).set_index("model")
    models = load_results(run_dir, params["models"], cv_folds=params["cv_folds"])

    def cell(row, metric, bold=False):
        value = f"{row[metric]:.3f}"
        return f"{f'**{value}**' if bold else value} {row[f'{metric}_ci']}"

    unseen = "accuracy_unseen" in summary
    header = ["model", "accuracy", "macro F1", "AUC (OvR)"]
    header += ["accuracy without duplicates"] if unseen else []
    header += ["paper: acc / AUC", "epochs (best)", "hours", "converged?"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = summary["accuracy"].idxmax()
    named = {result.display_name for result in models.values()}
    for name, result in models.items():
        row = summary.loc[result.display_name]
        state = convergence(result)
        claim = (f"{row['paper_accuracy']:.2f} / {row['paper_auc']:.2f}"
                 if pd.notna(row.get("paper_accuracy")) else "–")
        verdict = (f"yes ({state['epochs_after_best']} after best)" if state["converged"] else
                   f"**no** ({state['epochs_after_best']} after best, patience "
                   f"{state['patience']})")
        cells = [result.display_name, cell(row, "accuracy", result.display_name == best),
                 cell(row, "f1_macro"), cell(row, "auc_macro")]
        cells += [cell(row, "accuracy_unseen")] if unseen else []
        cells += [claim, f"{state['epochs_run']} ({state['best_epoch']})",
                  f"{result.metrics['train_seconds'] / 3600:.2f}", verdict]
        lines.append("| " + " | ".join(cells) + " |")
    for name, row in summary.iterrows():
        if name in named:
            continue
        cells = [name, cell(row, "accuracy", name == best), cell(row, "f1_macro"),
                 cell(row, "auc_macro")]
        cells += [cell(row, "accuracy_unseen")] if unseen else []
        lines.append("| " + " | ".join(cells + ["–", "–", "–", "–"]) + " |")
    first = next(iter(models.values()))
    peer = peer_result(len(first.test()[0]))
    if peer:
        scores = peer["metrics"]
        cells = [f"peer: {peer['name']}"] + [
            f"{scores[m]['value']:.3f} [{scores[m]['low']:.3f}, {scores[m]['high']:.3f}]"
            for m in ("accuracy", "f1_macro", "auc_macro")]
        cells += ["–"] if unseen else []
        lines.append("| " + " | ".join(cells + ["–", "pretrained", "–", "–"]) + " |")

    out = ["\n".join(lines)]
    rows = []
    for file in (SIGNIFICANCE, ENSEMBLE_SIGNIFICANCE):
        if (compare / file).exists():
            rows += pd.read_csv(compare / file).to_dict("records")
    if rows:
        table = ["| pair | accuracy difference [95% CI] | McNemar p (Holm) |", "|---|---|---|"]
        for row in rows:
            holm = f" ({row['p_holm']:.2g})" if pd.notna(row.get("p_holm")) else ""
            table.append(f"| {row['model_a']} vs {row['model_b']} | {row['difference']:+.3f} "
                         f"[{row['diff_low']:+.3f}, {row['diff_high']:+.3f}] | "
                         f"{row['mcnemar_p']:.2g}{holm} |")
        out.append("\n".join(table))
    return "\n\n".join(out) + "\n"
