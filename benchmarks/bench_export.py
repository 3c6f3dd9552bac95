"""Benchmark ``export``: Keras vs ONNX Runtime vs LiteRT on this CPU, per quick-profile model.

Each model is built with the quick profile's ``model_params`` (untrained weights: speed does
not depend on them), saved, and exported with ``python -m ferlib export``'s code
(``ferlib.export.export_model``: the calibrated inference copy, parity checked on 256 synthetic
faces) to ONNX and LiteRT. Then, for Keras (the same inference copy, called directly), ONNX
Runtime and the LiteRT interpreter, on random uint8 images:

- single-image latency: median of ``LATENCY_CALLS`` calls on one image, after warm-up calls;
- batch throughput: images/s of one call on a batch of 256, median of ``BATCH_REPEATS`` calls.

Each runtime uses its defaults on this CPU (all cores; LiteRT with its XNNPACK delegate). A
runtime that is not installed is reported as missing, not measured (``pip install -e
.[export]``).

Run on its own (``python benchmarks/bench_export.py [--quick] [--models alexnet]``) it merges
its section into ``benchmarks/results.json`` (``--quick``: ``results-quick.json``), keeping the
other sections; ``run_all.py`` runs it with the others (``--only export``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import common

NAME = "export"
LATENCY_CALLS, QUICK_LATENCY_CALLS = 50, 10
WARMUP_CALLS = 5
BATCH_IMAGES = 256
BATCH_REPEATS, QUICK_BATCH_REPEATS = 5, 2
RUNTIMES = ("keras", "onnxruntime", "litert")


def build_saved_model(model_name: str, folder: Path) -> Path:
    """The quick profile's ``model_name`` (untrained), saved as ``folder/<name>.keras``."""
    from ferlib.models import build_model

    settings = common.quick_settings(model_name)
    model = build_model(model_name, augment=settings["augment"], seed=settings["seed"],
                        **settings["model_params"])
    path = folder / f"{model_name}.keras"
    model.save(path)
    return path


def _keras_runner(path: Path):
    import keras

    from ferlib.inference import load_model
    from ferlib.export import exportable_model

    model = exportable_model(load_model(path))
    return lambda images: keras.ops.convert_to_numpy(model(images, training=False))


def _onnx_runner(path: Path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def _litert_runner(path: Path):
    from ferlib.export import litert_interpreter

    interpreters = {}  # one per batch size: resizing reallocates every tensor

    def run(images):
        if len(images) not in interpreters:
            interpreter, _ = litert_interpreter(path)
            source = interpreter.get_input_details()[0]
            interpreter.resize_tensor_input(source["index"], list(images.shape))
            interpreter.allocate_tensors()
            interpreters[len(images)] = interpreter
        interpreter = interpreters[len(images)]
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    return run


def time_runner(run, quick: bool) -> dict:
    """Latency (one image) and throughput (a batch of 256) of ``run(images)``."""
    import numpy as np

    single = common.random_images(1)
    batch = common.random_images(BATCH_IMAGES, seed=1)
    common.call_times(lambda: run(single), WARMUP_CALLS)
    latencies = common.call_times(lambda: run(single),
                                  QUICK_LATENCY_CALLS if quick else LATENCY_CALLS)
    run(batch)  # warm-up at this size
    batch_seconds = common.call_times(lambda: run(batch),
                                      QUICK_BATCH_REPEATS if quick else BATCH_REPEATS)
    return {"latency_ms": 1000 * common.median(latencies),
            "latency_ms_p10_p90": [1000 * float(q) for q in np.percentile(latencies, [10, 90])],
            "images_per_second": BATCH_IMAGES / common.median(batch_seconds)}


def measure_model(model_name: str, quick: bool, folder: Path) -> dict:
    """Export one model to ONNX and LiteRT and time the three runtimes."""
    import keras

    from ferlib import export

    keras.backend.clear_session()
    source = build_saved_model(model_name, folder)
    result = {"runtimes": {}, "parity": {}, "export_seconds": {}, "artifact_mb": {}}
    artifacts = {"keras": source}
    for fmt, runtime in (("onnx", "onnxruntime"), ("litert", "litert")):
        try:
            labels = export.export_model(source, folder / f"{model_name}-{fmt}", fmt,
                                         synthetic=True)
        except export.MissingDependencyError as error:
            result["runtimes"][runtime] = {"missing": str(error)}
            continue
        artifacts[runtime] = folder / f"{model_name}-{fmt}" / labels["artifact"]
        result["parity"][fmt] = {key: labels["parity"][key] for key in
                                 ("max_abs_diff", "top1_agreement", "passed", "data")}
        result["export_seconds"][fmt] = labels["exported"]["seconds"]
        result["artifact_mb"][fmt] = artifacts[runtime].stat().st_size / 1e6
        result.setdefault("versions", {})[runtime] = labels["exported"]["runtime"]
    runners = {"keras": _keras_runner, "onnxruntime": _onnx_runner, "litert": _litert_runner}
    for runtime in RUNTIMES:
        if runtime in artifacts:
            result["runtimes"][runtime] = time_runner(runners[runtime](artifacts[runtime]), quick)
    return result


def run(quick: bool = False, context: dict | None = None, models=None) -> dict:
    names = list(models or common.model_names())
    load = common.machine_load()
    with tempfile.TemporaryDirectory(prefix="ferlib-bench-export-") as folder:
        measured = {name: measure_model(name, quick, Path(folder)) for name in names}
    return {
        "settings": {"profile": common.PROFILE, "weights": "untrained (speed only)",
                     "model": "ferlib.export.exportable_model: calibrated inference copy, "
                              "uint8 (batch, 48, 48, 1) -> 7 probabilities",
                     "latency": f"median of {QUICK_LATENCY_CALLS if quick else LATENCY_CALLS}"
                                f" calls on 1 image, after {WARMUP_CALLS} warm-up calls",
                     "throughput": f"{BATCH_IMAGES} images / median seconds of "
                                   f"{QUICK_BATCH_REPEATS if quick else BATCH_REPEATS} calls "
                                   f"on one batch of {BATCH_IMAGES}",
                     "keras_call": "model(images, training=False), no predict() overhead",
                     "runtime_options": "defaults (all cores; LiteRT with XNNPACK)"},
        "machine_load": load,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "models": measured,
    }


def print_section(section: dict) -> None:
    rows = []
    for name, result in section["models"].items():
        keras = result["runtimes"].get("keras", {})
        for runtime in RUNTIMES:
            figures = result["runtimes"].get(runtime, {})
            fmt = {"onnxruntime": "onnx", "litert": "litert"}.get(runtime)
            parity = result["parity"].get(fmt, {}) if fmt else {}
            if "missing" in figures:
                rows.append([name, runtime, None, None, None, "not installed"])
                continue
            speedup = (keras["latency_ms"] / figures["latency_ms"]
                       if runtime != "keras" and keras else None)
            rows.append([name, runtime, figures["latency_ms"], speedup,
                         figures["images_per_second"],
                         "" if not parity else
                         f"max diff {parity['max_abs_diff']:.1e}, top-1 "
                         f"{parity['top1_agreement']:.0%}"])
    common.print_table(
        "export: Keras vs ONNX Runtime vs LiteRT, quick-profile models (untrained), this CPU",
        ["model", "runtime", "latency ms (1 image)", "x Keras", "img/s (batch 256)",
         "parity vs Keras"], rows)
    print(f"machine: {section['machine_load']['note']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer calls: a check that the benchmark works")
    parser.add_argument("--models", help="comma-separated subset of the models "
                                         "(default: all three)")
    parser.add_argument("--output", type=Path, help="JSON file to merge the section into "
                                                    "(default: results.json, or "
                                                    "results-quick.json with --quick)")
    args = parser.parse_args(argv)
    models = [name.strip() for name in args.models.split(",")] if args.models else None
    common.run_on_its_own(NAME, run, print_section, args.quick, args.output, models=models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
