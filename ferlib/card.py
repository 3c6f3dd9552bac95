"""Model cards: ``MODEL_CARD.md`` beside every trained or fine-tuned model, from its files only.

``ferlib.train`` writes the card when a training finishes (:func:`write_model_card`, after
calibration), ``python -m ferlib finetune`` when a fine-tune finishes, ``export`` copies it
beside every artifact; ``04_compare`` and ``05_cross`` write it again once they have added
what they measure, and ``python -m ferlib card --model DIR`` does so by hand. Every number comes from the
model folder's files (``metrics.json``, ``predictions.npz``, ``calibration.json``,
``dataset.json``, ``settings.json``, and where present ``finetune.json``,
``cross_dataset.json``, ``saliency_check.json``) or the run's ``compare/summary_full.csv``;
none is typed in. A file that is missing leaves its section saying so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ferlib import EMOTIONS, metrics
from ferlib.artifacts import ModelRun, Run
from ferlib.runs import atomic_write_text, read_json, write_json

CI_RESAMPLES = 1000
CI_SEED = 0  # when settings.json has no seed (04_compare draws with the run's seed)
INTENDED_USE = """\
Research on facial expression recognition: comparing architectures and training recipes on
FER2013-style 48x48 gray face crops, teaching, and as a starting point for fine-tuning on a
labelled dataset of one's own. Its outputs are the probabilities of *displayed* expression
categories on a single face crop."""
OUT_OF_SCOPE = """\
- Decisions about people: hiring, admission, credit, insurance, policing, border control,
  grading, or any assessment of a person's suitability, honesty or character.
- Surveillance, tracking or profiling of people, in public or at work, and use on anyone who
  has not agreed to it.
- Inferring internal states (what someone feels, intends or thinks), mental health, pain or
  deception: a facial display is not an emotion, and the labels are annotators' readings of
  posed and spontaneous images.
- Medical, safety-critical or legal use of any kind."""
LIMITATIONS = """\
- Posed vs spontaneous faces: FER2013 mixes posed and spontaneous expressions found by web
  search; accuracy on other sources, video frames or subtle everyday expressions is lower and
  unmeasured unless a cross-dataset section below says otherwise.
- Demographics: FER2013's people are not documented by age, gender or skin tone, and web images
  over-represent some groups; performance per group is unknown.
- Label noise: FER2013's labels are single crowd labels; re-annotation studies (FER+) disagree
  with about one label in ten, and classes such as disgust have few images.
- Input: one roughly frontal, centred face crop, 48x48 gray; faces found by another detector,
  turned away, occluded or small differ from the training data.
- The calibration temperature was fitted on the validation split; it holds for data like it."""


def dataset_record(data) -> dict:
    """What ``dataset.json`` keeps of a :class:`ferlib.data.FERData`: the source's file name
    (no machine path), its sha256, images per split, skipped and converted counts."""
    summary = data.summary()
    return {"name": Path(summary["source"]).name or summary["source"],
            "sha256": summary["source_hash"], "images": summary["num_images"],
            "per_split": summary["per_split"], "skipped": summary["skipped"],
            "converted": summary["converted"]}


def write_model_card(model_dir, data=None) -> Path:
    """Write ``MODEL_CARD.md`` into a finished model folder (and ``dataset.json`` from
    ``data``, a :class:`ferlib.data.FERData`, when given); returns the card's path."""
    files = ModelRun(model_dir)
    if data is not None:
        write_json(files.dataset, dataset_record(data))
    atomic_write_text(files.model_card, model_card(model_dir))
    return files.model_card


def _number(value, digits=3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) \
        else f"{value:.{digits}f}"


def _interval(row) -> str:
    return f"{_number(row['value'])} [{_number(row['low'])}, {_number(row['high'])}]"


def _table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _unseen_accuracy(model_dir: Path, name: str | None) -> dict | None:
    """The accuracy without duplicates of ``04_compare``'s summary, if the run has one."""
    import pandas as pd

    from ferlib.paper import MODEL_DISPLAY_NAMES

    models = model_dir.parent
    if models.name != "models" or name is None:
        return None
    summary = Run(models.parent).compare_summary_full
    if not summary.is_file():
        return None
    frame = pd.read_csv(summary)
    rows = frame[frame["model"] == MODEL_DISPLAY_NAMES.get(name, name)]
    if rows.empty or "accuracy_unseen" not in rows:
        return None
    row = rows.iloc[0]
    return {"value": float(row["accuracy_unseen"]), "low": float(row["accuracy_unseen_low"]),
            "high": float(row["accuracy_unseen_high"]), "images": int(row["unseen_images"])}


def model_card(model_dir) -> str:
    """The Markdown of a model folder's card (see the module docstring for its sources)."""
    from ferlib.inference import class_names

    model_dir = Path(model_dir)
    files = ModelRun(model_dir)
    result = read_json(files.metrics)
    if result is None:
        raise FileNotFoundError(f"{files.metrics}: no finished training in {model_dir}; a "
                                f"model card is written from a finished model folder")
    settings = read_json(files.settings, {})
    dataset = read_json(files.dataset, {})
    finetune = read_json(files.finetune)
    calibration = read_json(files.calibration)
    classes = list(class_names(model_dir))
    splits = ("train", "val", "test") if finetune else ("Training", "PublicTest", "PrivateTest")
    name = settings.get("model") or result.get("model")
    lines = [f"# Model card: {name}" + (" (fine-tuned)" if finetune else ""), "",
             "Generated by ferlib from this folder's files; regenerate with "
             "`python -m ferlib card --model <folder>`.", ""]

    lines += ["## Model", "",
              f"- Architecture: `{name}` ({result.get('parameters', 0):,} parameters), "
              f"inputs uint8 48x48 gray face crops, outputs {len(classes)} classes: "
              f"{', '.join(classes)}.",
              f"- Files: `{files.best_model.name}` (Keras 3); calibration temperature in "
              f"`{files.calibration.name}`.", ""]

    lines += ["## Data and protocol", ""]
    if dataset:
        per_split = dataset.get("per_split", {})
        lines.append(f"- Data: `{dataset.get('name')}`, sha256 `{dataset.get('sha256')}`; "
                     f"{dataset.get('images', 0):,} images ("
                     + ", ".join(f"{label} {per_split.get(split, 0):,}"
                                 for label, split in zip(splits, ("train", "val", "test")))
                     + f"), {dataset.get('skipped', 0)} unreadable skipped.")
    else:
        lines.append("- Data: not recorded (no dataset.json in this folder).")
    if finetune:
        source = finetune["source"]
        lines += [f"- Fine-tuned from `{source['file']}` (sha256 `{source['sha256']}`, model "
                  f"`{source['model']}`, classes {', '.join(source['classes'])}): "
                  f"{finetune['head']['message']}",
                  f"- Protocol: trained on the train split, the best epoch selected on the "
                  f"validation split ({finetune['splits']['val']}), the test split "
                  f"({finetune['splits']['test']}) scored once at the end.",
                  f"- Schedule: {finetune['schedule']}.", ""]
    else:
        lines += ["- Protocol: trained on Training, the best epoch (and the calibration "
                  "temperature) selected on PublicTest, PrivateTest scored once at the end"
                  + (f" (scorings of this model in the run's ledger: "
                     f"{result['privatetest_scorings']})"
                     if result.get("privatetest_scorings") else "") + ".", ""]

    test_name = splits[2]
    lines += [f"## {'Test split' if finetune else test_name} metrics", ""]
    if "test" in result and files.predictions.is_file():
        with np.load(files.predictions) as archive:
            labels, proba = archive["test_labels"], archive["test_proba"]
        # The run's seed, as 04_compare's summary table draws: the same intervals in both.
        seed = int(settings.get("seed", CI_SEED))
        intervals = metrics.bootstrap_ci(labels, proba, n_boot=CI_RESAMPLES, seed=seed)
        lines += [f"{len(labels):,} images; 95% bootstrap intervals ({CI_RESAMPLES} "
                  f"resamples, seed {seed}).", ""]
        lines += _table(["metric", "value [95% CI]"],
                        [(row["metric"], _interval(row)) for _, row in intervals.iterrows()])
        unseen = None if finetune else _unseen_accuracy(model_dir, name)
        if unseen:
            lines += ["", f"Accuracy without duplicates (the {unseen['images']:,} "
                          f"{test_name} images found in neither Training nor PublicTest): "
                          f"{_interval(unseen)}."]
        report = metrics.per_class_report(labels, proba.argmax(axis=1), classes)
        lines += ["", "Per class:", ""]
        lines += _table(["class", "precision", "recall", "F1", "images"],
                        [(cls, _number(row.precision), _number(row.recall), _number(row.f1),
                          int(row.support)) for cls, row in report.iterrows()])
        if finetune and finetune.get("baseline"):
            base = finetune["baseline"]
            lines += ["", f"Before fine-tuning, the source model on the same test split: "
                          f"accuracy {_number(base.get('accuracy'))}" +
                      (f" ({base['note']})" if base.get("note") else "") + "."]
    else:
        lines.append(f"Not scored: this training had no {test_name} images.")
    lines.append("")

    lines += ["## Calibration", ""]
    if calibration:
        before, after = calibration["before"], calibration["after"]
        where = ({"PublicTest": "the validation split", "PrivateTest": "the test split"}
                 if finetune else {})
        fitted, evaluated = (where.get(calibration[key], calibration[key])
                             for key in ("fitted_on", "evaluated_on"))
        lines += [f"Temperature T = {_number(calibration['temperature'])}, fitted on "
                  f"{fitted}, evaluated on {evaluated} "
                  f"({calibration['eval_images']:,} images, {calibration['bins']} bins).", ""]
        lines += _table(["", "ECE [95% CI]", "class-wise ECE", "Brier", "NLL"],
                        [(label, f"{_number(part['ece'])} [{_number(part['ece_low'])}, "
                                 f"{_number(part['ece_high'])}]",
                          _number(part["classwise_ece"]), _number(part["brier"]),
                          _number(part["nll"]))
                         for label, part in (("before temperature scaling", before),
                                             ("after", after))])
    else:
        lines.append("No calibration.json: the probabilities are uncalibrated.")
    lines.append("")

    cross = read_json(files.cross_dataset)
    lines += ["## Cross-dataset results", ""]
    if cross:
        rows = cross if isinstance(cross, list) else [dict(dataset=key, **value)
                                                      for key, value in cross.items()]
        def shown(value):  # 05_cross writes intervals, a hand-made file may hold numbers
            return _interval(value) if isinstance(value, dict) else _number(value)

        lines += _table(["dataset", "images", "accuracy [95% CI]", "accuracy, absent classes "
                         "masked", "macro F1 (masked)"],
                        [(row.get("dataset"), row.get("images", "n/a"),
                          shown(row.get("accuracy")), shown(row.get("accuracy_masked")),
                          shown(row.get("f1_macro"))) for row in rows])
    else:
        lines.append(f"None recorded: the report's 05_cross page writes "
                     f"`{files.cross_dataset.name}` here when the profile lists "
                     f"`cross_datasets`.")
    lines.append("")

    sanity = read_json(files.saliency_check)
    lines += ["## Saliency sanity check", ""]
    if sanity:
        lines.append(f"Model-randomisation check ({sanity.get('method', 'saliency')}, "
                     f"{sanity.get('images', 'n/a')} images): Spearman correlation of the maps "
                     f"before and after randomising the weights {_number(sanity.get('spearman'))}"
                     f"; {'passes' if sanity.get('passes') else 'does not pass'}.")
    else:
        lines.append(f"Not recorded for this folder (`{files.saliency_check.name}`); "
                     f"`04_compare` shows the check per model.")
    lines.append("")

    hours = result.get("train_seconds", 0) / 3600
    lines += ["## Training compute", "",
              f"- Epochs: {result.get('epochs_run')} (best {result.get('best_epoch')}, stopped: "
              f"{result.get('stopped_reason')}), {hours:.2f} hours of training and "
              f"validation, {_number(result.get('seconds_per_epoch'), 0)} s per epoch.",
              f"- Machine: {result.get('machine', 'not recorded')}.", ""]
    if finetune and finetune.get("phases"):
        lines.insert(-1, "- Phases: " + "; ".join(
            f"{phase['name']}: {phase['epochs_run']} epoch(s), "
            f"{phase['train_seconds'] / 3600:.2f} h"
            for phase in finetune["phases"]) + ".")

    lines += ["## Intended use", "", INTENDED_USE, "",
              "## Out-of-scope uses", "", OUT_OF_SCOPE, "",
              "## Known limitations", "", LIMITATIONS, ""]
    if finetune:
        lines[-1:-1] = ["- This model was fine-tuned on a small dataset of its own: its test "
                        "split is small and its intervals are wide; its people and recording "
                        "conditions bound what it has learned."]
    if classes != list(EMOTIONS):
        lines[-1:-1] = [f"- Its classes ({', '.join(classes)}) are those of its fine-tuning "
                        f"data, not FER2013's seven emotions."]
    return "\n".join(lines)
