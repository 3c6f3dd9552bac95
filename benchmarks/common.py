"""The one harness of the benchmark scripts: timing, the quick profile's models, random
images and labels, child processes that report one JSON line, tables, and the results file.

The scripts in ``benchmarks/`` are run as files (``python benchmarks/run_all.py``), so this
module is imported by its plain name; it must be imported before Keras (it quiets TensorFlow's
start-up logging).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCHMARKS_DIR = Path(__file__).resolve().parent
PROFILE = "quick"


# ----------------------------------------------------------------------------- timing

def seconds_of(function) -> float:
    """Wall-clock seconds of one call of ``function()``."""
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def call_times(function, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``function()``."""
    return [seconds_of(function) for _ in range(repeats)]


def median(values) -> float:
    return float(statistics.median(values))


# ----------------------------------------------------------------------------- models

def quick_settings(model_name: str, profile: str = PROFILE) -> dict:
    """The settings ``ferlib.train`` would use for ``model_name`` in the quick profile (or
    another ``profile``)."""
    from ferlib.config import load_params, model_settings

    return model_settings(load_params(profile), model_name)


def build_quick_model(model_name: str, precision: str | None = None, profile: str = PROFILE,
                      overrides: dict | None = None):
    """(compiled model, settings) exactly as ``ferlib.train`` builds it for the quick profile
    or another ``profile`` (optionally with another ``train.precision``, e.g.
    ``mixed_bfloat16``, and ``overrides`` on the model's hyperparameters)."""
    from ferlib.train import compile_model, prepare_backend, build_for_settings

    settings = quick_settings(model_name, profile)
    settings["model_params"].update(overrides or {})
    if precision:
        settings["train"]["precision"] = precision
    prepare_backend(settings)  # seed and precision policy, as in training
    model = build_for_settings(settings)
    compile_model(model, settings)
    return model, settings


def random_images(count: int, seed: int = 0, channels: int = 1, dtype: str = "uint8"):
    """Random images ``(count, 48, 48, channels)``: uint8 pixels, or float32 in [-1, 1]."""
    import numpy as np

    from ferlib.models import IMAGE_SIZE

    rng = np.random.default_rng(seed)
    shape = (count, IMAGE_SIZE, IMAGE_SIZE, channels)
    if dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.uniform(-1.0, 1.0, size=shape).astype(dtype)


def random_labels(count: int, seed=1, one_hot: bool = True):
    """Random class labels for timing fits (their values do not change the speed).

    Parameters
    ----------
    count : int
        Number of labels.
    seed : int or numpy.random.Generator
        A seed, or a generator to draw successive sets from one stream.
    one_hot : bool
        float32 one-hot targets ``(count, NUM_CLASSES)``, as ``model.fit`` takes them in
        ``ferlib.train``; otherwise int64 class indices ``(count,)`` (PyTorch's losses).
    """
    import numpy as np

    from ferlib import NUM_CLASSES

    # default_rng returns a Generator it is given unaltered, so a stream keeps advancing.
    labels = np.random.default_rng(seed).integers(0, NUM_CLASSES, size=count)
    return np.eye(NUM_CLASSES, dtype="float32")[labels] if one_hot else labels


def random_training_data(count: int, label_seed=1, channels: int = 1, dtype: str = "uint8"):
    """``(images, targets)`` to time training on: :func:`random_images` (seed 0) and one-hot
    :func:`random_labels` (``label_seed``), the data every training benchmark fits."""
    return (random_images(count, channels=channels, dtype=dtype),
            random_labels(count, label_seed))


def model_names() -> tuple[str, ...]:
    """The paper's three models: the figures in benchmarks/results.json are theirs."""
    from ferlib import PAPER_MODELS

    return PAPER_MODELS


# ----------------------------------------------------------------------------- child processes
# Some settings are fixed when a library starts (Keras' backend, TensorFlow's thread pools), so a
# benchmark that compares them runs itself once per setting in a fresh interpreter
# (``script --child ARG... [--quick]``). The child prints its result as the last line of its
# standard output (:func:`print_for_parent`); what the libraries log before it is ignored.

CHILD_ERROR_CHARACTERS = 2000  # the end of a failed child's stderr: its traceback


class ChildFailed(RuntimeError):
    """A benchmark's child process failed; ``stderr_tail`` holds the end of its stderr."""

    def __init__(self, what: str, problem: str, stderr_tail: str):
        super().__init__(f"{what} {problem}:\n{stderr_tail}")
        self.stderr_tail = stderr_tail


def run_child(script, arguments=(), quick: bool = False, backend: str = "tensorflow",
              what: str = "child process") -> dict:
    """Run ``script --child ARGUMENTS [--quick]`` under Keras backend ``backend`` and return
    the JSON object on the last line of its standard output.

    Raises
    ------
    ChildFailed
        When the child exits with an error or prints no JSON line; ``what`` names it.
    """
    command = [sys.executable, str(script), "--child", *arguments] + (["--quick"] if quick
                                                                      else [])
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    # cwd: the child imports its helpers (common, bench_train) by their plain names.
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=BENCHMARKS_DIR)
    tail = done.stderr.strip()[-CHILD_ERROR_CHARACTERS:]
    if done.returncode:
        raise ChildFailed(what, f"failed (exit {done.returncode})", tail)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise ChildFailed(what, "printed nothing on its standard output", tail)
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        raise ChildFailed(what, f"did not end its output with a JSON line (last line: "
                                f"{lines[-1][:200]!r})", tail) from None


def print_for_parent(result: dict) -> None:
    """The child's side of :func:`run_child`: ``result`` as the last line of standard output."""
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- output

def check(value: float | None, limit: float, unit: str) -> dict:
    """A target ``value <= limit``, with its verdict."""
    passed = value is not None and value <= limit
    return {"value": value, "target": f"<= {limit:g} {unit}".strip(), "passed": passed}


def verdict(result: dict | None) -> str:
    if not result:
        return ""
    return f"{'PASS' if result['passed'] else 'FAIL'} ({result['target']})"


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    """Print ``rows`` under ``headers`` in aligned columns (numbers to the right)."""
    def text(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.0f}"
        return str(value)

    cells = [[text(value) for value in row] for row in rows]
    widths = [max(len(str(h)), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
               for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w)
                         for v, w, n in zip(values, widths, numeric)).rstrip()

    print(f"\n{title}")
    print(line([str(h) for h in headers]))
    print(line(["-" * w for w in widths]))
    for row in cells:
        print(line(row))


def merge_section(name: str, section: dict, quick: bool, output: Path | None = None) -> Path:
    """Write one benchmark's ``section`` into ``results.json`` (``results-quick.json`` when
    ``quick``), keeping the file's other sections: for a benchmark run on its own. The section
    gets its own machine description, as it may be newer than the others."""
    from ferlib.runs import environment, read_json, write_json

    output = output or BENCHMARKS_DIR / ("results-quick.json" if quick else "results.json")
    section["machine"] = environment()
    section["quick"] = quick
    results = read_json(output, {})
    results[name] = section
    write_json(output, results)
    print(f"\nwrote the '{name}' section of {output}")
    return output


def read_section(name: str, quick: bool, output: Path | None = None) -> dict:
    """A benchmark's section of the results file as last written (empty if none)."""
    from ferlib.runs import read_json

    output = output or BENCHMARKS_DIR / ("results-quick.json" if quick else "results.json")
    return read_json(output, {}).get(name, {})


def machine_load(paused: list[int] | None = None) -> dict:
    """The 1-minute load average against the core count, taken when a benchmark starts, and a
    plain-words note: a busy machine makes absolute figures pessimistic (compare within a run).
    The average lags: work stopped a few seconds earlier still counts, so a benchmark that
    paused a training (:func:`paused_training`) passes its process ids and the note says so."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if paused:
        note = (f"quiet: the background training (process {', '.join(map(str, paused))}) was "
                f"paused (SIGSTOP) for the benchmark; the lagging 1-minute load average was "
                f"{load:.1f} on {cores} cores at the start")
    elif load > 0.5 * cores:
        note = (f"busy: load {load:.1f} on {cores} cores when the benchmark started; absolute "
                f"figures are pessimistic, compare within this run")
    else:
        note = f"quiet: load {load:.1f} on {cores} cores when the benchmark started"
    return {"load_average_1min": round(load, 2), "cpu_count": cores,
            "paused_training_pids": paused or [], "note": note}


def training_pids() -> list[int]:
    """Process ids of running ``python -m ferlib train`` / ``report`` commands (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            words = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        for index, word in enumerate(words[:-2]):
            if word == "-m" and words[index + 1] == "ferlib" and words[index + 2] in (
                    "train", "report"):
                pids.append(int(entry.name))
                break
    return sorted(pids)


@contextmanager
def paused_training(enabled: bool = True, settle_seconds: float = 3.0,
                    pids: list[int] | None = None):
    """Pause (SIGSTOP) any running ferlib training (or the given ``pids``) for the duration,
    then resume it (SIGCONT, also on errors and Ctrl-C), so a benchmark measures a quiet
    machine without stopping a long run. Yields the paused process ids (empty when ``enabled``
    is false or none runs). A resumable training loses nothing; the epoch that was paused
    reports a longer time."""
    pids = (training_pids() if pids is None else list(pids)) if enabled else []
    stopped = []
    try:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            except ProcessLookupError:
                pass
        if stopped:
            print(f"paused training process(es) {stopped} for the benchmark", flush=True)
            time.sleep(settle_seconds)
        yield stopped
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if stopped:
            print(f"resumed training process(es) {stopped}", flush=True)


def run_on_its_own(name: str, run, print_section, quick: bool, output: Path | None = None,
                   **options) -> dict:
    """A benchmark run as a script: time ``run(quick, **options)``, print its section and
    merge it into the results file (:func:`merge_section`)."""
    started = time.perf_counter()
    section = run(quick=quick, **options)
    section["benchmark_seconds"] = time.perf_counter() - started
    print_section(section)
    merge_section(name, section, quick, output)
    return section
