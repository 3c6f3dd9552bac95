"""Benchmark ``gpu``: what each profile's models cost per epoch on the machine it runs on,
meant for a lent GPU under Keras' JAX backend (``KERAS_BACKEND=jax``; no TensorFlow needed).

For each case (a profile's model, plus the paper's models at 224 px, the input size of the
ImageNet-pretrained originals) the model is built and compiled exactly as ``ferlib.train``
builds it and fitted on random 48x48 uint8 images at the profile's batch size, in float32 and,
on a GPU, in ``mixed_bfloat16``. Reported: training images/s (best of ``REPEATS`` timed fits
after a compiling warm-up), the seconds one FER2013 Training epoch (28,709 images) would take,
and the hours of the profile's epoch cap, and of 5-fold cross-validation at that cap for the
paper's cases. Validation passes are not counted (they add about a sixth).

Cases run in order until ``--budget-seconds`` is spent; the rest are listed as skipped. The
results file is rewritten after each case, so a run cut short keeps what it measured.

Usage: ``KERAS_BACKEND=jax python benchmarks/bench_gpu.py [--quick] [--output PATH]
[--budget-seconds S]``. Without ``--output`` it merges its section into
``benchmarks/results.json``. ``run_all.py`` runs it only where Keras sees a GPU (on a CPU its
full and paper cases would take hours); ``gpu_check.sh`` runs it on a lent GPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common

NAME = "gpu"
TRAINING_IMAGES = 28_709  # FER2013's official Training split
PAPER_FOLDS = 5
REPEATS, QUICK_REPEATS = 2, 1
MIN_TIMED_SECONDS = 2.0  # a timed fit covers at least this long (more batches on fast devices)
# (label, profile, model, model_params overrides, precision), in the order they are measured:
# most wanted first, since a budget may cut the list short. mixed_bfloat16 runs on GPUs only.
PAPER_224 = {"resnet50v2": {"input_size": 224}, "vit": {"input_size": 224, "patch_size": 16}}
CASES = (
    [("full", "full", name, {}, "float32") for name in ("alexnet", "resnet50v2", "vit")]
    + [("paper at 224 px", "paper", name, PAPER_224[name], "mixed_bfloat16")
       for name in ("resnet50v2", "vit")]
    + [("paper", "paper", name, {}, "mixed_bfloat16") for name in ("resnet50v2", "vit")]
    + [("full", "full", name, {}, "mixed_bfloat16") for name in ("alexnet", "resnet50v2", "vit")]
    + [("paper at 224 px", "paper", name, PAPER_224[name], "float32")
       for name in ("resnet50v2", "vit")]
    + [("paper", "paper", name, {}, "float32") for name in ("alexnet", "resnet50v2", "vit")]
    + [("paper", "paper", "alexnet", {}, "mixed_bfloat16")]
)
QUICK_CASES = [("smoke", "smoke", name, {}, precision) for name in ("alexnet", "resnet50v2", "vit")
               for precision in ("float32", "mixed_bfloat16")]


def accelerator() -> str:
    """The first device Keras' backend computes on, in words (``cpu`` when it has none)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.platform}: {device.device_kind} (x{jax.device_count()})"
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return f"gpu: {gpus[0].name} (x{len(gpus)})" if gpus else "cpu"
    return keras.backend.backend()


def measure(profile: str, model_name: str, overrides: dict, precision: str,
            repeats: int) -> dict:
    import keras
    import numpy as np

    import bench_train

    keras.backend.clear_session()
    model, settings = common.build_quick_model(model_name, precision, profile, overrides)
    batch_size = settings["train"]["batch_size"]
    label_stream = np.random.default_rng(1)  # one stream: each fit below gets its own labels

    def data(batches: int):
        return common.random_training_data(batch_size * batches, label_seed=label_stream)

    started = time.perf_counter()
    bench_train.fit_images_per_second(model, *data(3), batch_size)  # compiles
    compile_seconds = time.perf_counter() - started
    probe = bench_train.fit_images_per_second(model, *data(5), batch_size)
    batches = max(5, min(400, int(MIN_TIMED_SECONDS * probe / batch_size) + 2))
    images, targets = data(batches)
    rate = max(bench_train.fit_images_per_second(model, images, targets, batch_size)
               for _ in range(repeats))
    epoch_seconds = TRAINING_IMAGES / rate
    cap = settings["train"]["epochs"]
    return {"images_per_second": round(rate, 1), "batch_size": batch_size,
            "timed_batches": batches, "parameters": int(model.count_params()),
            "input_size": settings["model_params"].get("input_size", 48),
            "first_fit_seconds": round(compile_seconds, 1),
            # Keras turns jit_compile off (with a warning) when a layer cannot be compiled; under
            # JAX that means an op-by-op step (TensorFlow without it still runs a graph)
            "jit_compile": bool(getattr(model, "jit_compile", False)),
            "training_epoch_seconds": round(epoch_seconds, 1), "epoch_cap": cap,
            "hours_at_cap": round(epoch_seconds * cap / 3600, 3)}


def run(quick: bool = False, context: dict | None = None, results_file: Path | None = None,
        budget_seconds: float = float("inf")) -> dict:
    """Measure the cases in order until ``budget_seconds`` is spent. Run on its own, the
    section is merged into ``results_file`` after each case; under ``run_all.py`` (a
    ``context``) only with an explicit ``results_file``, since run_all writes its own output
    after each benchmark and the default file may not be that output."""
    import keras

    device = accelerator()
    precisions = ["float32"] + (["mixed_bfloat16"] if device.startswith("gpu") else [])
    section = {"backend": keras.backend.backend(), "device": device, "rows": [],
               "skipped": [],
               "budget_seconds": None if budget_seconds == float("inf") else budget_seconds}
    started = time.perf_counter()
    for label, profile, model_name, overrides, precision in (QUICK_CASES if quick else CASES):
        case = {"case": label, "profile": profile, "model": model_name,
                "overrides": overrides, "precision": precision}
        if precision not in precisions:
            section["skipped"].append({**case, "why": "bfloat16 is measured on GPUs only"})
            continue
        if time.perf_counter() - started > budget_seconds:
            section["skipped"].append({**case, "why": "budget spent"})
            continue
        try:
            case.update(measure(profile, model_name, overrides, precision,
                                QUICK_REPEATS if quick else REPEATS))
            if profile == "paper":
                case["hours_5_fold_cv"] = round(case["hours_at_cap"] * PAPER_FOLDS, 2)
        except Exception as error:  # a case that cannot run (memory) must not lose the rest
            case["error"] = f"{type(error).__name__}: {error}"[:500]
        section["rows"].append(case)
        print_row(case)
        if context is None or results_file is not None:
            common.merge_section(NAME, dict(section), quick, results_file)
    return section


def print_row(case: dict) -> None:
    if "error" in case:
        print(f"{case['case']:>16} {case['model']:>10} {case['precision']:>14}  "
              f"error: {case['error'][:200]}", flush=True)
        return
    print(f"{case['case']:>16} {case['model']:>10} {case['precision']:>14} "
          f"{case['images_per_second']:>9.0f} img/s  {case['training_epoch_seconds']:>7.1f} "
          f"s/epoch  {case['hours_at_cap']:>6.2f} h at {case['epoch_cap']} epochs  "
          f"(first fit {case['first_fit_seconds']:.0f} s"
          f"{'' if case.get('jit_compile', True) else ', jit_compile off'})", flush=True)


def print_section(section: dict) -> None:
    rows = [[r["case"], r["model"], r["precision"], r.get("images_per_second"),
             r.get("training_epoch_seconds"), r.get("hours_at_cap"), r.get("hours_5_fold_cv"),
             r.get("error", "")[:60]] for r in section["rows"]]
    if not rows:
        print("no case was measured")
    else:
        common.print_table(f"Training cost on {section['device']} ({section['backend']})",
                           ["case", "model", "precision", "img/s", "s/epoch", "h at cap",
                            "h 5-fold", "error"], rows)
    for case in section["skipped"]:
        print(f"skipped: {case['case']} {case['model']} {case['precision']} ({case['why']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the smoke profile's tiny models, one repeat: a check, not figures")
    parser.add_argument("--output", type=Path, help="results file (default: benchmarks/"
                        "results.json, or results-quick.json with --quick)")
    parser.add_argument("--budget-seconds", type=float, default=float("inf"),
                        help="start no case after this many seconds")
    options = parser.parse_args()
    common.run_on_its_own(NAME, run, print_section, options.quick, options.output,
                          results_file=options.output, budget_seconds=options.budget_seconds)


if __name__ == "__main__":
    main()
