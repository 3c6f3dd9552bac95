"""Benchmark ``frameworks``: where a training step's time goes, and ferlib against bare Keras
and plain PyTorch, per model of the ``full`` profile (its batch sizes and optimizers).

For each model, in this one run:

- **ferlib**: the model as ``ferlib.train`` builds it (uint8 input, stem, augmentation),
  fitted with ``model.fit``; and the **bare** network (``keras.applications.ResNet50V2``,
  ``keras_hub`` ViT, the AlexNet-style layers) without ferlib's stem, fitted the same way.
- **per-step profile** of ferlib's model: forward (training mode), forward + backward
  (``GradientTape``), and the whole step with the optimizer, each a ``tf.function`` on one
  batch; what ``fit`` adds on top (callbacks, data adapter, metrics) is the rest of its step.
  Validation (``predict`` of PublicTest at batch 256, as training does every epoch) is timed
  too, so an epoch's time splits into its parts.
- **PyTorch** (only when ``torch`` is installed; it is not a project dependency): the same
  network written in plain PyTorch (``torch_models.py``, same parameter count), trained by a
  plain loop (AdamW, label-smoothed cross-entropy), NCHW and, for the CNNs, channels-last;
  the same per-step phases.

Keras and PyTorch run in separate child processes, one after the other. Every figure is the
best of a few timed repeats. ``--pause-training`` pauses a running ``ferlib train`` for the
benchmark (SIGSTOP/SIGCONT) so the machine is quiet without stopping the run. Run it on its
own (``python benchmarks/bench_frameworks.py [--quick] [--pause-training]``); it merges its
section into ``benchmarks/results.json``.
"""

from __future__ import annotations

import argparse
import importlib.util

import common

NAME = "frameworks"
PROFILE = "full"
TIMED_BATCHES, QUICK_TIMED_BATCHES = 10, 2
WARMUP_BATCHES = 2
REPEATS, QUICK_REPEATS = 3, 1
VALIDATION_IMAGES, TRAIN_IMAGES = 3589, 28709  # PublicTest and Training of FER2013
PREDICT_BATCH = 256  # ferlib.train.predict_proba
# The goal: no model slower than the fastest framework; within 5% counts as level
# (repeated runs on these shared machines differ by about that much).
SLOWER_LIMIT_PERCENT = 5.0


def _settings(name: str) -> dict:
    return common.quick_settings(name, PROFILE)


def _best_ms_per_call(function, calls: int, repeats: int) -> float:
    """Best over ``repeats`` of the mean milliseconds of ``calls`` calls (after one warm-up)."""
    function()
    return 1000 * min(common.seconds_of(lambda: [function() for _ in range(calls)]) / calls
                      for _ in range(repeats))


# ----------------------------------------------------------------------------- Keras child

def keras_child(quick: bool) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    import bench_train
    from ferlib.train import compile_model, build_for_settings

    batches = QUICK_TIMED_BATCHES if quick else TIMED_BATCHES
    repeats = QUICK_REPEATS if quick else REPEATS
    results = {}
    for name in common.model_names():
        keras.backend.clear_session()
        model, settings = common.build_quick_model(name, profile=PROFILE)
        bare, _ = bench_train.without_stem(build_for_settings(settings))
        compile_model(bare, settings)
        batch = settings["train"]["batch_size"]
        count = batch * batches
        images, targets = common.random_training_data(count)
        bare_images = common.random_images(count, channels=3, dtype="float32")
        warm = batch * WARMUP_BATCHES
        fits = {"ferlib": (model, images), "bare": (bare, bare_images)}
        for fitted, x in fits.values():
            bench_train.fit_images_per_second(fitted, x[:warm], targets[:warm], batch)
        rates = {variant: max(bench_train.fit_images_per_second(fitted, x, targets, batch)
                              for _ in range(repeats))
                 for variant, (fitted, x) in fits.items()}

        x, y = tf.constant(images[:batch]), tf.constant(targets[:batch])
        variables = model.trainable_variables

        def loss_of(x, y):
            return model.compute_loss(x=x, y=y, y_pred=model(x, training=True))

        @tf.function
        def forward(x, y):
            return tf.reduce_sum(model(x, training=True))

        @tf.function
        def forward_backward(x, y):
            with tf.GradientTape() as tape:
                loss = loss_of(x, y)
            gradients = tape.gradient(loss, variables)
            return tf.add_n([tf.reduce_sum(g) for g in gradients])

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_of(x, y)
            model.optimizer.apply(tape.gradient(loss, variables), variables)
            return loss

        phases = {phase: _best_ms_per_call(lambda f=function: f(x, y).numpy(), batches, repeats)
                  for phase, function in (("forward", forward),
                                          ("forward_backward", forward_backward),
                                          ("step", step))}
        validation = common.random_images(min(VALIDATION_IMAGES, 4 * PREDICT_BATCH))
        model.predict(validation[:PREDICT_BATCH], batch_size=PREDICT_BATCH, verbose=0)
        predict_seconds = min(common.seconds_of(lambda: model.predict(
            validation, batch_size=PREDICT_BATCH, verbose=0)) for _ in range(repeats))
        results[name] = {
            "batch_size": batch, "parameters": int(model.count_params()),
            "trainable_parameters": int(sum(np.prod(v.shape) for v in variables)),
            "images_per_second": rates["ferlib"], "bare_images_per_second": rates["bare"],
            "phases_ms": {**phases, "fit": 1000 * batch / rates["ferlib"]},
            "predict_images_per_second": len(validation) / predict_seconds,
        }
    return {"tensorflow": tf.__version__, "keras": keras.__version__, "models": results}


# ----------------------------------------------------------------------------- PyTorch child

def torch_child(quick: bool) -> dict:
    import numpy as np
    import torch

    import torch_models

    torch.manual_seed(0)
    batches = QUICK_TIMED_BATCHES if quick else TIMED_BATCHES
    repeats = QUICK_REPEATS if quick else REPEATS
    results = {}
    # torch_models has twins of alexnet, resnet50v2 and vit only; the others (vit_conv) are
    # measured in Keras alone.
    for name in [name for name in common.model_names() if name in torch_models.REGISTRY]:
        settings = _settings(name)
        train = settings["train"]
        batch = train["batch_size"]
        layouts = ["nchw"] + (["channels_last"] if name != "vit" else [])
        entry = {"batch_size": batch, "layouts": {}}
        for layout in layouts:
            model = torch_models.build(name, settings["model_params"]).train()
            memory = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            model = model.to(memory_format=memory)
            optimizer = torch.optim.AdamW(model.parameters(), lr=train["learning_rate"],
                                          weight_decay=train["weight_decay"])
            loss_function = torch.nn.CrossEntropyLoss(label_smoothing=train["label_smoothing"])
            count = batch * batches
            images = torch.from_numpy(np.moveaxis(common.random_images(
                count, channels=3, dtype="float32"), -1, 1).copy()).to(memory_format=memory)
            labels = torch.from_numpy(common.random_labels(count, one_hot=False))

            def train_batch(x, y):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_function(model(x), y)
                loss.backward()
                optimizer.step()
                return loss

            def epoch():  # a plain training loop over in-memory tensors, shuffled
                order = torch.randperm(count)
                for start in range(0, count, batch):
                    index = order[start:start + batch]
                    train_batch(images[index], labels[index])

            x, y = images[:batch], labels[:batch]

            def forward():
                return model(x).sum().item()

            def forward_backward():
                model.zero_grad(set_to_none=True)
                loss_function(model(x), y).backward()

            epoch()  # warm-up
            seconds = min(common.seconds_of(epoch) for _ in range(repeats))
            phases = {phase: _best_ms_per_call(function, batches, repeats)
                      for phase, function in (("forward", forward),
                                              ("forward_backward", forward_backward),
                                              ("step", lambda: train_batch(x, y).item()))}
            entry["layouts"][layout] = {"images_per_second": count / seconds,
                                        "phases_ms": phases}
            entry["parameters"] = torch_models.parameter_count(model)
        best = max(entry["layouts"], key=lambda k: entry["layouts"][k]["images_per_second"])
        entry.update(best_layout=best, **entry["layouts"][best])
        results[name] = entry
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "models": results}


# ----------------------------------------------------------------------------- parent

def _child(kind: str, quick: bool) -> dict:
    # Keras and PyTorch each get a fresh process, so neither one's thread pools or memory
    # weigh on the other; the Keras child profiles with tf.function, hence TensorFlow.
    return common.run_child(__file__, [kind], quick, backend="tensorflow",
                            what=f"the {kind} child")


def epoch_split(result: dict) -> dict:
    """Seconds of one full-size epoch (Training + PublicTest validation) by part, from the
    per-step phases: forward, backward, optimizer, fit's own work, validation."""
    phases, batch = result["phases_ms"], result["batch_size"]
    steps = TRAIN_IMAGES // batch + bool(TRAIN_IMAGES % batch)
    parts_ms = {"forward": phases["forward"],
                "backward": phases["forward_backward"] - phases["forward"],
                "optimizer": phases["step"] - phases["forward_backward"],
                "fit_overhead": phases["fit"] - phases["step"]}
    split = {part: steps * ms / 1000 for part, ms in parts_ms.items()}
    split["validation"] = VALIDATION_IMAGES / result["predict_images_per_second"]
    split["total"] = sum(split.values())
    return split


def run(quick: bool = False, context: dict | None = None, pause_training: bool = False) -> dict:
    with common.paused_training(pause_training) as paused:
        load = common.machine_load(paused)
        keras_results = _child("keras", quick)
        has_torch = importlib.util.find_spec("torch") is not None
        torch_results = _child("torch", quick) if has_torch else None
    models, checks = {}, {}
    for name, result in keras_results["models"].items():
        entry = {"ferlib": result, "epoch_seconds_by_part": epoch_split(result)}
        rates = {"ferlib (Keras/TF)": result["images_per_second"],
                 "bare Keras/TF": result["bare_images_per_second"]}
        if torch_results and name in torch_results["models"]:
            entry["torch"] = torch_results["models"][name]
            rates[f"PyTorch ({entry['torch']['best_layout']})"] = \
                entry["torch"]["images_per_second"]
        fastest = max(rates, key=rates.get)
        slower = 100 * (1 - result["images_per_second"] / rates[fastest])
        entry.update(images_per_second=rates, fastest=fastest,
                     ferlib_slower_than_fastest_percent=slower)
        models[name] = entry
        checks[f"{name}_slower_than_fastest_percent"] = common.check(
            max(slower, 0.0), SLOWER_LIMIT_PERCENT, "%")
    return {
        "settings": {"profile": PROFILE, "timed_batches": QUICK_TIMED_BATCHES if quick
                     else TIMED_BATCHES, "repeats": QUICK_REPEATS if quick else REPEATS,
                     "statistic": "best of the repeats",
                     "data": "random images; ferlib uint8 (N, 48, 48, 1), bare and PyTorch "
                             "float32 RGB",
                     "torch": "not installed" if torch_results is None else
                              f"{torch_results['torch']}, {torch_results['threads']} threads"},
        "machine_load": load,
        "versions": {"tensorflow": keras_results["tensorflow"],
                     "keras": keras_results["keras"],
                     "torch": torch_results["torch"] if torch_results else None},
        "models": models,
        "checks": checks,
    }


def print_section(section: dict) -> None:
    rows = []
    for name, entry in section["models"].items():
        rates = entry["images_per_second"]
        torch_rate = next((v for k, v in rates.items() if k.startswith("PyTorch")), None)
        rows.append([name, entry["ferlib"]["batch_size"], rates["ferlib (Keras/TF)"],
                     rates["bare Keras/TF"], torch_rate, entry["fastest"],
                     entry["ferlib_slower_than_fastest_percent"],
                     common.verdict(section["checks"][f"{name}_slower_than_fastest_percent"])])
    common.print_table(f"frameworks: training img/s, full-profile models "
                       f"({section['settings']['statistic']}; {section['machine_load']['note']})",
                       ["model", "batch", "ferlib", "bare Keras", "PyTorch", "fastest",
                        "ferlib slower %", "target"], rows)
    rows = []
    for name, entry in section["models"].items():
        phases = entry["ferlib"]["phases_ms"]
        torch_phases = entry.get("torch", {}).get("phases_ms", {})
        for framework, p in (("ferlib", phases), ("PyTorch", torch_phases)):
            if p:
                rows.append([name, framework, p["forward"],
                             p["forward_backward"] - p["forward"],
                             p["step"] - p["forward_backward"], p.get("fit")])
    common.print_table("per-step profile (ms per batch): forward, backward, optimizer, and the "
                       "whole fit step", ["model", "framework", "forward", "backward",
                                          "optimizer", "fit step"], rows)
    rows = [[name, *(entry["epoch_seconds_by_part"][part] for part in (
        "forward", "backward", "optimizer", "fit_overhead", "validation", "total"))]
        for name, entry in section["models"].items()]
    common.print_table("one full-size epoch (28,709 Training + 3,589 PublicTest images), "
                       "seconds by part", ["model", "forward", "backward", "optimizer",
                                           "fit overhead", "validation", "total"], rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=("keras", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pause-training", action="store_true",
                        help="pause a running ferlib training during the benchmark")
    args = parser.parse_args()
    if args.child:
        child = keras_child if args.child == "keras" else torch_child
        common.print_for_parent(child(args.quick))
    else:
        common.run_on_its_own(NAME, run, print_section, args.quick,
                              pause_training=args.pause_training)
