"""Benchmark ``inference``: single-image latency and batch throughput per quick-profile model.

Models are built as ``ferlib.train`` builds them (untrained weights:
speed does not depend on them) and fed random uint8 images.

Run by ``run_all.py`` (``--only inference``); it has no command line of its own.
"""

from __future__ import annotations

import common

NAME = "inference"
LATENCY_CALLS, QUICK_LATENCY_CALLS = 30, 5
WARMUP_CALLS = 3
BATCH_IMAGES, QUICK_BATCH_IMAGES = 1024, 256
PREDICT_BATCH_SIZE = 256


def measure_model(model_name: str, quick: bool) -> dict:
    import keras
    import numpy as np

    keras.backend.clear_session()
    model, _ = common.build_quick_model(model_name)
    single = common.random_images(1)

    def classify_one():
        # Reading the logits back waits for them on asynchronous backends.
        keras.ops.convert_to_numpy(model(single, training=False))

    common.call_times(classify_one, WARMUP_CALLS)
    latencies = common.call_times(classify_one, QUICK_LATENCY_CALLS if quick else LATENCY_CALLS)

    batch = common.random_images(QUICK_BATCH_IMAGES if quick else BATCH_IMAGES, seed=1)

    def predict(images):
        model.predict(images, batch_size=PREDICT_BATCH_SIZE, verbose=0)

    predict(batch[:PREDICT_BATCH_SIZE])  # builds the predict function
    seconds = common.seconds_of(lambda: predict(batch))
    return {"latency_ms": 1000 * common.median(latencies),
            "latency_ms_p10_p90": [1000 * float(q) for q in np.percentile(latencies, [10, 90])],
            "images_per_second": len(batch) / seconds}


def run(quick: bool = False, context: dict | None = None) -> dict:
    batch_images = QUICK_BATCH_IMAGES if quick else BATCH_IMAGES
    return {
        "settings": {"profile": common.PROFILE,
                     "latency": f"median of {QUICK_LATENCY_CALLS if quick else LATENCY_CALLS} "
                                f"calls model(x, training=False), x uint8 (1, 48, 48, 1), after "
                                f"{WARMUP_CALLS} warm-up calls",
                     "throughput": f"model.predict on {batch_images} uint8 images, batch "
                                   f"{PREDICT_BATCH_SIZE}, after a warm-up predict"},
        "models": {name: measure_model(name, quick) for name in common.model_names()},
    }


def print_section(section: dict) -> None:
    common.print_table(
        "inference: quick-profile models (untrained), random uint8 images",
        ["model", "latency ms (1 image)", "predict img/s"],
        [[name, result["latency_ms"], result["images_per_second"]]
         for name, result in section["models"].items()])
