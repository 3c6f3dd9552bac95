"""Benchmark ``pipeline``: does moving augmentation out of the model into an overlapped
``tf.data`` pipeline pay for itself on this CPU? Per model of the ``full`` profile, at its
batch size, training images/s of:

- **in-graph** (what ferlib trains today): the augmentation layers are part of the model and
  run inside each training step, on in-memory uint8 arrays;
- **tf.data overlap**: the same model without its augmentation layers, fed by
  ``tf.data`` that shuffles, batches, augments with the very same ``ferlib.models.Augmentation``
  layer (``num_parallel_calls=AUTOTUNE``) and prefetches, so the next batch is augmented while
  the current one trains;
- **no augmentation**: the model without augmentation on the arrays, the ceiling for both.

All three in one run, interleaved, best of a few one-epoch fits on random images.
``--pause-training`` pauses a running ``ferlib train`` meanwhile (see ``common.py``). Run on its
own: ``python benchmarks/bench_pipeline.py [--quick] [--pause-training]``; it merges its section
into ``benchmarks/results.json``.
"""

from __future__ import annotations

import argparse

import bench_train
import common

NAME = "pipeline"
PROFILE = "full"
TIMED_BATCHES, QUICK_TIMED_BATCHES = 12, 3
REPEATS, QUICK_REPEATS = 3, 1


def measure(name: str, quick: bool) -> dict:
    import copy

    import keras
    import tensorflow as tf

    from ferlib.models import Augmentation
    from ferlib.train import compile_model, prepare_backend, build_for_settings

    keras.backend.clear_session()
    settings = common.quick_settings(name, PROFILE)
    prepare_backend(settings)
    plain_settings = copy.deepcopy(settings)
    plain_settings["augment"] = {key: (False if isinstance(value, bool) else 0.0)
                                 for key, value in settings["augment"].items()}
    models = {"in_graph": build_for_settings(settings),
              "tf_data": build_for_settings(plain_settings),
              "none": build_for_settings(plain_settings)}
    for model in models.values():
        compile_model(model, settings)
    batch = settings["train"]["batch_size"]
    count = batch * (QUICK_TIMED_BATCHES if quick else TIMED_BATCHES)
    images, targets = common.random_training_data(count)

    augmentation = Augmentation(settings["augment"], settings["seed"])

    def augment(x, y):
        x = augmentation(tf.cast(x, "float32") / 255.0, training=True)
        return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), "uint8"), y

    dataset = (tf.data.Dataset.from_tensor_slices((images, targets)).shuffle(count)
               .batch(batch).map(augment, num_parallel_calls=tf.data.AUTOTUNE)
               .prefetch(tf.data.AUTOTUNE))
    feeds = {"in_graph": (images, targets), "tf_data": (dataset, None), "none": (images, targets)}
    for variant, model in models.items():  # warm-up: builds the train functions
        x, y = feeds[variant]
        bench_train.fit_images_per_second(model, x, y, batch)
    rates = {variant: [] for variant in models}
    for _ in range(QUICK_REPEATS if quick else REPEATS):
        for variant, model in models.items():
            rates[variant].append(bench_train.fit_images_per_second(model, *feeds[variant],
                                                                    batch))
    best = {variant: max(values) for variant, values in rates.items()}
    return {"batch_size": batch, "images_per_second": best, "all_images_per_second": rates,
            "tf_data_speedup": best["tf_data"] / best["in_graph"],
            "augmentation_cost_percent": 100 * (1 - best["in_graph"] / best["none"])}


def run(quick: bool = False, context: dict | None = None, pause_training: bool = False) -> dict:
    with common.paused_training(pause_training) as paused:
        load = common.machine_load(paused)
        models = {name: measure(name, quick) for name in common.model_names()}
    return {"settings": {"profile": PROFILE, "data": "random uint8 (N, 48, 48, 1)",
                         "statistic": f"best of {QUICK_REPEATS if quick else REPEATS} "
                                      f"interleaved one-epoch fits"},
            "machine_load": load, "models": models}


def print_section(section: dict) -> None:
    rows = [[name, r["batch_size"], r["images_per_second"]["in_graph"],
             r["images_per_second"]["tf_data"], r["images_per_second"]["none"],
             r["tf_data_speedup"], r["augmentation_cost_percent"]]
            for name, r in section["models"].items()]
    common.print_table(f"pipeline: training img/s, augmentation in the model vs in tf.data "
                       f"({section['machine_load']['note']})",
                       ["model", "batch", "in-graph", "tf.data overlap", "no augmentation",
                        "tf.data speed-up", "augmentation cost %"], rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pause-training", action="store_true",
                        help="pause a running ferlib training during the benchmark")
    args = parser.parse_args()
    common.run_on_its_own(NAME, run, print_section, args.quick,
                          pause_training=args.pause_training)
