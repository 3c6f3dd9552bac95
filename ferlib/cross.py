"""The cross-dataset step: every trained model of a run, and their ensemble, scored on the
extra labelled datasets a profile lists under ``cross_datasets``.

A FER2013 model's accuracy on other faces is the first thing a reviewer asks about. Each
dataset is any labelled folder or zip that ``python -m ferlib evaluate`` reads (one subfolder
per class, optionally under train/val/test; class folders mapped onto the 7 emotions by name or
``class_map``). Every image of it is scored; nothing is fitted on it.

```yaml
cross_datasets:
  ckplus: {path: $CKPLUS_PATH, group_pattern: '^(S\\d+)_'}   # subject S010 of S010_004_...png
  my_faces: ~/faces.zip
```

Paths expand ``$VARIABLES`` and ``~``; a dataset whose path is unset or missing is listed on
the page as not available, with the reason, and the others are still scored. With
``group_pattern`` the confidence intervals resample whole subjects or sequences (a cluster
bootstrap), so many frames of one person do not count as independent evidence.
"""

from __future__ import annotations

import os
from pathlib import Path

from ferlib.artifacts import CROSS_DATASET, Run
from ferlib.runs import write_json

ENSEMBLE = "ensemble"


def datasets(params: dict) -> list[dict]:
    """The profile's cross datasets: name, path (expanded; None when unset), group_pattern,
    class_map and ``missing`` (why it cannot be scored, or None)."""
    from ferlib import PROJECT_ROOT

    found = []
    for name, entry in params["cross_datasets"].items():
        entry = {"path": entry} if isinstance(entry, str) else dict(entry)
        raw = entry["path"]
        expanded = os.path.expanduser(os.path.expandvars(raw))
        missing, path = None, None
        if "$" in expanded:
            missing = f"{raw}: the environment variable is not set"
        else:
            path = Path(expanded)
            path = path if path.is_absolute() else PROJECT_ROOT / path
            if not path.exists():
                missing = f"{path}: no such file or folder"
        found.append({"name": name, "path": path, "configured": raw,
                      "group_pattern": entry.get("group_pattern"),
                      "class_map": entry.get("class_map"), "missing": missing})
    return found


def trained_models(params: dict, run_dir: Path) -> dict[str, Path]:
    """Model name -> ``best.keras`` of each model of the profile that has finished."""
    run = Run(run_dir)
    return {name: run.model(name).best_model for name in params["models"]
            if run.model(name).metrics.exists() and run.model(name).best_model.exists()}


def evaluate_all(params: dict, run_dir: Path, *, n_boot: int | None = None,
                 progress: bool = True) -> dict[str, dict[str, dict]]:
    """{dataset: {model or "ensemble": ``apply.evaluate`` result}} for every available dataset
    and trained model; the ensemble (the mean of the calibrated members' probabilities) when
    there are two or more. Writes ``cross/<dataset>/<model>/`` (metrics and confusion matrix)
    and each model's ``cross_dataset.json`` summary, and rewrites its ``MODEL_CARD.md``."""
    from ferlib.apply import evaluate

    run_dir = Path(run_dir)
    models = trained_models(params, run_dir)
    members = dict(models)
    if len(models) >= 2:
        members[ENSEMBLE] = list(models.values())
    n_boot = params["report"]["bootstrap_samples"] if n_boot is None else n_boot
    results: dict[str, dict[str, dict]] = {}
    for dataset in datasets(params):
        if dataset["missing"]:
            continue
        results[dataset["name"]] = {}
        for name, model in members.items():
            if progress:
                print(f"[cross] {name} on {dataset['name']}", flush=True)
            results[dataset["name"]][name] = evaluate(
                model, dataset["path"], out=run_dir / "cross" / dataset["name"] / name,
                class_map=dataset["class_map"], n_boot=n_boot, seed=params["seed"],
                group_pattern=dataset["group_pattern"])
    from ferlib.card import write_model_card

    for name in models:
        summary = {dataset: _summary(by_model[name]) for dataset, by_model in results.items()}
        directory = Run(run_dir).model(name).directory
        write_json(directory / CROSS_DATASET, summary)
        write_model_card(directory)  # its card shows them
    return results


def _summary(result: dict) -> dict:
    intervals = result["confidence_intervals"]
    return {"data": result["data"], "data_hash": result["data_hash"], "images": result["images"],
            "groups": result.get("groups"), "classes": result["classes"],
            "absent_classes": result["absent_classes"],
            **{key: intervals[key] for key in ("accuracy", "accuracy_masked", "f1_macro")},
            "recall": {name: row["recall"] for name, row in result["per_class"].items()}}


def summary_table(results: dict):
    """One row per (dataset, model): images (and groups), accuracy over all 7 outputs, accuracy
    with absent classes masked and macro-F1 (masked), each with its 95% CI."""
    import pandas as pd

    rows = []
    for dataset, by_model in results.items():
        for model, result in by_model.items():
            row = {"dataset": dataset, "model": model, "images": result["images"],
                   "groups": result.get("groups") or result["images"],
                   "absent classes": ", ".join(result["absent_classes"]) or "none"}
            for key, label in (("accuracy", "accuracy"), ("accuracy_masked", "accuracy (masked)"),
                               ("f1_macro", "macro-F1 (masked)")):
                interval = result["confidence_intervals"][key]
                row[label] = interval["value"]
                row[f"{label} 95% CI"] = _interval_text(interval)
            rows.append(row)
    return pd.DataFrame(rows)


def recall_table(results: dict):
    """Per-class recall (masked prediction), one row per (dataset, model)."""
    import pandas as pd

    rows = [{"dataset": dataset, "model": model,
             **{name: values["recall"] for name, values in result["per_class"].items()}}
            for dataset, by_model in results.items() for model, result in by_model.items()]
    return pd.DataFrame(rows)


def _interval_text(interval: dict) -> str:
    if interval["low"] is None or interval["high"] is None:
        return "n/a"
    return f"[{interval['low']:.3f}, {interval['high']:.3f}]"
