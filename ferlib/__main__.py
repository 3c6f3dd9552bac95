"""Command line: ``python -m ferlib <command>`` (report, train, status, evaluate, predict, export,
data-summary)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _data_summary(args) -> int:
    from ferlib import data as fer_data
    from ferlib.data import resolve_data_path

    # An explicit --data wins over FER2013_PATH; without it, the usual lookup applies.
    path = Path(args.data) if args.data else resolve_data_path()
    dataset = fer_data.load_fer2013(path, on_error=args.on_error)
    print(f"{path}  ({len(dataset):,} images, {dataset.converted} converted, "
          f"{len(dataset.skipped)} skipped)\n")
    print(fer_data.class_counts(dataset).to_string(), "\n")
    print(fer_data.duplicate_summary(dataset).to_string(), "\n")
    print(f"near-blank images (pixel std < 3): {len(fer_data.near_blank(dataset))}\n")
    print("sharpness (mean |Laplacian|) per split; a large gap = blurred vs sharp images:")
    print(fer_data.sharpness_by_split(dataset).round(2).to_string())
    ratio = 1.5
    print(fer_data.sharpness_warning(dataset, ratio=ratio)
          or f"sharpness: all splits alike (within {ratio}x)", "\n")
    print("images also in another split (pixel-identical), and conflicting labels:")
    print(fer_data.cross_split_overlap(dataset).to_string(na_rep=""))
    return 0


def _train(args) -> int:
    if args.device is not None:
        # Before Keras and its backend start: the process then sees only this accelerator.
        os.environ["CUDA_VISIBLE_DEVICES"] = args.device
    from ferlib.config import load_params, parse_overrides
    from ferlib.data import load_dataset
    from ferlib.runs import run_dir
    from ferlib.train import train, train_cv

    params = load_params(args.profile, parse_overrides(args.set))
    if args.fold and not params["cv_folds"]:
        raise ValueError("--fold: this profile trains on the official split (cv_folds: 0); "
                         "set cv_folds, e.g. --set cv_folds=5")
    dataset = load_dataset(params, progress=True)
    directory = args.run_dir or run_dir(params["profile"])
    for name in args.model or params["models"]:
        if params["cv_folds"]:
            train_cv(name, dataset, params, directory, folds=args.fold)
        else:
            train(name, dataset, params, directory)
    return 0


def _status(args) -> int:
    from ferlib.config import load_params, parse_overrides
    from ferlib.runs import run_dir
    from ferlib.artifacts import progress_table

    params = load_params(args.profile, parse_overrides(args.set))
    directory = Path(args.run_dir or run_dir(params["profile"]))
    table = progress_table(directory, params)
    print(f"{directory}:")
    print(table.astype(object).where(table.notna(), "-").to_string(index=False))
    return 0


def _results(args) -> int:
    from ferlib.config import load_params, parse_overrides
    from ferlib.results import readme_tables
    from ferlib.runs import run_dir

    params = load_params(args.profile, parse_overrides(args.set))
    print(readme_tables(Path(args.run_dir or run_dir(params["profile"])), params), end="")
    return 0


def _search(args) -> int:
    from ferlib.config import load_params, parse_overrides
    from ferlib.search import best_recipe_yaml, open_study, run_search

    params = load_params(args.profile, parse_overrides(args.set))
    if args.best:
        study = open_study(params, args.model, args.storage, run_dir=args.run_dir)
        try:
            print(best_recipe_yaml(study, args.model,
                                   f" ({args.storage})" if args.storage else ""), end="")
        except ValueError:
            raise ValueError(f"search {study.study_name}: no complete trial yet; run "
                             f"python -m ferlib search --profile {args.profile} "
                             f"--model {args.model}") from None
        return 0
    run_search(params, args.model, trials=args.trials, storage=args.storage,
               timeout_hours=args.timeout, run_dir=args.run_dir)
    return 0


def _report(args) -> int:
    from ferlib.pipeline import report

    return report(args.profile, overrides=args.set, run_root=args.runs_root,
                  reports_root=args.reports_root, force=args.force)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferlib", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    summary = commands.add_parser("data-summary", help="per-split, per-class counts, "
                                  "duplicates and near-blank images")
    summary.add_argument("--data", help="FER2013 CSV, folder or zip (default: FER2013_PATH "
                         "or data/)")
    summary.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    summary.set_defaults(handler=_data_summary)

    for name, handler, text in (("train", _train, "train models of a profile"),
                                ("report", _report, "run the notebooks and render reports")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--profile", default="quick", help="params/<profile>.yaml")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a parameter, e.g. --set train.epochs=3")
        sub.set_defaults(handler=handler)
    train_parser, report_parser = commands.choices["train"], commands.choices["report"]
    train_parser.add_argument("--model", action="append",
                              help="model to train (repeatable; default: all)")
    train_parser.add_argument("--run-dir", help="default: runs/<profile>")
    train_parser.add_argument("--fold", action="append", type=int,
                              help="with cv_folds: train only this fold (1-based, repeatable); "
                              "the fold merge is written once every fold is done")
    train_parser.add_argument("--device", help="accelerator index for this process "
                              "(sets CUDA_VISIBLE_DEVICES), e.g. one fold per GPU")
    for name, handler, text in (
            ("status", _status, "epochs done, best PublicTest accuracy and ETA of each model of "
             "a profile's run (reads files only)"),
            ("results", _results, "the README's headline and significance tables (Markdown) of "
             "a rendered run (reads files only)")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--profile", default="quick", help="params/<profile>.yaml")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        sub.add_argument("--run-dir", help="default: runs/<profile>")
        sub.set_defaults(handler=handler)
    search = commands.add_parser(
        "search", help="Optuna recipe search of one model on PublicTest (resumable; several "
        "processes or machines can share one --storage)")
    search.add_argument("--profile", default="quick", help="params/<profile>.yaml (its search: "
                        "section declares the space and the budget)")
    search.add_argument("--model", required=True, help="the model whose recipe is searched")
    search.add_argument("--trials", type=int, help="finished trials the study should hold "
                        "(default: search.trials)")
    search.add_argument("--storage", help="Optuna storage URL (default: "
                        "sqlite:///runs/<profile>/search/studies.db)")
    search.add_argument("--timeout", type=float, metavar="HOURS",
                        help="start no new trial after this many hours")
    search.add_argument("--best", action="store_true", help="print the best recipe as a YAML "
                        "block for params/<profile>.yaml, and train nothing")
    search.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    search.add_argument("--run-dir", help="default: runs/<profile>")
    search.set_defaults(handler=_search)
    report_parser.add_argument("--runs-root", help="folder of run directories (default: runs/)")
    report_parser.add_argument("--reports-root", help="folder of report folders "
                               "(default: reports/)")
    report_parser.add_argument("--force", action="store_true",
                               help="re-execute every notebook")

    from ferlib import apply, export

    apply.add_commands(commands)
    export.add_commands(commands)

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, export.MissingDependencyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
