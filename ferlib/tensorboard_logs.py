"""TensorBoard logs of a training, under ``<model folder>/tensorboard/``.

Open them with ``make tensorboard PROFILE=<profile>`` (``tensorboard --logdir
runs/<profile>/models``): one TensorBoard run per model.

Written with the ``tensorboard`` package's own event-file writer, not Keras' ``TensorBoard``
callback, for three reasons: the callback needs TensorFlow (the JAX path has none); it never
sees PublicTest, which ``ferlib.train`` scores outside ``fit``; and it logs an epoch when
``fit`` ends, before the epoch is committed, so a run killed in between and resumed would log
that epoch twice. Here every committed epoch is its own event file with a fixed name
(``events.out.tfevents.1-epoch-0003``), written atomically after the epoch's commit point and
rewritten, never appended, if it is written again: a resumed run shows every epoch once. Epochs
committed just before a kill, whose file was not written yet, are written on resume.

Files sort in the order they are written (graph, epochs, best), which is the order a live
TensorBoard reads them in.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from ferlib.runs import temporary_file

FOLDER = "tensorboard"
SCALARS = {"loss/train": "loss", "loss/PublicTest": "val_loss", "accuracy/train": "accuracy",
           "accuracy/PublicTest": "val_accuracy", "learning_rate": "learning_rate"}


def available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def log_dir(model_dir: Path) -> Path:
    return Path(model_dir) / FOLDER


def _event_file(path: Path, events) -> None:
    """Write ``events`` (``event_pb2.Event``) as one TFRecord event file, atomically."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    buffer = io.BytesIO()
    writer = RecordWriter(buffer)
    header = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
    for event in (header, *events):
        writer.write(event.SerializeToString())
    # Not runs.atomic_write_bytes: its temporary name contains the final one, and TensorBoard
    # reads every file with "tfevents" in its name, so a live board would read it twice.
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_file(path.parent / "pending")
    try:
        temporary.write_bytes(buffer.getvalue())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _scalar_event(step: int, values: dict, wall_time: float):
    from tensorboard.compat.proto import event_pb2, summary_pb2

    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)
                                         for tag, value in values.items()])
    return event_pb2.Event(wall_time=wall_time, step=step, summary=summary)


def epoch_file(model_dir: Path, epoch: int) -> Path:
    return log_dir(model_dir) / f"events.out.tfevents.1-epoch-{epoch:04d}"


def log_epochs(model_dir: Path, history: list[dict], timing: list[dict],
               only_missing: bool = False) -> list[int]:
    """Write the scalars of committed epochs (``state["history"]`` rows and their timing):
    losses and accuracies on Training and PublicTest, learning rate, seconds and images per
    second. ``only_missing``: skip epochs whose file exists. Returns the epochs written."""
    if not available():
        return []
    seconds = {row["epoch"]: row for row in timing}
    written = []
    for row in history:
        path = epoch_file(model_dir, int(row["epoch"]))
        if only_missing and path.exists():
            continue
        values = {tag: float(row[key]) for tag, key in SCALARS.items() if key in row}
        if row["epoch"] in seconds:
            values["time/seconds_per_epoch"] = float(seconds[row["epoch"]]["seconds"])
            values["time/train_images_per_second"] = float(
                seconds[row["epoch"]]["images_per_second"])
        _event_file(path, [_scalar_event(int(row["epoch"]), values, time.time())])
        written.append(int(row["epoch"]))
    return written


def _png(fig) -> tuple[bytes, int, int]:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    from PIL import Image

    width, height = Image.open(io.BytesIO(buffer.getvalue())).size
    return buffer.getvalue(), width, height


def log_confusion_matrices(model_dir: Path, best_epoch: int, matrices: dict,
                           num_classes: int | None = None) -> Path | None:
    """Images of the confusion matrices (``{split name: (true labels, predicted labels)}``)
    of the best epoch's model, at that epoch's step; ``num_classes`` other than 7 (a
    fine-tuned head) shows numbered classes."""
    if not available():
        return None
    from tensorboard.compat.proto import event_pb2, summary_pb2

    from sklearn.metrics import confusion_matrix

    from ferlib import EMOTIONS, NUM_CLASSES
    from ferlib.plots import confusion_matrix_plot

    num_classes = num_classes or NUM_CLASSES
    names = EMOTIONS if num_classes == NUM_CLASSES else [f"class {k}" for k in range(num_classes)]
    values = []
    for split, (labels, predicted) in matrices.items():
        counts = confusion_matrix(labels, predicted, labels=range(num_classes))
        png, width, height = _png(confusion_matrix_plot(
            counts, names, title=f"{split}, best epoch {best_epoch}"))
        image = summary_pb2.Summary.Image(height=height, width=width, colorspace=4,
                                          encoded_image_string=png)
        values.append(summary_pb2.Summary.Value(tag=f"confusion_matrix/{split}", image=image))
    path = log_dir(model_dir) / "events.out.tfevents.2-best"
    _event_file(path, [event_pb2.Event(wall_time=time.time(), step=int(best_epoch),
                                       summary=summary_pb2.Summary(value=values))])
    return path


def log_graph(model_dir: Path, model, input_shape) -> Path | None:
    """The model's graph, where the backend has one: TensorFlow traces the model into a graph;
    JAX and PyTorch have no TensorBoard graph, and nothing is written."""
    import keras

    if not available() or keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    function = tf.function(lambda x: model(x, training=False))
    try:
        graph = function.get_concrete_function(
            tf.TensorSpec([1, *input_shape], tf.float32)).graph.as_graph_def()
    except Exception as error:  # noqa: BLE001  (a graph is a nicety; training goes on)
        print(f"TensorBoard: no model graph ({type(error).__name__}: {error})", flush=True)
        return None
    path = log_dir(model_dir) / "events.out.tfevents.0-graph"
    _event_file(path, [event_pb2.Event(wall_time=time.time(),
                                       graph_def=graph.SerializeToString())])
    return path


def read_scalars(model_dir: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in a model's logs, read back with TensorBoard's own
    loader (for tests and checks)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found = []
    for path in sorted(log_dir(model_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    found.append((value.tag, event.step, value.simple_value))
                elif value.HasField("tensor") and value.metadata.plugin_data.plugin_name == \
                        "scalars":
                    import numpy as np
                    from tensorboard.util import tensor_util

                    found.append((value.tag, event.step,
                                  float(np.asarray(tensor_util.make_ndarray(value.tensor)))))
    return found
