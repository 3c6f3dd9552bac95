"""Benchmark ``speed``: the easy CPU wins for training, per quick-profile model.

- batch size: training images/s at batch 32, 64 (the profiles' default), 128 and 256;
- TensorFlow threads: intra-op / inter-op thread counts (0 = TensorFlow's default), each
  setting in its own child process (threads are fixed when TensorFlow starts).

Every figure is the best of a few one-epoch fits on random images (``bench_train``), measured
in this one run. Run on its own (``python benchmarks/bench_speed.py [--quick]``) it merges its
section into ``benchmarks/results.json``; ``run_all.py --only speed`` runs it with the others.
"""

from __future__ import annotations

import argparse
import json

import common

NAME = "speed"
BATCH_SIZES = (32, 64, 128, 256)
THREADS = ((0, 0), (2, 1), (1, 2), (2, 2))  # (intra-op, inter-op); 0 = TensorFlow's default
IMAGES, QUICK_IMAGES = 1280, 256


def fit_rate(model_name: str, batch_size: int, images: int, repeats: int) -> float:
    import keras

    import bench_train

    keras.backend.clear_session()
    model, settings = common.build_quick_model(model_name)
    count = max(images, 3 * batch_size)
    x, y = common.random_training_data(count)
    bench_train.fit_images_per_second(model, x[:2 * batch_size], y[:2 * batch_size], batch_size)
    return max(bench_train.fit_images_per_second(model, x, y, batch_size)
               for _ in range(repeats))


def child(quick: bool, threads: tuple[int, int], batch_sizes) -> dict:
    import tensorflow as tf

    intra, inter = threads
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    images, repeats = (QUICK_IMAGES, 1) if quick else (IMAGES, 3)
    return {name: {str(size): fit_rate(name, size, images, repeats) for size in batch_sizes}
            for name in common.model_names()}


def _run_child(quick: bool, threads, batch_sizes) -> dict:
    # TensorFlow fixes its thread pools when it starts: one process per thread setting.
    return common.run_child(__file__, [json.dumps([list(threads), list(batch_sizes)])], quick,
                            backend="tensorflow",
                            what=f"the child with threads (intra, inter) = {tuple(threads)}")


def run(quick: bool = False, context: dict | None = None) -> dict:
    load = common.machine_load()
    batches = _run_child(quick, THREADS[0], BATCH_SIZES)
    threads = {f"intra {intra}, inter {inter}": (batches if (intra, inter) == THREADS[0] else
                                                _run_child(quick, (intra, inter), (64,)))
               for intra, inter in THREADS}
    threads = {setting: {name: rates["64"] for name, rates in result.items()}
               for setting, result in threads.items()}
    best_batch = {name: max(rates, key=rates.get) for name, rates in batches.items()}
    return {"settings": {"profile": common.PROFILE, "data": "random uint8 (N, 48, 48, 1)",
                         "images_per_fit": QUICK_IMAGES if quick else IMAGES,
                         "statistic": "best of the timed one-epoch fits (bench_train)",
                         "threads": "0 = TensorFlow's default (all cores)"},
            "machine_load": load, "batch_size": batches, "threads_at_batch_64": threads,
            "fastest_batch_size": best_batch}


def print_section(section: dict) -> None:
    names = list(section["batch_size"])
    common.print_table("speed: training img/s by batch size (TensorFlow default threads)",
                       ["model", *(f"batch {size}" for size in BATCH_SIZES)],
                       [[name, *(section["batch_size"][name][str(size)]
                                 for size in BATCH_SIZES)] for name in names])
    common.print_table("speed: training img/s at batch 64 by thread setting",
                       ["threads", *names],
                       [[setting, *(rates[name] for name in names)]
                        for setting, rates in section["threads_at_batch_64"].items()])
    print(f"machine: {section['machine_load']['note']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.child:
        threads, sizes = json.loads(args.child)
        common.print_for_parent(child(args.quick, tuple(threads), sizes))
    else:
        common.run_on_its_own(NAME, run, print_section, args.quick)
