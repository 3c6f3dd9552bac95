"""Time to accuracy: training minutes each model needs to reach 55%, 60% and 65% PublicTest
accuracy under the profile's recipes now, against its recipes at an earlier commit.

    python benchmarks/bench_time_to_accuracy.py --old-ref 5067d53 [--profile full]
        [--models alexnet vit_conv] [--thresholds 0.55 0.60 0.65] [--cap-minutes 90]

For every model, the old recipe (``params/<profile>.yaml`` at ``--old-ref``) and the new one
(the working tree's) train one after the other in this one process, on the full Training set,
each until it reaches the highest threshold, stops by its own rule (early stopping, its epoch
cap) or spends ``--cap-minutes`` of training (``train.budget_minutes``, the study's safety
stop). The minutes are the training's own epoch seconds (fit and PublicTest scoring) summed up
to the first epoch at or above each threshold; "not reached" says so. PrivateTest is not
loaded. Run it on an otherwise quiet machine: two cores shared with anything else slow both.
Each training is resumable (``runs/<profile>-time-to-accuracy/{old,new}/models/<model>/``):
run the same command again after an interruption. Results: printed, and
``benchmarks/time_to_accuracy.json``; a run of some models keeps the rows of the others already
there (same profile, old commit and thresholds), and each row records the cap it ran under.

A model the old profile did not train (``vit_conv`` before the searches) trains with that
profile's shared settings and the model's defaults, and the JSON says so.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401  (quiets TensorFlow before Keras starts)

from ferlib import PROJECT_ROOT
from ferlib.runs import read_json, write_json
from ferlib.train import machine_description

NAME = "time_to_accuracy"
OUT = common.BENCHMARKS_DIR / "time_to_accuracy.json"
OLD_REF_VARIABLE = "FERLIB_OLD_RECIPES_REF"


def old_profile(profile: str, ref: str) -> Path:
    """``params/<profile>.yaml`` at git ``ref``, as a file of its own (same name)."""
    text = subprocess.run(["git", "show", f"{ref}:params/{profile}.yaml"], cwd=PROJECT_ROOT,
                          check=True, capture_output=True, text=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="ferlib-old-profile-"))
    path = folder / f"{profile}.yaml"
    path.write_text(text)
    return path


def minutes_to(history, timing, thresholds) -> dict:
    """{threshold: training minutes to the first epoch at or above it, or None}."""
    seconds = timing.set_index("epoch").seconds.cumsum()
    reached = {}
    for threshold in thresholds:
        hits = history[history.val_accuracy >= threshold].epoch
        reached[f"{threshold:.2f}"] = (round(float(seconds.loc[hits.iloc[0]]) / 60, 1)
                                       if len(hits) else None)
    return reached


class ReachedAll(Exception):
    """Raised from the epoch callback once the highest threshold is reached: no need to go on."""


def run_one(params: dict, model_name: str, data, out: Path, thresholds, cap_minutes) -> dict:
    import pandas as pd

    from ferlib.artifacts import Run
    from ferlib.config import deep_merge, validate
    from ferlib.train import train

    settings = validate(deep_merge(params, {
        "models": [model_name], "train_overrides": {model_name: {"budget_minutes": cap_minutes}}}))
    files = Run(out).model(model_name)
    target = max(thresholds)

    def stop_at_target(row):
        if row["val_accuracy"] >= target:
            raise ReachedAll

    done = files.history.exists() and (pd.read_csv(files.history).val_accuracy >= target).any()
    stopped = f"reached {target:.0%}"
    if not done:
        try:
            stopped = train(model_name, data, settings, out, on_epoch=stop_at_target)[
                "stopped_reason"]
        except ReachedAll:
            pass
    history, timing = pd.read_csv(files.history), pd.read_csv(files.timing)
    return {"minutes_to": minutes_to(history, timing, thresholds),
            "best_publictest": float(history.val_accuracy.max()),
            "epochs": int(len(history)), "stopped": stopped,
            "train_minutes": round(float(timing.seconds.sum()) / 60, 1),
            "cap_minutes": cap_minutes}


def earlier_rows(out: Path, header: dict) -> dict:
    """The models already measured in ``out`` under the same ``header`` (profile, old commit,
    thresholds and machine), so that a run of some models adds to the JSON instead of dropping
    the others' rows (the pairs take hours each and may run in different sessions; each row
    keeps its own cap, and the JSON's ``machine`` holds for every row)."""
    try:
        earlier = read_json(out, {})
    except (OSError, ValueError):
        return {}
    same = {key: earlier.get(key) for key in header} == header
    return earlier.get("models", {}) if same else {}


def run(quick: bool = False, context: dict | None = None, *, old_ref: str | None = None,
        profile: str = "full", models=None, thresholds=(0.55, 0.60, 0.65),
        cap_minutes: float = 90.0, out: Path = OUT, root: Path | None = None) -> dict:
    """Train every model with the old and the new recipe; the section for ``results.json``.
    ``quick``: the AlexNet-style CNN alone, at most 5 minutes per recipe. From ``run_all``
    the old commit comes from ``FERLIB_OLD_RECIPES_REF`` (see :func:`skip_reason`). The
    trainings go to ``root`` (default ``runs/<profile>-time-to-accuracy/``)."""
    from ferlib.config import load_params
    from ferlib.data import load_dataset

    old_ref = old_ref or os.environ[OLD_REF_VARIABLE]
    recipes = {"old": load_params(str(old_profile(profile, old_ref))),
               "new": load_params(profile)}
    if quick:
        models, cap_minutes = ["alexnet"], min(cap_minutes, 5.0)
    models = list(models or recipes["new"]["models"])
    data = load_dataset(recipes["new"], progress=True, splits=("train", "val"))
    root = Path(root or PROJECT_ROOT / "runs" / f"{profile}-time-to-accuracy")
    header = {"profile": profile, "old_ref": old_ref, "machine": machine_description(),
              "thresholds": list(thresholds)}
    report = {**header, "models": earlier_rows(out, header)}
    for model_name in models:
        for label, params in recipes.items():
            print(f"[time to accuracy] {model_name}, {label} recipe", flush=True)
            row = run_one(params, model_name, data, root / label, thresholds,
                          cap_minutes)
            if label == "old" and model_name not in params["models"]:
                row["note"] = ("not in the old profile: its shared settings and the model's "
                               "defaults")
            report["models"].setdefault(model_name, {})[label] = row
            write_json(out, report)  # after every training, atomically: rows took hours
    return report


def skip_reason() -> str | None:
    """Why ``run_all`` skips this benchmark: it trains for hours on the real data."""
    if os.environ.get(OLD_REF_VARIABLE):
        return None
    return (f"trains every model twice on the real data (hours): set {OLD_REF_VARIABLE} to the "
            f"commit of the old recipes, or run benchmarks/bench_time_to_accuracy.py --old-ref")


def print_section(section: dict) -> None:
    thresholds = section["thresholds"]
    rows = []
    for model_name, recipes in section["models"].items():
        for label, row in recipes.items():
            rows.append([model_name, label, *[row["minutes_to"][f"{t:.2f}"] for t in thresholds],
                         row["best_publictest"], row["epochs"], row["stopped"]])
    common.print_table(f"training minutes to PublicTest accuracy ({section['machine']})",
                       ["model", "recipe", *[f"{t:.0%}" for t in thresholds], "best", "epochs",
                        "stopped"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-ref", required=True, help="git commit (or tag) of the old recipes")
    parser.add_argument("--profile", default="full")
    parser.add_argument("--models", nargs="+", help="default: the new profile's models")
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.55, 0.60, 0.65])
    parser.add_argument("--cap-minutes", type=float, default=90.0,
                        help="training minutes per model and recipe at most")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    section = run(old_ref=args.old_ref, profile=args.profile, models=args.models,
                  thresholds=args.thresholds, cap_minutes=args.cap_minutes, out=args.out)
    print_section(section)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
