"""Fine-tune a trained model on any labelled image folder or zip: ``python -m ferlib finetune``.

The data are one subfolder per class (``<class>/*.jpg``), optionally under ``train/``,
``val/`` and ``test/`` (``ferlib.data``'s folder and zip readers, any image size or colour).
Class folders are read by name (``Joy`` is happy, ``--class-map`` adds names):

- the same head: the classes are the source model's (all 7 emotions), or ``--keep-head`` and
  every class is one of them (absent ones keep their outputs);
- a new head otherwise: one output per class (``--classes`` chooses and orders them, else the
  dataset's own), its rows started from the source's rows of the same names.

Validation and test splits are the dataset's own folders, or seeded stratified slices of the
train images. Training is ``ferlib.train.train`` (resumable, early stopping, calibration, the
test split scored once) in up to two phases under ``<out>/work/``: ``frozen`` (only the head
trains, ``--freeze-epochs``, at ``--head-learning-rate``; no test split) and ``tuned`` (every
layer, at the lower ``--learning-rate``, from the frozen phase's best weights). The finished
``tuned`` folder's files are copied into ``<out>``, a complete model folder for ``evaluate``,
``predict``, ``export`` and ``predict --explain``, with ``finetune.json`` (what was done, the
source model's accuracy on the same test split as the baseline), ``report.html`` and
``MODEL_CARD.md``.
"""

from __future__ import annotations

import base64
import html
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ferlib import EMOTIONS, MODEL_NAMES, metrics
from ferlib.artifacts import ModelRun, Run
from ferlib.runs import atomic_save, atomic_write_text, read_json, write_json

PHASES = ("frozen", "tuned")
COPIED = ("best_model", "predictions", "metrics", "settings", "calibration")
DEFAULTS = {"epochs": 10, "freeze_epochs": 0, "learning_rate": 1e-4, "head_learning_rate": 1e-3,
            "patience": 3, "val_fraction": 0.15, "test_fraction": 0.15, "seed": 0}


# ----------------------------------------------------------------------------- classes

def plan_head(found: dict, source_classes, classes=None, keep_head=False) -> dict:
    """Which head the fine-tuned model gets, from the dataset's classes.

    Parameters
    ----------
    found : dict
        ``ferlib.data.class_folders``: class name -> the folder names read as it.
    source_classes : sequence of str
        The source model's output classes.
    classes : sequence of str, optional
        ``--classes``: the new head's classes, in order (dataset classes left out are not read).
    keep_head : bool
        Keep the source's head; every class must be one of its classes.

    Returns
    -------
    dict
        ``classes`` (the head's, in output order), ``same_head``, ``used`` (dataset classes
        read), ``left_out`` and ``message`` (one sentence saying which path was taken).
    """
    from ferlib.data import class_name

    source_classes = tuple(source_classes)
    if not found:
        raise ValueError("the dataset has no class folders (expected <class>/*.jpg, optionally "
                         "under train/, val/, test/)")
    wanted = list(dict.fromkeys(class_name(name) for name in classes)) if classes else list(found)
    missing = [name for name in wanted if name not in found]
    if missing:
        raise ValueError(f"--classes: {', '.join(missing)} not in the dataset; its classes: "
                         f"{', '.join(found)}")
    left_out = [name for name in found if name not in wanted]
    if len(wanted) < 2:
        raise ValueError(f"the dataset has one class only ({wanted[0]}); a classifier needs at "
                         f"least 2")
    foreign = [name for name in wanted if name not in source_classes]
    if keep_head:
        if len(foreign) == len(wanted):
            raise ValueError(f"--keep-head: no class in common with the source model's "
                             f"({', '.join(source_classes)}); the dataset's: "
                             f"{', '.join(wanted)}; map folders with --class-map (e.g. "
                             f"joy=happy) or drop --keep-head for a new head")
        if foreign:
            raise ValueError(f"--keep-head: {', '.join(foreign)} not among the source model's "
                             f"classes ({', '.join(source_classes)}); map them with --class-map "
                             f"(e.g. contempt=disgust), leave them out with --classes, or "
                             f"drop --keep-head for a new head")
    same = keep_head or (set(wanted) == set(source_classes) and not classes)
    head = source_classes if same else tuple(wanted)
    if same:
        absent = [name for name in source_classes if name not in wanted]
        message = (f"same head: the source model's {len(head)} outputs are kept"
                   + (f" ({', '.join(absent)} absent from the data)" if absent else ""))
    else:
        reused = [name for name in head if name in source_classes]
        message = (f"new head: {len(head)} outputs ({', '.join(head)})"
                   + (f", rows of {', '.join(reused)} started from the source's"
                      if reused else ", started at random") + "; the backbone is the source's")
    if left_out:
        message += f"; left out: {', '.join(left_out)}"
    return {"classes": head, "same_head": same, "used": wanted, "left_out": left_out,
            "message": message}


# ----------------------------------------------------------------------------- data

def stratified_slices(labels: np.ndarray, candidates: np.ndarray, fractions: dict, rng,
                      class_names) -> dict:
    """Seeded stratified slices of ``candidates``: for each split in ``fractions`` (name ->
    fraction of each class, at least one image), leaving at least one training image per
    class; a class too small for them is one ValueError."""
    chosen = {name: [] for name in fractions}
    for label in np.unique(labels[candidates]):
        members = rng.permutation(candidates[labels[candidates] == label])
        counts = {name: max(1, int(round(len(members) * fraction)))
                  for name, fraction in fractions.items()}
        if len(members) - sum(counts.values()) < 1:
            raise ValueError(f"class {class_names[label]!r} has {len(members)} image(s) to "
                             f"share between train and the {' and '.join(fractions)} slice(s): "
                             f"too few (needs at least {sum(counts.values()) + 1}); add images, "
                             f"or give the dataset its own {'/ and '.join(fractions)}/ folder")
        start = 0
        for name, count in counts.items():
            chosen[name].append(members[start:start + count])
            start += count
    return {name: np.concatenate(parts) for name, parts in chosen.items()}


def read_dataset(path, plan: dict, found: dict, *, class_map=None, val_fraction=0.15,
                 test_fraction=0.15, seed=0):
    """The fine-tuning data: labels index the head's classes, every image in a split.

    Returns
    -------
    (FERData, dict)
        The data, and where each split came from (``val``, ``test``: the dataset's own folder
        or a seeded stratified slice of train).
    """
    from ferlib.data import load_fer2013

    names = list(found)
    data = load_fer2013(path, class_map=class_map, on_error="skip", cache=False,
                        classes=tuple(names), default_split="train", val_fraction=0.0)
    head = list(plan["classes"])
    keep = np.isin(np.asarray(names)[data.labels], plan["used"])
    data = data.select(keep)
    if not len(data):
        raise ValueError(f"{path}: no readable image of the classes used "
                         f"({', '.join(plan['used'])}); {len(data.skipped)} skipped")
    data.labels = np.asarray([head.index(names[label]) for label in data.labels], np.int64)
    split = data.split.copy()
    fractions = {name: fraction for name, fraction in (("val", val_fraction),
                                                        ("test", test_fraction))
                 if not (split == name).any()}
    origin = {name: f"the dataset's own {name}/ images" for name in ("val", "test")}
    slices = stratified_slices(data.labels, np.flatnonzero(split == "train"), fractions,
                               np.random.default_rng(seed), head)
    for name, index in slices.items():
        split[index] = name
        origin[name] = (f"a seeded stratified {fractions[name]:.0%} slice of the train images "
                        f"(seed {seed})")
    data.split = split
    untrained = [head[k] for k in np.unique(data.labels) if not (data.labels[split == "train"]
                                                                  == k).any()]
    if untrained:
        raise ValueError(f"class(es) {', '.join(untrained)} have no training images (only "
                         f"val/ or test/ ones); add train images or leave them out with "
                         f"--classes")
    return data, origin


def class_counts(data, classes) -> pd.DataFrame:
    """Images per class (rows) and split (columns)."""
    table = pd.crosstab(pd.Categorical(np.asarray(classes)[data.labels], list(classes)),
                        pd.Categorical(data.split, ["train", "val", "test"]), dropna=False)
    table.index.name, table.columns.name = "class", None
    return table


# ----------------------------------------------------------------------------- the model

def source_record(model_path) -> dict:
    """The source model's file, sha256, registry name, architecture settings and classes."""
    from ferlib.data import file_sha256
    from ferlib.inference import class_names, model_file

    path = model_file(model_path)
    settings = read_json(ModelRun(path.parent).settings)
    if not settings or settings.get("model") not in MODEL_NAMES or "model_params" not in settings:
        raise ValueError(f"{path}: fine-tuning needs the model's settings.json beside it (the "
                         f"folder ferlib.train or finetune wrote: runs/<profile>/models/<name>/"
                         f"best.keras), to rebuild its architecture")
    return {"path": path, "file": path.name, "sha256": file_sha256(path),
            "model": settings["model"], "settings": settings,
            "classes": list(class_names(path))}


def _transfer(source, source_classes, target, head) -> None:
    """Copy ``source``'s weights into ``target`` layer by layer (same architecture); the
    ``logits`` rows of classes the two share are copied, the others keep their start."""
    from ferlib.models import AUGMENTATION_LAYERS

    mine = [layer for layer in target.layers if not isinstance(layer, AUGMENTATION_LAYERS)]
    theirs = [layer for layer in source.layers if not isinstance(layer, AUGMENTATION_LAYERS)]
    if len(mine) != len(theirs):
        raise ValueError("the source model's layers do not match the architecture its "
                         "settings describe")
    for layer, other in zip(mine, theirs):
        if layer.name != "logits":
            try:
                layer.set_weights(other.get_weights())
            except ValueError as error:
                raise ValueError(f"the source model's layer {other.name} does not match the "
                                 f"architecture its settings describe ({error})") from None
            continue
        kernel, bias = (np.array(w) for w in layer.get_weights())
        source_kernel, source_bias = other.get_weights()
        for row, name in enumerate(head):
            if name in source_classes:
                kernel[:, row] = source_kernel[:, list(source_classes).index(name)]
                bias[row] = source_bias[list(source_classes).index(name)]
        layer.set_weights([kernel, bias])


def builder(start_file: Path, start_classes, head):
    """``build(settings)`` for ``ferlib.train.train``: the architecture of ``settings`` with a
    head of ``len(head)`` outputs, weights from the model in ``start_file``, the backbone
    frozen when ``settings`` says so."""
    def build(settings):
        import keras

        from ferlib.models import build_model

        arch = {key: value for key, value in settings["model_params"].items()
                if key not in ("num_classes", "finetune")}
        model = build_model(settings["model"], num_classes=len(head),
                            augment=settings["augment"], seed=settings["seed"], **arch)
        start = keras.models.load_model(start_file, compile=False)
        _transfer(start, start_classes, model, head)
        if settings["model_params"]["finetune"]["freeze_backbone"]:
            for layer in model.layers:
                layer.trainable = layer.name == "logits"
        return model
    return build


def phase_params(source: dict, head, phase: str, start_sha256: str, options: dict) -> dict:
    """Validated parameters of one phase: the source's recipe (optimizer, batch size,
    augmentation, architecture) with this fine-tune's epochs, rate and early stopping; the
    fine-tune's own inputs sit in ``model_params`` so the training key covers them."""
    from ferlib.config import validate

    name, settings = source["model"], source["settings"]
    frozen = phase == "frozen"
    train = {**settings.get("train", {}),
             "epochs": options["freeze_epochs"] if frozen else options["epochs"],
             "learning_rate": options["head_learning_rate" if frozen else "learning_rate"],
             "early_stopping_patience": options["patience"], "warmup_epochs": 0,
             "schedule": "cosine", "min_learning_rate": 0.0, "budget_minutes": None}
    if options.get("batch_size"):
        train["batch_size"] = options["batch_size"]
    arch = {key: value for key, value in settings["model_params"].items()
            if key not in ("num_classes", "finetune", "weights")}
    params = validate({"seed": options["seed"], "models": [name], "train": train,
                       "augment": settings.get("augment", {}), "model_params": {name: arch},
                       "data": {"val_fraction": options["val_fraction"]}})
    params["model_params"][name].update(num_classes=len(head), finetune={
        "phase": phase, "freeze_backbone": frozen, "classes": list(head),
        "source_sha256": source["sha256"], "start_sha256": start_sha256,
        "test_fraction": options["test_fraction"]})
    return params


# ----------------------------------------------------------------------------- the command

def finetune(model_path, data_path, out, *, classes=None, class_map=None, keep_head=False,
             progress=True, **options) -> dict:
    """Fine-tune ``model_path`` on the labelled images in ``data_path`` into ``out``.

    Parameters
    ----------
    model_path : str or Path
        A ``best.keras`` with its ``settings.json`` (a model folder of ``train`` or
        ``finetune``).
    data_path : str or Path
        An image folder or zip, one subfolder per class, optionally under train/, val/, test/.
    out : str or Path
        The new model folder (created; a rerun resumes or returns the finished result).
    classes, class_map, keep_head
        See :func:`plan_head`; ``class_map`` adds folder names (``{"joy": "happy"}``).
    progress : bool
        Print what is done, one line per epoch.
    **options
        ``epochs``, ``freeze_epochs``, ``learning_rate``, ``head_learning_rate``,
        ``patience``, ``batch_size``, ``val_fraction``, ``test_fraction``, ``seed`` (defaults:
        :data:`DEFAULTS`).

    Returns
    -------
    dict
        The content of ``finetune.json``.
    """
    from ferlib.data import class_folders, file_sha256
    from ferlib.faces import check_outputs
    from ferlib.train import train

    unknown = sorted(set(options) - set(DEFAULTS) - {"batch_size"})
    if unknown:
        raise TypeError(f"finetune: unknown option(s) {', '.join(unknown)}")
    options = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    for key in ("epochs", "patience"):
        if options[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')}: must be at least 1; got {options[key]}")
    if options["freeze_epochs"] < 0:
        raise ValueError(f"--freeze-epochs: must be 0 or more; got {options['freeze_epochs']}")
    for key in ("val_fraction", "test_fraction"):
        if not 0 < options[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')}: expected a fraction between 0 and 1; "
                             f"got {options[key]}")
    say = (lambda text: print(text, flush=True)) if progress else (lambda text: None)
    out = Path(out)
    source = source_record(model_path)
    data_path = Path(data_path).expanduser()
    if not data_path.exists():
        raise FileNotFoundError(f"--data: {data_path}: no such file or folder")
    check_outputs([out], [data_path, source["path"].parent])
    found = class_folders(data_path, class_map)
    plan = plan_head(found, source["classes"], classes, keep_head)
    say(f"{plan['message']}")
    data, origin = read_dataset(data_path, plan, found, class_map=class_map,
                                val_fraction=options["val_fraction"],
                                test_fraction=options["test_fraction"], seed=options["seed"])
    counts = class_counts(data, plan["classes"])
    per_split = ", ".join(f"{split} {int(counts[split].sum())}" for split in counts.columns)
    say(f"{data_path.name}: {len(data):,} images ({per_split}), {len(data.skipped)} "
        f"unreadable skipped; val: {origin['val']}; test: {origin['test']}")
    for entry, reason in data.skipped[:5]:
        say(f"  skipped {entry}: {reason}")
    baseline = source_baseline(source, plan, data)
    say(f"baseline: the source model on the test split: accuracy "
        f"{baseline['accuracy']:.3f}" if baseline.get("accuracy") is not None
        else f"baseline: {baseline['note']}")

    work = out / "work"
    name = source["model"]
    start, start_classes, start_sha = source["path"], source["classes"], source["sha256"]
    phases = []
    for phase in PHASES:
        if phase == "frozen" and not options["freeze_epochs"]:
            continue
        params = phase_params(source, plan["classes"], phase, start_sha, options)
        say(f"phase {phase}: {'head only' if phase == 'frozen' else 'every layer'}, up to "
            f"{params['train']['epochs']} epochs at learning rate "
            f"{params['train']['learning_rate']:g}")
        phase_data = data.select(data.split != "test") if phase == "frozen" else data
        result = train(name, phase_data, params, work, progress=progress, subdir=phase,
                       build=builder(start, start_classes, plan["classes"]))
        phases.append({"name": phase, "epochs_run": result["epochs_run"],
                       "best_epoch": result["best_epoch"],
                       "stopped_reason": result["stopped_reason"],
                       "train_seconds": result["train_seconds"],
                       "learning_rate": params["train"]["learning_rate"]})
        start = Run(work).model(name, phase).best_model
        start_classes, start_sha = list(plan["classes"]), file_sha256(start)
    record = {"source": {key: source[key] for key in ("file", "sha256", "model", "classes")},
              "data": {"name": data_path.name, "sha256": data.source_hash,
                       "images": len(data), "skipped": len(data.skipped),
                       "per_class": counts.to_dict(orient="index")},
              "head": {key: plan[key] for key in ("classes", "same_head", "left_out",
                                                  "message")},
              "head_classes": list(plan["classes"]), "class_map": class_map or {},
              "splits": origin, "baseline": baseline, "options": options, "phases": phases,
              "schedule": "; ".join(
                  f"{phase['name']} ({'head only' if phase['name'] == 'frozen' else 'every layer'}"
                  f", learning rate {phase['learning_rate']:g}, {phase['epochs_run']} epochs, "
                  f"best {phase['best_epoch']}, {phase['stopped_reason']})"
                  for phase in phases)}
    publish(out, Run(work), name, [phase["name"] for phase in phases], record, data)
    result = read_json(ModelRun(out).metrics)
    say(f"done: test accuracy {result['test']['accuracy']:.3f} (before fine-tuning "
        f"{_text(baseline.get('accuracy'))}); wrote {out} ({ModelRun(out).best_model.name}, "
        f"{ModelRun(out).finetune_report.name}, {ModelRun(out).model_card.name})")
    return record


def _text(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def source_baseline(source: dict, plan: dict, data) -> dict:
    """The source model's accuracy on the test split, before fine-tuning: its outputs of the
    head's classes, renormalised (a new head with classes the source lacks: not applicable)."""
    from ferlib.inference import Predictor

    head = list(plan["classes"])
    missing = [name for name in head if name not in source["classes"]]
    images, labels = data.subset("test")
    if missing:
        return {"accuracy": None, "images": int(len(labels)),
                "note": f"not applicable: the source model has no output for "
                        f"{', '.join(missing)}"}
    proba = Predictor(source["path"]).probabilities(images)
    columns = [source["classes"].index(name) for name in head]
    restricted = proba[:, columns] / np.maximum(proba[:, columns].sum(1, keepdims=True), 1e-12)
    interval = metrics.bootstrap_ci(labels, restricted, n_boot=1000, seed=0,
                                    metric_names=("accuracy",)).iloc[0]
    note = ("its outputs of the head's classes only, renormalised"
            if len(columns) < len(source["classes"]) else "")
    return {"accuracy": float(interval["value"]), "low": float(interval["low"]),
            "high": float(interval["high"]), "images": int(len(labels)), "note": note}


def publish(out: Path, work: Run, name: str, phases: list[str], record: dict, data) -> None:
    """Copy the last phase's model folder into ``out`` and add the fine-tune's own files:
    ``history.csv`` and ``timing.csv`` over every phase (with a ``phase`` column),
    ``classes.json`` (a head of its own), ``finetune.json``, ``report.html``, the card."""
    from ferlib.card import write_model_card

    files, last = ModelRun(out), work.model(name, phases[-1])
    for attribute in COPIED:
        source = getattr(last, attribute)
        atomic_save(lambda temp, source=source: shutil.copyfile(source, temp),
                    getattr(files, attribute))
    for attribute in ("history", "timing"):
        frames, offset = [], 0
        for phase in phases:
            frame = pd.read_csv(getattr(work.model(name, phase), attribute))
            frame.insert(1, "phase", phase)
            frame["epoch"] += offset
            offset = int(frame["epoch"].max())
            frames.append(frame)
        atomic_write_text(getattr(files, attribute), pd.concat(frames).to_csv(index=False))
    if tuple(record["head_classes"]) != EMOTIONS:
        write_json(files.classes, record["head_classes"])
    else:
        files.classes.unlink(missing_ok=True)
    write_json(files.finetune, record)
    write_model_card(out, data)
    atomic_write_text(files.finetune_report, report_page(out))


# ----------------------------------------------------------------------------- report

def _figure_html(figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _frame_html(frame: pd.DataFrame) -> str:
    return frame.to_html(escape=True, classes="results", float_format="{:.3f}".format)


def report_page(model_dir) -> str:
    """The one-page HTML report of a fine-tuned model folder: provenance, the path taken, the
    splits, test metrics with 95% CIs beside the source model's baseline, calibration,
    per-class scores, learning curves and the confusion matrix. Every string from the data or
    the options is escaped; figures are embedded."""
    from ferlib import plots
    from ferlib.pipeline import PAGE_STYLE, provenance_header
    from ferlib.runs import provenance

    files = ModelRun(model_dir)
    record = read_json(files.finetune)
    calibration = read_json(files.calibration)
    head = record["head_classes"]
    with np.load(files.predictions) as archive:
        labels, proba = archive["test_labels"], archive["test_proba"]
    intervals = metrics.bootstrap_ci(labels, proba, n_boot=1000, seed=0)
    rows = [{"metric": row["metric"], "fine-tuned": f"{row['value']:.3f}",
             "95% CI": f"[{row['low']:.3f}, {row['high']:.3f}]"} for _, row in
            intervals.iterrows()]
    base = record["baseline"]
    rows[0]["source model (before)"] = (f"{base['accuracy']:.3f} [{base['low']:.3f}, "
                                        f"{base['high']:.3f}]" if base.get("accuracy")
                                        is not None else base["note"])
    scores = pd.DataFrame(rows).set_index("metric").fillna("")
    per_class = metrics.per_class_report(labels, proba.argmax(1), head)
    counts = pd.DataFrame(record["data"]["per_class"]).T.reindex(head)
    history = pd.read_csv(files.history)
    e = html.escape
    source, data = record["source"], record["data"]
    info = provenance({"profile": "finetune"}, Path(data["name"]), data["sha256"])
    calibration_text = (
        f"Temperature T = {calibration['temperature']:.3f} fitted on the validation split; "
        f"test ECE {calibration['before']['ece']:.3f} before, "
        f"{calibration['after']['ece']:.3f} after." if calibration else "Not calibrated.")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Fine-tuning {e(source['file'])} on {e(data['name'])}</title>",
        f"<style>{PAGE_STYLE} body{{font:14px/1.5 sans-serif;max-width:1100px;margin:2em auto}}"
        f" img{{max-width:100%}}</style></head><body>",
        provenance_header(info),
        f"<h1>Fine-tuning <code>{e(source['model'])}</code> on <code>{e(data['name'])}</code>"
        f"</h1>",
        f"<p>Source model <code>{e(source['file'])}</code> (sha256 "
        f"<code>{e(source['sha256'][:12])}</code>, classes {e(', '.join(source['classes']))})."
        f" {e(record['head']['message'])}.</p>",
        f"<p>{data['images']:,} images, {data['skipped']} unreadable skipped. Validation: "
        f"{e(record['splits']['val'])}; test: {e(record['splits']['test'])}, scored once. "
        f"Schedule: {e(record['schedule'])}.</p>",
        "<h2>Images per class and split</h2>", _frame_html(counts),
        "<h2>Test metrics</h2>",
        f"<p>{len(labels):,} test images; 95% bootstrap intervals (1000 resamples). The source "
        f"model's accuracy on the same images is the baseline"
        + (f" ({e(base['note'])})" if base.get("note") else "") + ".</p>",
        _frame_html(scores),
        f"<p>{e(calibration_text)}</p>",
        "<h2>Per class</h2>", _frame_html(per_class),
        "<h2>Learning curves</h2>",
        _figure_html(plots.learning_curves(history, title="phases: " + ", ".join(
            dict.fromkeys(history["phase"]))), "learning curves"),
        "<h2>Confusion matrix (test)</h2>",
        _figure_html(plots.confusion_matrix_plot(
            metrics.confusion(labels, proba.argmax(1), num_classes=len(head)), head),
            "confusion matrix"),
        f"<p>This folder is a model folder: <code>{e(files.best_model.name)}</code> for "
        f"evaluate, predict and export; its card: <code>{e(files.model_card.name)}</code>.</p>",
        "</body></html>"]
    return "\n".join(parts)
