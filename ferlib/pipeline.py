"""The study runner: execute the notebooks in order with papermill, render HTML, write the index.

``report(profile)`` runs ``01_eda``, ``02_preprocess``, ``03_train`` once per model and
``04_compare`` into ``runs/<profile>/notebooks/``, renders each to ``reports/<profile>/`` and
writes ``reports/<profile>/index.html``. A step is skipped when its executed notebook and HTML
exist and its inputs (resolved params, notebook, dataset, upstream results) are unchanged, so a
rerun is fast and an interrupted training continues from its last completed epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import re
import sys
import time
from pathlib import Path

from ferlib.config import PROJECT_ROOT, load_params, parse_overrides, resolve_data_path
from ferlib.runs import (atomic_write_text, environment, fingerprint, read_json, run_dir as
                         default_run_dir, write_json, write_yaml)

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
REPORTS_DIR = PROJECT_ROOT / "reports"


class StepFailed(RuntimeError):
    """A notebook failed; the message names it and where its partial executed copy is."""


def plan(params: dict) -> list[tuple[str, str, dict]]:
    """(step name, notebook file, extra parameters) in execution order."""
    steps = [("01_eda", "01_eda.ipynb", {}), ("02_preprocess", "02_preprocess.ipynb", {})]
    steps += [(f"03_train_{name}", "03_train.ipynb", {"model": name})
              for name in params["models"]]
    steps.append(("04_compare", "04_compare.ipynb", {}))
    return steps


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _step_inputs(params, notebook: Path, data_hash: str, upstream: list[str], run: Path) -> str:
    # Upstream results (e.g. each model's metrics.json) feed the compare step.
    upstream_digests = {name: _file_digest(run / name) if (run / name).exists() else None
                        for name in upstream}
    return fingerprint({"params": params, "notebook": _file_digest(notebook),
                        "data": data_hash, "upstream": upstream_digests})


# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) says nothing about the study.
BACKEND_NOISE = re.compile(r"^(?:[IWE]\d{4} [\d:.]+ +\d+ \S+\] |WARNING: All log messages "
                           r"before absl|To enable the following instructions|"
                           r".*TqdmWarning: IProgress not found|\s+from \.autonotebook)")


def render_html(notebook_path: Path, html_path: Path) -> None:
    """Render an executed notebook to standalone HTML (figures embedded, code hidden)."""
    import nbformat
    from nbconvert import HTMLExporter

    notebook = nbformat.read(notebook_path, as_version=4)
    for cell in notebook.cells:
        outputs = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                kept = [line for line in output["text"].splitlines(keepends=True)
                        if not BACKEND_NOISE.match(line)]
                if not "".join(kept).strip():
                    continue
                output["text"] = "".join(kept)
            outputs.append(output)
        if "outputs" in cell:
            cell["outputs"] = outputs
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, embed_images=True)
    body, _ = exporter.from_notebook_node(notebook)
    atomic_write_text(html_path, body)


class _QuietStream:
    """Forward a stream but drop the backend's start-up chatter, line by line."""

    def __init__(self, stream):
        self.stream, self.pending = stream, ""

    def write(self, text: str) -> int:
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            if not BACKEND_NOISE.match(line):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def execute(step: str, notebook: Path, output: Path, parameters: dict) -> None:
    """Run one notebook with papermill, streaming its output (minus backend noise)."""
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stderr(_QuietStream(sys.stderr)), \
            contextlib.redirect_stdout(_QuietStream(sys.stdout)):
        try:
            papermill.execute_notebook(str(notebook), str(output), parameters=parameters,
                                       log_output=True, progress_bar=False,
                                       cwd=str(NOTEBOOKS_DIR), kernel_name="python3")
        except papermill.PapermillExecutionError as error:
            raise StepFailed(f"step {step} failed in {notebook.name}, cell {error.exec_count}: "
                             f"{error.ename}: {error.evalue}\n"
                             f"The partially executed notebook is {output}; earlier artifacts "
                             f"are kept, rerun to resume.") from error


def report(profile: str = "quick", *, overrides: list[str] | None = None,
           run_root: str | None = None, reports_root: str | None = None,
           force: bool = False) -> int:
    """Run the whole study for a profile and render its reports. Returns an exit code.

    Parameters
    ----------
    profile : str
        ``params/<profile>.yaml`` (or a path to a YAML file).
    overrides : list of str
        ``key.path=value`` overrides, as on the command line.
    run_root, reports_root : str, optional
        Folders holding ``<profile>/`` run directories and report folders (default ``runs/``
        and ``reports/`` under the project).
    force : bool
        Re-execute every step even if its inputs are unchanged.
    """
    overrides = list(overrides or [])
    params = load_params(profile, parse_overrides(overrides))
    name = params["profile"]
    run = default_run_dir(name, Path(run_root) if run_root else None)
    reports = Path(reports_root or REPORTS_DIR) / name
    data_path = resolve_data_path(params["data"]["path"])  # clear error if missing
    from ferlib.data import source_hash

    started = time.time()
    data_hash = source_hash(data_path)
    run.mkdir(parents=True, exist_ok=True)
    write_yaml(run / "params.yaml", params)
    steps = plan(params)
    timings = {}
    say = lambda text: print(f"[report {name}] {text}", flush=True)  # noqa: E731
    say(f"{len(steps)} steps; run directory {run}; reports {reports}")
    for index, (step, notebook_name, extra) in enumerate(steps, start=1):
        notebook = NOTEBOOKS_DIR / notebook_name
        executed = run / "notebooks" / f"{step}.ipynb"
        html_file = reports / f"{step}.html"
        # A train step's report depends on its model's results (which may have been trained
        # outside the pipeline, e.g. with `ferlib train` or on a GPU box); compare on all.
        upstream = ([f"models/{m}/metrics.json" for m in params["models"]]
                    if step == "04_compare" else
                    [f"models/{extra['model']}/metrics.json"] if "model" in extra else [])
        marker = run / "steps" / f"{step}.json"
        inputs = _step_inputs(params, notebook, data_hash, upstream, run)
        done = read_json(marker, {})
        if not force and done.get("inputs") == inputs and executed.exists() \
                and html_file.exists():
            say(f"({index}/{len(steps)}) {step}: up to date, skipped")
            timings[step] = done.get("seconds")
            continue
        say(f"({index}/{len(steps)}) {step}: running {notebook_name}"
            + (f" with {extra}" if extra else ""))
        step_started = time.time()
        try:
            execute(step, notebook, executed, {"profile": str(profile), "run_dir": str(run),
                                               "overrides": overrides, **extra})
        except StepFailed as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1
        render_html(executed, html_file)
        seconds = time.time() - step_started
        timings[step] = seconds
        # The compare step's inputs include the models' results, read again after training.
        write_json(marker, {"inputs": _step_inputs(params, notebook, data_hash, upstream, run),
                            "seconds": seconds})
        say(f"({index}/{len(steps)}) {step}: done in {seconds / 60:.1f} min -> {html_file}")

    write_json(run / "manifest.json", {
        "profile": name, "seed": params["seed"], "data": {"path": str(data_path),
                                                          "sha256": data_hash},
        "steps": [s for s, _, _ in steps], "step_seconds": timings,
        "wall_seconds": time.time() - started, "environment": environment(),
        "preprocess": read_json(run / "data_summary.json")})
    write_index(params, run, reports, steps)
    say(f"done in {(time.time() - started) / 60:.1f} min: open {reports / 'index.html'}")
    return 0


def write_index(params: dict, run: Path, reports: Path, steps) -> None:
    """``index.html``: the headline table (from the compare step) and links to every report."""
    import pandas as pd

    summary_file = run / "compare" / "summary.csv"
    table = "<p>(no comparison yet)</p>"
    if summary_file.exists():
        table = pd.read_csv(summary_file).to_html(index=False, border=0, classes="results",
                                                  na_rep="")
    links = "\n".join(f'<li><a href="{html.escape(step)}.html">{html.escape(step)}</a></li>'
                      for step, _, _ in steps)
    description = html.escape(params.get("description") or "")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>FER2013 study: {params['profile']}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table.results{{border-collapse:collapse}} table.results td,table.results th{{padding:4px 10px;
border-bottom:1px solid #ddd;text-align:right}}</style></head><body>
<h1>FER2013 study: ViT vs ResNet50V2 vs AlexNet-style CNN &mdash; profile <code>{
        params['profile']}</code></h1>
<p>{description}</p>
<h2>Headline (PrivateTest, 95% bootstrap CIs) next to the paper's claims</h2>
{table}
<p>Models were selected on PublicTest only; PrivateTest was scored once at the end.</p>
<h2>Reports</h2><ul>
{links}
</ul>
<p>Run directory: <code>{html.escape(str(run))}</code> (params.yaml, manifest.json, models/).</p>
</body></html>
"""
    atomic_write_text(reports / "index.html", page)
