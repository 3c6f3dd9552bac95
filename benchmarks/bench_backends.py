"""Benchmark ``backends``: training images/s of each quick-profile model under each Keras
backend on this CPU (TensorFlow, JAX, and PyTorch when installed).

A backend is fixed when Keras is first imported, so each backend is measured in its own child
process (this file run with ``--child BACKEND``), one after the other within this one run. Each
child builds the models exactly as ``ferlib.train`` does for the quick profile and reports the
best of a few timed one-epoch fits on random images (``bench_train.fit_images_per_second``).
A backend that is not installed is reported as such, not measured.

Run on its own (``python benchmarks/bench_backends.py [--quick]``) it merges its section into
``benchmarks/results.json`` (``--quick``: ``results-quick.json``); ``run_all.py --only
backends`` runs it with the others.
"""

from __future__ import annotations

import argparse
import importlib.util

import common

NAME = "backends"
BACKENDS = ("tensorflow", "jax", "torch")
FASTER_BY_PERCENT = 15.0  # the README names a backend only when it wins by at least this much


def installed(backend: str) -> bool:
    return importlib.util.find_spec(backend) is not None


def child(quick: bool) -> dict:
    """In a process whose KERAS_BACKEND is already set: images/s per model."""
    import keras

    import bench_train

    rates = {}
    for name in common.model_names():
        keras.backend.clear_session()
        model, settings = common.build_quick_model(name)
        batch_size = settings["train"]["batch_size"]
        batches = bench_train.QUICK_TIMED_BATCHES if quick else bench_train.TIMED_BATCHES
        images, targets = common.random_training_data(batch_size * batches)
        warmup = batch_size * bench_train.WARMUP_BATCHES
        bench_train.fit_images_per_second(model, images[:warmup], targets[:warmup], batch_size)
        repeats = bench_train.QUICK_REPEATS if quick else bench_train.REPEATS
        measured = [bench_train.fit_images_per_second(model, images, targets, batch_size)
                    for _ in range(repeats)]
        rates[name] = {"images_per_second": max(measured), "all_images_per_second": measured,
                       "batch_size": batch_size}
    return {"backend": keras.backend.backend(), "keras": keras.__version__, "models": rates}


def run(quick: bool = False, context: dict | None = None, backends=BACKENDS,
        pause_training: bool = False) -> dict:
    """Measure ``backends`` (default: all three) one after the other. A backend left out keeps
    its entry from the results file's previous section, marked ``"carried over"`` with the
    time it was measured; verdicts compare only the backends measured in this run."""
    with common.paused_training(pause_training) as paused:
        load = common.machine_load(paused)
        results = _measure(quick, backends)
    measured_now = {backend: result for backend, result in results.items()
                    if result["status"] == "measured"}
    earlier = common.read_section(NAME, quick)
    previous, when = earlier.get("backends", {}), earlier.get("machine", {}).get("time")
    for backend in BACKENDS:
        if backend not in results and backend in previous:
            old = previous[backend]
            results[backend] = {**old, "carried_over": old.get("carried_over") or
                                f"measured in an earlier run ({when})"}
    return _section(results, measured_now, load)


def _measure(quick: bool, backends) -> dict:
    results = {}
    for backend in backends:
        if not installed(backend):
            results[backend] = {"status": f"not installed (pip install {backend})"}
            continue
        try:
            measured = common.run_child(__file__, [backend], quick, backend=backend,
                                        what=f"the {backend} child")
        except common.ChildFailed as error:  # one backend failing must not lose the others
            results[backend] = {"status": "failed", "error": error.stderr_tail}
            continue
        results[backend] = {"status": "measured", **measured}
    return results


def _section(results: dict, measured: dict, load: dict) -> dict:
    verdicts = {}
    for name in common.model_names():
        rates = {backend: result["models"][name]["images_per_second"]
                 for backend, result in measured.items()}
        if "tensorflow" in rates and len(rates) > 1:
            best = max(rates, key=rates.get)
            gain = 100.0 * (rates[best] / rates["tensorflow"] - 1.0)
            verdicts[name] = {"fastest": best, "percent_over_tensorflow": gain,
                              "clearly_faster": best != "tensorflow" and gain >= FASTER_BY_PERCENT}
    return {"settings": {"profile": common.PROFILE, "data": "random uint8 (N, 48, 48, 1)",
                         "statistic": "best of the timed one-epoch fits per model (bench_train)",
                         "order": "one child process per backend, one after the other",
                         "faster_by_percent": FASTER_BY_PERCENT},
            "machine_load": load, "backends": results, "verdicts": verdicts}


def print_section(section: dict) -> None:
    names = common.model_names()
    rows = []
    for backend, result in section["backends"].items():
        if result["status"] != "measured":
            rows.append([backend, *([None] * len(names)), result["status"]])
            continue
        rows.append([backend, *(result["models"][name]["images_per_second"] for name in names),
                     f"Keras {result['keras']}" + (f"; {result['carried_over']}"
                                                    if result.get("carried_over") else "")])
    common.print_table("backends: training img/s per model on this CPU",
                       ["backend", *names, "note"], rows)
    for name, verdict in section["verdicts"].items():
        print(f"  {name}: fastest {verdict['fastest']} "
              f"({verdict['percent_over_tensorflow']:+.0f}% vs tensorflow)"
              + ("  <- clearly faster" if verdict["clearly_faster"] else ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                        help="measure only these; the others keep their earlier figures")
    parser.add_argument("--pause-training", action="store_true",
                        help="pause a running ferlib training during the benchmark")
    args = parser.parse_args()
    if args.child:
        common.print_for_parent(child(args.quick))
    else:
        common.run_on_its_own(NAME, run, print_section, args.quick, backends=args.backends,
                              pause_training=args.pause_training)
