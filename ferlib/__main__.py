"""Command line: ``python -m ferlib <command>`` (report, train, search, status, results,
evaluate, predict, export, finetune, card, data-summary). Every command's options are declared
here; the work is done by the library modules."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ferlib import apply, export


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
    from ferlib.config import model_settings

    for name in args.model or params["models"]:
        model_settings(params, name)  # an unknown model name fails here, before any data loads
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
    from ferlib.artifacts import Run

    run = Run(directory)
    for path in run.pending():
        print(f"retraining (not live yet): {path.name}")
    if run.moved_aside():
        print(f"{len(run.moved_aside())} moved-aside run(s): python -m ferlib runs --profile "
              f"{params['profile']} lists them, --prune removes them")
    return 0


def _runs(args) -> int:
    import shutil

    from ferlib.artifacts import Run
    from ferlib.config import load_params, parse_overrides
    from ferlib.runs import run_dir

    params = load_params(args.profile, parse_overrides(args.set))
    run = Run(args.run_dir or run_dir(params["profile"]))
    aside, pending = run.moved_aside(), run.pending()
    for path in pending:
        print(f"retraining (not live yet): {path}")
    for path in aside:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
        print(f"{'removing' if args.prune else 'moved aside'}: {path} ({size:.1f} MiB)")
        if args.prune:
            shutil.rmtree(path)
    if not aside and not pending:
        print(f"{run.directory}: no moved-aside or pending runs")
    elif aside and not args.prune:
        print("python -m ferlib runs --prune removes the moved-aside copies")
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
    if args.best or args.trial is not None:
        import optuna

        study = open_study(params, args.model, args.storage, run_dir=args.run_dir)
        if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            raise ValueError(f"search {study.study_name}: no complete trial yet; run "
                             f"python -m ferlib search --profile {args.profile} "
                             f"--model {args.model}")
        print(best_recipe_yaml(study, args.model, f" ({args.storage})" if args.storage else "",
                               trial=args.trial), end="")
        return 0
    run_search(params, args.model, trials=args.trials, storage=args.storage,
               timeout_hours=args.timeout, run_dir=args.run_dir)
    return 0


def _ablation(args) -> int:
    from ferlib.ablation import ablation_table, open_ablation, run_ablation
    from ferlib.config import load_params, parse_overrides

    params = load_params(args.profile, parse_overrides(args.set))
    if args.table:
        study = open_ablation(params, args.model, args.storage, run_dir=args.run_dir)
    else:
        study = run_ablation(params, args.model, storage=args.storage, run_dir=args.run_dir)
    table = ablation_table(study)
    print(table.to_string(index=False, float_format=lambda value: f"{value:.4f}") if len(table)
          else f"no A/B run yet: python -m ferlib ablation --profile {args.profile} "
               f"--model {args.model}")
    return 0


def _report(args) -> int:
    from ferlib.pipeline import report

    return report(args.profile, overrides=args.set, run_root=args.runs_root,
                  reports_root=args.reports_root, force=args.force)


# ----------------------------------------------------------------------------- evaluate, predict

def _evaluate_command(args) -> int:
    result = apply.evaluate(args.model, args.data, out=args.out,
                            class_map=apply.parse_class_map(args.class_map), tta=args.tta,
                            n_boot=args.bootstrap, seed=args.seed,
                            calibration=args.calibration, group_pattern=args.group_pattern)
    print(apply.format_evaluation(result))
    return 0


VIDEO_OPTIONS = ("every", "out", "annotate_video", "smooth")
IMAGE_OPTIONS = {"annotate": "--annotate (use --annotate-video)", "explain": "--explain",
                 "detect": "--no-detect"}


def _predict_video_command(args) -> int:
    from ferlib.video import VideoError, format_video_summary, predict_video

    if args.camera is not None and args.images:
        raise ValueError("predict: give either --camera N or files, not both")
    if args.camera is None and len(args.images) > 1:
        raise ValueError("predict: a video is classified on its own; give one video per "
                         "command (or only images)")
    used = [text for option, text in IMAGE_OPTIONS.items()
            if getattr(args, option) not in (None, True)]
    if used:
        raise ValueError(f"predict: {', '.join(used)}: only for images, not for a video")
    source = args.camera if args.camera is not None else args.images[0]
    try:
        summary = predict_video(source, args.model,
                                every=1 if args.every is None else args.every, out=args.out,
                                annotate_video=args.annotate_video,
                                smooth=1 if args.smooth is None else args.smooth,
                                calibration=args.calibration, overwrite=args.overwrite)
    except VideoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if args.json else format_video_summary(summary))
    return 0


def _predict_command(args) -> int:
    if args.camera is not None or any(_is_video(path) for path in args.images):
        return _predict_video_command(args)
    if not args.images:
        raise ValueError("predict: give image files or folders, a video, or --camera N")
    given = [f"--{option.replace('_', '-')}" for option in VIDEO_OPTIONS
             if getattr(args, option) is not None]
    if given:
        raise ValueError(f"predict: {', '.join(given)}: only for a video or --camera, not for "
                         f"images")
    results = apply.predict(args.images, args.model, detect=args.detect, top=args.top,
                            annotate=args.annotate, calibration=args.calibration,
                            explain=args.explain, explain_method=args.explain_method,
                            overwrite=args.overwrite)
    failed = [result for result in results if "error" in result]
    for result in failed:
        print(f"error: {apply.format_prediction(result)}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            if "error" not in result:
                print(apply.format_prediction(result))
    if failed:
        print(f"{len(results) - len(failed)} of {len(results)} images processed, "
              f"{len(failed)} unreadable", file=sys.stderr)
    return 1 if len(failed) == len(results) else 0


def _is_video(path) -> bool:
    from ferlib.video import is_video

    return is_video(path)


def _add_apply_commands(commands) -> None:
    """Add the ``evaluate`` and ``predict`` commands to ``python -m ferlib``.

    Parameters
    ----------
    commands : argparse subparsers object
        From ``parser.add_subparsers()``; each command sets ``handler``.
    """
    evaluate_parser = commands.add_parser(
        "evaluate", help="score a saved model on a labelled dataset (CSV, folder or zip)",
        description="Score a saved model on every image of a labelled dataset; print metrics "
                    "with bootstrap 95%% CIs and write metrics.json and confusion_matrix.png.")
    evaluate_parser.add_argument("--model", required=True, action="append",
                                 help="a .keras model, e.g. runs/quick/models/alexnet/best.keras;"
                                      " repeat it to evaluate the ensemble of several (the mean "
                                      "of their probabilities)")
    evaluate_parser.add_argument("--data", required=True, help="FER2013 CSV, image folder "
                                 "(train/<class>/, test/<class>/ or <class>/) or a zip of one")
    evaluate_parser.add_argument("--out", default="evaluation",
                                 help="folder for metrics.json and confusion_matrix.png "
                                      "(default: ./evaluation)")
    evaluate_parser.add_argument("--group-pattern", metavar="REGEX",
                                 help="a regular expression whose match in a file name (its "
                                 "first group, if any) names the image's subject or sequence; "
                                 "the intervals then resample whole groups (e.g. '^(S\\d+)_' "
                                 "for CK+)")
    evaluate_parser.add_argument("--class-map", metavar="FOLDER=EMOTION,...",
                                 help="extra class-folder names, e.g. contempt=disgust,joy=happy")
    evaluate_parser.add_argument("--tta", action="store_true",
                                 help="average predictions over each image and its mirror")
    evaluate_parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                                 help="bootstrap resamples for the CIs (default 1000; 0: none)")
    evaluate_parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    evaluate_parser.add_argument("--no-calibration", dest="calibration", action="store_false",
                                 help="ignore the temperature in calibration.json beside the "
                                      "model (default: use it when present)")
    evaluate_parser.set_defaults(handler=_evaluate_command)

    predict_parser = commands.add_parser(
        "predict", help="classify the faces in images, a video or a camera with a saved model",
        description="Find faces (OpenCV Haar cascade), classify each and print the most likely "
                    "emotions. For a video (or --camera N): sample frames, track faces, write "
                    "per-frame rows and print the share of time per emotion. Exit code 1 only "
                    "if no image could be read, or the video or camera cannot be read.")
    predict_parser.add_argument("images", nargs="*", metavar="IMAGE_DIR_OR_VIDEO",
                                help="image files or folders (searched recursively), or one "
                                     "video file (.mp4, .avi, .mov, .mkv, .webm or any other "
                                     "file OpenCV reads)")
    predict_parser.add_argument("--model", required=True, action="append",
                                help="a .keras model; repeat it for an ensemble (the mean of "
                                     "their probabilities; --explain shows the first one's "
                                     "saliency)")
    predict_parser.add_argument("--no-detect", dest="detect", action="store_false",
                                help="treat each whole image as an already cropped face")
    predict_parser.add_argument("--json", action="store_true",
                                help="print JSON: a list of results per image, or a video's "
                                     "summary")
    predict_parser.add_argument("--annotate", metavar="OUT",
                                help="folder for copies of the images with boxes and labels")
    predict_parser.add_argument("--overwrite", action="store_true",
                                help="allow outputs inside an input folder, or over files that "
                                     "ferlib did not write (refused by default)")
    predict_parser.add_argument("--top", type=int, default=3,
                                help="emotions shown per face (default 3)")
    predict_parser.add_argument("--no-calibration", dest="calibration", action="store_false",
                                help="ignore the temperature in calibration.json beside the "
                                     "model (default: use it when present)")
    predict_parser.add_argument("--explain", metavar="OUT",
                                help="folder for one PNG per face: the crop beside its "
                                     "saliency map for the top emotion")
    predict_parser.add_argument("--explain-method", default="auto",
                                choices=("auto", "grad_cam", "occlusion"),
                                help="saliency method for --explain (default auto: Grad-CAM)")
    video = predict_parser.add_argument_group("video and camera")
    video.add_argument("--camera", type=int, metavar="N",
                       help="read camera N (0: the first) instead of files, until Ctrl-C")
    video.add_argument("--every", type=int, metavar="N",
                       help="classify every Nth frame (default 1: all)")
    video.add_argument("--out", metavar="FILE",
                       help="rows.csv or rows.jsonl: one row per sampled frame and face "
                            "(frame, time_s, track, x, y, w, h, the 7 probabilities, emotion)")
    video.add_argument("--annotate-video", metavar="FILE",
                       help="copy of the sampled frames with boxes, track ids and emotions "
                            "(.mp4 or .avi)")
    video.add_argument("--smooth", type=int, metavar="K",
                       help="average each face track's probabilities over its last K "
                            "samples (default 1: none)")
    predict_parser.set_defaults(handler=_predict_command)


# ----------------------------------------------------------------------------- export

def _export_command(args) -> int:
    labels = export.export_model(args.model, args.out, args.format,
                                 calibration=args.calibration, data=args.data,
                                 synthetic=args.synthetic, images=args.images)
    print(export.format_export(labels, args.out))
    if not labels["parity"]["passed"]:
        print(f"error: parity check failed: the {args.format} model's probabilities differ "
              f"from Keras' (see 'parity' in {Path(args.out) / export.LABELS_FILE}); the "
              f"artifact is "
              f"kept for inspection, do not ship it", file=sys.stderr)
        return 1
    return 0


def _add_export_commands(commands) -> None:
    """Add the ``export`` command to ``python -m ferlib``.

    Parameters
    ----------
    commands : argparse subparsers object
        From ``parser.add_subparsers()``; each command sets ``handler``.
    """
    parser = commands.add_parser(
        "export", help="export a saved model to ONNX, LiteRT or a SavedModel, with parity check",
        description="Write an inference-only copy of a saved model (uint8 (batch, 48, 48, 1) "
                    "faces -> 7 probabilities) with Keras' model.export, a labels.json beside "
                    "it, and check it in its own runtime against Keras on 256 images. Exit "
                    "code 1 if parity fails (max |difference| > 1e-4 or any top-1 "
                    f"disagreement). ONNX needs the export extra: {export.INSTALL_HINT}")
    parser.add_argument("--model", required=True,
                        help="a .keras model, e.g. runs/quick/models/alexnet/best.keras")
    parser.add_argument("--format", required=True, choices=tuple(export.FORMATS),
                        help="onnx (model.onnx), litert (model.tflite) or saved_model "
                             "(saved_model/)")
    parser.add_argument("--out", default="exported",
                        help="folder for the artifact and labels.json (default: ./exported)")
    parser.add_argument("--no-calibration", dest="calibration", action="store_false",
                        help="ignore the temperature in calibration.json beside the model "
                             "(default: build it into the exported probabilities)")
    parser.add_argument("--data", help="dataset for the parity check (default: FER2013 from "
                                       "FER2013_PATH or data/, else synthetic faces)")
    parser.add_argument("--synthetic", action="store_true",
                        help="check parity on synthetic faces even if FER2013 is available")
    parser.add_argument("--images", type=int, default=export.PARITY_IMAGES,
                        help=f"parity images (default {export.PARITY_IMAGES})")
    parser.set_defaults(handler=_export_command)


# ----------------------------------------------------------------------------- finetune, card

def _finetune_command(args) -> int:
    from ferlib.finetune import finetune

    classes = [name.strip() for name in args.classes.split(",") if name.strip()] \
        if args.classes else None
    finetune(args.model, args.data, args.out, classes=classes,
             class_map=apply.parse_class_map(args.class_map), keep_head=args.keep_head,
             epochs=args.epochs, freeze_epochs=args.freeze_epochs,
             learning_rate=args.learning_rate, head_learning_rate=args.head_learning_rate,
             patience=args.patience, batch_size=args.batch_size,
             val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    return 0


def _card_command(args) -> int:
    from ferlib.card import write_model_card

    folder = Path(args.model)
    folder = folder.parent if folder.suffix == ".keras" else folder
    print(f"wrote {write_model_card(folder)}")
    return 0


def _add_finetune_commands(commands) -> None:
    """Add the ``finetune`` and ``card`` commands to ``python -m ferlib``.

    Parameters
    ----------
    commands : argparse subparsers object
        From ``parser.add_subparsers()``; each command sets ``handler``.
    """
    from ferlib.finetune import DEFAULTS

    parser = commands.add_parser(
        "finetune", help="fine-tune a trained model on your own labelled faces (folder or zip)",
        description="Fine-tune a trained model on a labelled image folder or zip (one "
                    "subfolder per class, optionally under train/, val/, test/), with the "
                    "training of the study: resumable (rerun the same command), early "
                    "stopping on the validation split, temperature scaling, the test split "
                    "scored once. Classes are read by name: the 7 emotions keep the model's "
                    "head (--keep-head: also a subset of them); other or fewer classes get a "
                    "new head, which the first line says. Training runs in two phases: "
                    "--freeze-epochs N epochs with the backbone frozen (only the head learns, "
                    "at --head-learning-rate), then every layer at the lower --learning-rate "
                    "for up to --epochs, from the frozen phase's best weights. OUT becomes a "
                    "model folder (best.keras for evaluate, predict, export) with report.html "
                    "and MODEL_CARD.md.")
    parser.add_argument("--model", required=True,
                        help="the source model, e.g. runs/quick/models/alexnet/best.keras "
                             "(its settings.json must be beside it)")
    parser.add_argument("--data", required=True, help="image folder or zip: <class>/*.jpg, "
                        "optionally under train/, val/ and test/")
    parser.add_argument("--out", required=True, help="the new model folder (a rerun resumes)")
    parser.add_argument("--classes", metavar="A,B,...",
                        help="the new head's classes, in order (default: the dataset's own; "
                             "classes left out are not read)")
    parser.add_argument("--class-map", metavar="FOLDER=CLASS,...",
                        help="extra folder names, e.g. joy=happy,contempt=disgust")
    parser.add_argument("--keep-head", action="store_true",
                        help="keep the source model's outputs; every class must be one of them")
    parser.add_argument("--epochs", type=int, help=f"most epochs with every layer training "
                        f"(default {DEFAULTS['epochs']}; early stopping may end sooner)")
    parser.add_argument("--freeze-epochs", type=int, metavar="N",
                        help=f"first train only the head for up to N epochs, the backbone "
                             f"frozen (default {DEFAULTS['freeze_epochs']}: no frozen phase)")
    parser.add_argument("--learning-rate", type=float, help=f"rate once every layer trains "
                        f"(default {DEFAULTS['learning_rate']:g}, cosine to 0)")
    parser.add_argument("--head-learning-rate", type=float,
                        help=f"rate of the frozen phase (default "
                             f"{DEFAULTS['head_learning_rate']:g})")
    parser.add_argument("--patience", type=int, help=f"early stopping: epochs without a better "
                        f"validation accuracy (default {DEFAULTS['patience']})")
    parser.add_argument("--batch-size", type=int, help="default: the source model's")
    parser.add_argument("--val-fraction", type=float,
                        help=f"validation slice of train when the data has no val/ folder "
                             f"(default {DEFAULTS['val_fraction']:g}, stratified)")
    parser.add_argument("--test-fraction", type=float,
                        help=f"test slice of train when the data has no test/ folder "
                             f"(default {DEFAULTS['test_fraction']:g}, stratified)")
    parser.add_argument("--seed", type=int, help=f"seed of the slices and the training "
                        f"(default {DEFAULTS['seed']})")
    parser.set_defaults(handler=_finetune_command)

    card = commands.add_parser(
        "card", help="write MODEL_CARD.md of a finished model folder again (from its files)",
        description="Write MODEL_CARD.md into a trained or fine-tuned model folder from its "
                    "files (metrics, predictions, calibration, data record; cross_dataset.json "
                    "and saliency_check.json when present; the run's accuracy without "
                    "duplicates once 04_compare has run).")
    card.add_argument("--model", required=True, help="the model folder or its best.keras")
    card.set_defaults(handler=_card_command)


# ----------------------------------------------------------------------------- lent GPU session

def _gpu_command(args) -> int:
    """gpu-pack-data, gpu-unpack-data, gpu-check, gpu-train, gpu-pack-results, gpu-merge."""
    from ferlib import device

    if args.command == "gpu-pack-data":
        manifest = device.pack_data(Path(args.source), Path(args.to), parts=args.parts)
        for part in manifest["parts"]:
            print(f"{Path(args.to) / part['file']}: {part['bytes'] / device.MIB:.2f} MiB")
        print(f"{manifest['source']}: {manifest['bytes'] / device.MIB:.2f} MiB -> "
              f"{manifest['packed_bytes'] / device.MIB:.2f} MiB xz in "
              f"{len(manifest['parts'])} parts (sha256 {manifest['sha256'][:12]})")
        return 0
    if args.command == "gpu-unpack-data":
        if args.present:
            print(device.data_parts_present(Path(args.folder)))
            return 0
        print(device.unpack_data(Path(args.folder), Path(args.to)))  # the last line: the path
        return 0
    if args.command == "gpu-check":
        print(json.dumps(device.check_environment()))
        return 0
    if args.command == "gpu-pack-results":
        session = Path(args.session)
        run_dir = Path(args.run_dir or (json.loads(session.read_text())["run_dir"]))
        manifest = device.pack_results(run_dir, Path(args.out), session_file=session,
                                       log_file=Path(args.log) if args.log else None)
        print(device.describe_manifest(manifest))
        return 0
    from ferlib.config import load_params, parse_overrides
    from ferlib.runs import run_dir as default_run_dir

    params = load_params(args.profile, parse_overrides(args.set))
    directory = Path(args.run_dir or default_run_dir(params["profile"]))
    if args.command == "gpu-train":
        from ferlib.config import model_settings

        for name in args.model or []:
            model_settings(params, name)  # an unknown model name fails before data loads
        device.train_session(params, args.budget_seconds, directory, models=args.model,
                             reserve_seconds=args.reserve_seconds,
                             session_file=Path(args.session))
        return 0
    done = device.merge_results(Path(getattr(args, "from")), params, directory)
    print(f"merged into {directory}: " + (", ".join(f"{name} {what}"
                                                     for name, what in done.items())
                                           or "no models"))
    return 0


def _add_gpu_commands(commands) -> None:
    """Add the lent-GPU session's commands (docs/gpu.md; benchmarks/gpu_study.sh runs them)."""
    pack = commands.add_parser("gpu-pack-data", help="xz the dataset file into parts that "
                               "travel to a lent GPU, with a manifest (data.json)")
    pack.add_argument("source", help="the dataset file, e.g. data/fer2013.zip")
    pack.add_argument("--to", default=".gpu/data", help="folder for the parts (default .gpu/data)")
    pack.add_argument("--parts", type=int, default=2, help="parts of equal size (default 2)")
    unpack = commands.add_parser("gpu-unpack-data", help="rebuild the dataset file from its "
                                 "parts and check its sha256 against the manifest")
    unpack.add_argument("folder", help="the folder holding data.json and the parts")
    unpack.add_argument("--to", default=".gpu/dataset", help="where the file goes")
    unpack.add_argument("--present", action="store_true",
                        help="only say which parts are here")
    commands.add_parser("gpu-check", help="import what training imports here; one line "
                        "naming a missing module")
    train = commands.add_parser("gpu-train", help="train a profile's models within a time "
                                "budget, stopping cleanly (resumable) before it ends")
    train.add_argument("--budget-seconds", type=float, required=True)
    train.add_argument("--reserve-seconds", type=float, default=45.0,
                       help="kept free for a model's final evaluation and the packing "
                            "(default 45)")
    train.add_argument("--session", required=True, help="the session record (JSON) to write")
    train.add_argument("--model", action="append", help="model (repeatable; default: all)")
    results = commands.add_parser("gpu-pack-results", help="pack a session's results within "
                                  "the return limits (8 files, 16 MiB each, 64 MiB)")
    results.add_argument("--session", required=True, help="gpu-train's session record")
    results.add_argument("--log", help="the training log to include")
    results.add_argument("--out", required=True, help="where the returned files go ($OUT)")
    results.add_argument("--run-dir", help="default: the session's run directory")
    merge = commands.add_parser("gpu-merge", help="merge a device session's returned files "
                                "into runs/<profile>/ (then make report PROFILE=<profile>)")
    merge.add_argument("--from", required=True, help="the folder of the returned files")
    for sub in (train, merge):
        sub.add_argument("--profile", default="gpu", help="params/<profile>.yaml")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        sub.add_argument("--run-dir", help="default: runs/<profile>")
    for name in ("gpu-pack-data", "gpu-unpack-data", "gpu-check", "gpu-train",
                 "gpu-pack-results", "gpu-merge"):
        commands.choices[name].set_defaults(handler=_gpu_command)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ferlib", description=__doc__,
        epilog="Exit codes: 0 done, 2 a mistake in the input (arguments, profile, data or model "
               "file), 1 the work failed (e.g. parity, disk). --debug shows the traceback.")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and the backend's start-up messages")
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
             "a rendered run (reads files only)"),
            ("runs", _runs, "list a run's moved-aside (replaced) trainings and pending retrains; "
             "--prune removes the moved-aside ones")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--profile", default="quick", help="params/<profile>.yaml")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        sub.add_argument("--run-dir", help="default: runs/<profile>")
        sub.set_defaults(handler=handler)
    commands.choices["runs"].add_argument("--prune", action="store_true",
                                          help="delete the moved-aside copies")
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
    search.add_argument("--trial", type=int, metavar="N", help="like --best, for trial N (to "
                        "adopt another complete trial than the best, and say why)")
    search.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    search.add_argument("--run-dir", help="default: runs/<profile>")
    search.set_defaults(handler=_search)
    ablation = commands.add_parser(
        "ablation", help="A/B runs of training techniques (ablation.variants) on top of one "
        "model's recipe, each with the same seeds, scored on PublicTest (resumable)")
    ablation.add_argument("--profile", default="quick", help="params/<profile>.yaml (its "
                          "ablation: section; the search: section gives the protocol)")
    ablation.add_argument("--model", required=True, help="one of the profile's ablation.models")
    ablation.add_argument("--storage", help="Optuna storage URL (default: "
                          "sqlite:///runs/<profile>/search/studies.db)")
    ablation.add_argument("--table", action="store_true", help="print the table of the runs "
                          "so far, and train nothing")
    ablation.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ablation.add_argument("--run-dir", help="default: runs/<profile>")
    ablation.set_defaults(handler=_ablation)
    report_parser.add_argument("--runs-root", help="folder of run directories (default: runs/)")
    report_parser.add_argument("--reports-root", help="folder of report folders "
                               "(default: reports/)")
    report_parser.add_argument("--force", action="store_true",
                               help="re-execute every notebook")

    _add_apply_commands(commands)
    _add_export_commands(commands)
    _add_finetune_commands(commands)
    _add_gpu_commands(commands)

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, export.MissingDependencyError) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT
    except RuntimeError as error:
        from ferlib.artifacts import RunBusy

        if args.debug or not isinstance(error, RunBusy):
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_RUNTIME
    except OSError as error:  # a full disk, a read-only folder, a permission
        if args.debug:
            raise
        print(f"error: {os_error_line(error)}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


def os_error_line(error: OSError) -> str:
    """What went wrong with which path, and what to do, in one line."""
    import errno

    path = f"{error.filename}: " if error.filename else ""
    advice = {errno.ENOSPC: "the disk is full: free space, then rerun (finished work is kept)",
              errno.EDQUOT: "the disk quota is full: free space, then rerun",
              errno.EACCES: "permission denied: fix the permissions or choose another folder",
              errno.EPERM: "not permitted: fix the permissions or choose another folder",
              errno.EROFS: "the file system is read-only: choose another folder",
              errno.EEXIST: "a file is in the way: choose another output path",
              errno.ENOTDIR: "a file is in the way where a folder is needed: choose another "
                             "output path"}.get(error.errno)
    return f"{path}{advice or error.strerror or error}"


EXIT_INPUT = 2     # a mistake in what was asked: arguments, a profile, a data or model file
EXIT_RUNTIME = 1   # the work could not be done: a failed parity check, a full disk, ...


def quiet_native_stderr() -> None:
    """Drop the backend's start-up chatter (oneDNN, CUDA probing, absl) from this process's
    stderr, including what TensorFlow's C++ code writes to file descriptor 2 directly, which
    TF_CPP_MIN_LOG_LEVEL does not reach: fd 2 becomes a pipe that a thread copies to the real
    stderr line by line, less ``ferlib.pipeline.BACKEND_NOISE``. At exit the pipe is closed and
    drained, so the last line (an error) is never lost."""
    import atexit
    import threading

    from ferlib.pipeline import NoiseFilter

    real = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def pump():
        noise = NoiseFilter()
        with os.fdopen(read, "r", errors="replace") as lines, \
                os.fdopen(real, "w", closefd=False) as out:
            for line in lines:
                if noise.keep(line.rstrip("\n")):
                    out.write(line)
                    out.flush()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()

    def drain():
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last write end here: the thread sees the end
        thread.join(timeout=5)

    atexit.register(drain)


if __name__ == "__main__":
    if "--debug" not in sys.argv:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        quiet_native_stderr()
    sys.exit(main())
