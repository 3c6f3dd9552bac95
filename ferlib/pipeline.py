"""The study runner: execute the notebooks in order with papermill, render HTML, write the index.

``report(profile)`` runs ``01_eda``, ``02_preprocess``, ``03_train`` once per model and
``04_compare`` into ``runs/<profile>/notebooks/``, renders each to ``reports/<profile>/`` and
writes ``reports/<profile>/index.html``. A step is skipped when its executed notebook and HTML
exist and its inputs (resolved params, notebook, the ``ferlib`` code it runs, dataset, upstream
results) are unchanged, so a rerun is fast and an interrupted training continues from its last
completed epoch.

Rendered pages are meant to be committed: each starts with a provenance header (profile,
dataset hash, commit, versions, machine, date), and every output is scrubbed of this machine's
paths and of library start-up noise before export.
"""

from __future__ import annotations

import contextlib
import functools
import html
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from ferlib import MODEL_NAMES, PROJECT_ROOT, artifacts
from ferlib.artifacts import Run
from ferlib.config import load_params, parse_overrides, record_path
from ferlib.data import file_sha256, resolve_data_path
from ferlib.runs import (atomic_write_bytes, atomic_write_text, code_hash, environment,
                         remove_dead_temporaries,
                         fingerprint, provenance, read_json, run_dir as default_run_dir,
                         write_json, write_yaml)

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
REPORTS_DIR = PROJECT_ROOT / "reports"
PACKAGE_DIR = Path(__file__).resolve().parent

STEPS_WITHOUT_NOTEBOOK_IMPORTS = ("__init__", "pipeline")
"""Modules every step depends on besides what its notebook imports: the package's constants
and this runner (it scrubs and renders every page)."""


class StepFailed(RuntimeError):
    """A notebook failed; the message names it and where its partial executed copy is."""


def plan(params: dict) -> list[tuple[str, str, dict]]:
    """(step name, notebook file, extra parameters) in execution order."""
    steps = [("01_eda", "01_eda.ipynb", {}), ("02_preprocess", "02_preprocess.ipynb", {})]
    steps += [(f"03_train_{name}", "03_train.ipynb", {"model": name})
              for name in params["models"]]
    steps.append(("04_compare", "04_compare.ipynb", {}))
    steps.append(("05_cross", "05_cross.ipynb", {}))
    return steps


def _imported_ferlib_modules(tree) -> set[str]:
    """``ferlib`` modules named by the imports of a parsed module or notebook cell."""
    return {name for name in _import_candidates(tree) if (PACKAGE_DIR / f"{name}.py").exists()}


def _import_candidates(tree) -> set[str]:
    """Every name an import of ``tree`` could mean as a ``ferlib`` module, unchecked:
    ``ferlib.X`` and ``from ferlib import X`` give ``X`` (a module, or a constant such as
    ``EMOTIONS``, which the caller drops for having no file)."""
    import ast

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "ferlib":
                found.update([parts[1]] if len(parts) > 1 else
                             (alias.name for alias in node.names))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "ferlib" and len(parts) > 1:
                    found.add(parts[1])
    return found


@functools.lru_cache(maxsize=256)
def _source_import_candidates(path: str, mtime_ns: int, size: int) -> frozenset[str]:
    """:func:`_import_candidates` of one source file, parsed once per version of the file
    (keyed by its modification time and size): a fingerprint walks every module's imports
    for every step, and parsing was most of the time of a ``make report`` that only renders."""
    import ast

    return frozenset(_import_candidates(ast.parse(Path(path).read_text())))


def module_closure(modules) -> tuple[str, ...]:
    """``modules`` and every ``ferlib`` module they import, at the top or inside functions,
    transitively (read from their source with ``ast``; nothing is imported)."""
    pending, seen = list(modules), set()
    while pending:
        name = pending.pop()
        source = PACKAGE_DIR / f"{name}.py"
        if name in seen or not source.exists():
            continue
        seen.add(name)
        stat = source.stat()
        # names without a file (constants such as EMOTIONS) are dropped when popped, above
        pending.extend(_source_import_candidates(str(source), stat.st_mtime_ns, stat.st_size)
                       - seen)
    return tuple(sorted(seen))


def step_modules(notebook_name: str) -> tuple[str, ...]:
    """The ``ferlib`` modules whose source is part of a notebook's step fingerprint: what its
    code cells import and what those import in turn (:func:`module_closure`), plus
    ``STEPS_WITHOUT_NOTEBOOK_IMPORTS``. Derived, not listed: a new import is covered at once.

    Parameters
    ----------
    notebook_name : str
        Notebook file or stem (``"03_train.ipynb"``, ``"03_train"``).

    Returns
    -------
    tuple of str
        Module names (``"train"``...), sorted.
    """
    import ast

    import nbformat

    path = NOTEBOOKS_DIR / f"{Path(notebook_name).stem}.ipynb"
    if not path.exists():
        available = ", ".join(sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb")))
        raise ValueError(f"notebook {notebook_name!r}: no file {path}; expected one of "
                         f"{available}")
    notebook = nbformat.read(path, as_version=4)
    imported = set(STEPS_WITHOUT_NOTEBOOK_IMPORTS)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            source = "\n".join(line for line in cell.source.splitlines()
                               if not line.lstrip().startswith(("%", "!")))
            imported |= _imported_ferlib_modules(ast.parse(source))
    return module_closure(imported)


def step_artifacts(params: dict, step: str, extra: dict) -> dict[str, list[str]]:
    """The run files (relative to the run directory) a step reads and writes.

    ``reads`` are what its page shows and so part of its fingerprint: a train step shows its
    model's results (which may have been trained outside the pipeline, e.g. with ``ferlib
    train`` or on a GPU box), the compare step every model's, the preprocessing step the
    recipe searches. ``writes`` say where a step's own files go (a trailing ``/``: a folder). With ``cv_folds`` set, a model's result is its
    cross-validation summary.
    """
    run = Run(Path("."))

    def results(models):
        return [run.result_file(model, params.get("cv_folds")).as_posix() for model in models]

    if step == "01_eda":
        return {"reads": [], "writes": [artifacts.EDA]}
    if step == "02_preprocess":
        records = [record_path(params, model) for model in params["search"]["space"]
                   if model in MODEL_NAMES] if params["search"].get("record") else []
        return {"reads": [artifacts.SEARCH_STORAGE] + [str(path) for path in records],
                "writes": [artifacts.SPLIT, artifacts.DATA_SUMMARY]
                + ([artifacts.FOLDS] if params.get("cv_folds") else [])}
    if step.startswith("03_train"):
        model = extra["model"]
        return {"reads": results([model]),
                "writes": [run.model(model).directory.as_posix() + "/",
                           run.mean_maps(model).as_posix()]}
    if step == "04_compare":
        return {"reads": results(params["models"]),
                "writes": [(run.compare / name).as_posix()
                           for name in artifacts.COMPARE_TABLES.values()]}
    if step == "05_cross":
        return {"reads": results(params["models"]),
                "writes": ["cross/"] + [(run.model(model).directory / file).as_posix()
                                        for model in params["models"]
                                        for file in (artifacts.CROSS_DATASET,
                                                     artifacts.MODEL_CARD)]}
    raise ValueError(f"step {step!r}: unknown; expected one of 01_eda, 02_preprocess, "
                     f"03_train_<model>, 04_compare, 05_cross")


def upstream_results(params: dict, step: str, extra: dict) -> list[str]:
    """What a step reads (:func:`step_artifacts`): the inputs of its fingerprint."""
    return step_artifacts(params, step, extra)["reads"]


def _file_digest(path: Path) -> str:
    return file_sha256(path)[:16]


def _step_inputs(params, notebook: Path, data_hash: str, upstream: list[str], run: Path) -> str:
    """Fingerprint of everything a step's output depends on (see ``report``)."""
    upstream_digests = {name: _file_digest(run / name) if (run / name).exists() else None
                        for name in upstream}
    return fingerprint({"params": params, "notebook": _file_digest(notebook),
                        "code": code_hash(*step_modules(notebook.name)),
                        "data": data_hash, "upstream": upstream_digests})


# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) and the warnings libraries raise
# from their own code say nothing about the study (and quote this machine's paths).
BACKEND_NOISE = re.compile(
    r"^(?:[IWE]\d{4} [\d:.]+ +\d+ \S+\] |WARNING: All log messages before absl|"
    r"To enable the following instructions|.*TqdmWarning: IProgress not found|"
    r"\s+from \.autonotebook|"
    # tf.function retracing advice: about TensorFlow's graph cache, not about the study.
    r"WARNING:tensorflow:.*triggered tf\.function retracing|"
    # "/.../site-packages/keras/src/x.py:12: UserWarning: ...", then the quoted source line.
    r"(?P<python_warning>.*(?:site|dist)-packages/\S+:\d+: \w*Warning\b)|"
    # "WARNING:tensorflow:From /.../site-packages/...: f is deprecated ...", then
    # "Instructions for updating:" and one line of advice.
    r"(?P<deprecation>WARNING:\w+:From \S*(?:site|dist)-packages/))")


class NoiseFilter:
    """Line by line: drop backend noise and library warnings with the lines that go with them."""

    def __init__(self):
        self.expect = None  # what may follow the line just dropped

    def keep(self, line: str) -> bool:
        expect, self.expect = self.expect, None
        if expect == "source" and line[:1] in (" ", "\t") and line.strip():
            return False
        if expect == "instructions" and line.startswith("Instructions for updating:"):
            self.expect = "advice"
            return False
        if expect == "advice":
            return False
        match = BACKEND_NOISE.match(line)
        if match is None:
            return True
        self.expect = ("source" if match.group("python_warning") else
                       "instructions" if match.group("deprecation") else None)
        return False


def drop_noise(text: str) -> str:
    """``text`` without backend start-up chatter and library warnings (``BACKEND_NOISE``)."""
    noise = NoiseFilter()
    return "".join(line for line in text.splitlines(keepends=True) if noise.keep(line))


def machine_paths(*, run: Path | None = None, reports: Path | None = None,
                  data_path: Path | None = None) -> dict[str, str]:
    """This machine's absolute paths and what a committed report shows in their place.

    Parameters
    ----------
    run : Path, optional
        The run directory, shown as ``runs/<profile>`` wherever it is.
    reports : Path, optional
        The report folder, shown as ``reports/<profile>`` wherever it is.
    data_path : Path, optional
        The dataset, shown relative to the project root, or by its name if outside.

    Returns
    -------
    dict
        Absolute path -> replacement, for ``scrub_text``. Always covers the project root
        (``.``), ``$FERLIB_CACHE``, the home folder (``~``) and the temp folders
        (``$TMPDIR``); both the given and the resolved spelling of each path.
    """
    paths: dict[str, str] = {}

    def add(path, shown: str) -> None:
        for spelling in (str(Path(path).expanduser()),
                         str(Path(path).expanduser().resolve())):
            if Path(spelling).is_absolute() and len(spelling) > 1:
                paths.setdefault(spelling, shown)

    if run is not None:
        add(run, f"runs/{Path(run).name}")
    if reports is not None:
        add(reports, f"reports/{Path(reports).name}")
    if data_path is not None:
        try:
            shown = Path(data_path).resolve().relative_to(PROJECT_ROOT).as_posix()
        except ValueError:
            shown = Path(data_path).name
        add(data_path, shown)
    if os.environ.get("FERLIB_CACHE"):
        add(os.environ["FERLIB_CACHE"], "$FERLIB_CACHE")
    add(PROJECT_ROOT, ".")
    with contextlib.suppress(RuntimeError, KeyError):  # no $HOME and no password entry
        add(Path.home(), "~")
    for temp in (tempfile.gettempdir(), "/tmp", "/var/tmp"):
        add(temp, "$TMPDIR")
    return paths


# Any spelling of a path into an installed package collapses to "site-packages/<package>".
_SITE_PACKAGES = re.compile(r"(?<![\w.+~/-])[\w.+~-]*(?:/[\w.+-]+)*/(?:site|dist)-packages/")
# Other people's home folders (e.g. in artifacts made on another machine).
_OTHER_HOMES = re.compile(r"(?<![\w.~-])/(?:home|Users)/[\w.-]+(?![\w.-])")


def _path_pattern(paths: dict[str, str]) -> re.Pattern | None:
    if not paths:
        return None
    # Longest first, so the run directory wins over the project root or /tmp above it; a
    # match must end at a path boundary ("/tmp" is not the start of "/tmpfoo").
    alternatives = "|".join(re.escape(path) for path in sorted(paths, key=len, reverse=True))
    return re.compile(rf"(?<![\w.~-])(?:{alternatives})(?![\w+-]|\.[\w-])")


def scrub_text(text: str, paths: dict[str, str], drop_warnings: bool = True) -> str:
    """Make an output shareable: no machine paths, no start-up noise or library warnings.

    Parameters
    ----------
    text : str
        A cell's output text (stream, ``text/plain``, ``text/html``, ``text/markdown``...).
    paths : dict
        ``machine_paths(...)``: absolute path -> what to show instead.
    drop_warnings : bool
        Also drop ``BACKEND_NOISE`` lines (backend chatter, warnings quoting site-packages).

    Returns
    -------
    str
        The text with the lines dropped, site-packages paths shortened to
        ``site-packages/...``, each path in ``paths`` replaced (longest first, one pass) and
        other users' home folders shown as ``~``.
    """
    if drop_warnings:
        text = drop_noise(text)
    text = _SITE_PACKAGES.sub("site-packages/", text)
    pattern = _path_pattern(paths)
    if pattern is not None:
        text = pattern.sub(lambda match: paths[match.group(0)], text)
    return _OTHER_HOMES.sub("~", text)


def _joined(value) -> str:
    return "".join(value) if isinstance(value, list) else value


def markdown_to_html(text: str) -> str:
    """Markdown as HTML with any raw HTML in it escaped: a notebook's Markdown outputs carry
    strings from parameters and data (profile names, file names, class names), and a ``<script>``
    among them must show as text. (nbconvert's ``sanitize_html`` was tried and mangles
    ordinary tables and headings in 7.17, so the outputs are rendered here with mistune, the
    Markdown library nbconvert itself uses, with ``escape=True``.)"""
    import mistune

    return mistune.create_markdown(escape=True, plugins=["table", "strikethrough"])(text)


def scrub_notebook(notebook, paths: dict[str, str]) -> None:
    """Scrub every output of an executed notebook in place (see ``scrub_text``).

    Consecutive stream outputs of one kind are merged first (so a warning and its quoted
    source line are seen together), and a stream left empty is removed. Markdown outputs
    become HTML with raw HTML escaped (:func:`markdown_to_html`).
    """
    text_types = ("text/plain", "text/html", "text/markdown", "text/latex")
    for cell in notebook.cells:
        if "outputs" not in cell:
            continue
        outputs = []
        for output in cell["outputs"]:
            kind = output.get("output_type")
            if kind == "stream":
                previous = outputs[-1] if outputs else None
                if previous is not None and previous.get("output_type") == "stream" \
                        and previous.get("name") == output.get("name"):
                    previous["text"] = _joined(previous["text"]) + _joined(output["text"])
                    continue
                output["text"] = _joined(output["text"])
            outputs.append(output)
        kept = []
        for output in outputs:
            kind = output.get("output_type")
            if kind == "stream":
                output["text"] = scrub_text(output["text"], paths)
                if not output["text"].strip():
                    continue
            elif kind in ("display_data", "execute_result"):
                data = output.get("data", {})
                for mime in text_types:
                    if mime in data:
                        data[mime] = scrub_text(_joined(data[mime]), paths,
                                                drop_warnings=mime == "text/plain")
                if "text/markdown" in data and "text/html" not in data:
                    data["text/html"] = markdown_to_html(data.pop("text/markdown"))
            elif kind == "error":
                output["evalue"] = scrub_text(output.get("evalue", ""), paths, False)
                output["traceback"] = [scrub_text(line, paths, False)
                                       for line in output.get("traceback", [])]
            kept.append(output)
        cell["outputs"] = kept


PAGE_STYLE = """
.ferlib-provenance{font:12px/1.6 sans-serif;color:#444;background:#f6f8fa;
  border:1px solid #d0d7de;border-radius:4px;padding:6px 10px;margin:0 0 1.5em}
.ferlib-provenance span{display:inline-block;margin-right:1.4em}
.ferlib-provenance code{font-size:11px}
/* Wide tables scroll inside their own box instead of running off the page. */
.jp-RenderedHTMLCommon table,div.output_html table,div.rendered_html table,table.results{
  display:block;overflow-x:auto;max-width:100%;width:max-content}
"""


def provenance_header(provenance: dict) -> str:
    """The box at the top of every page: what data, code, software and machine made it.

    Parameters
    ----------
    provenance : dict
        ``ferlib.runs.provenance(...)``.

    Returns
    -------
    str
        ``<div class="ferlib-provenance">...</div>``; long hashes are shortened with the full
        value in a ``title`` attribute.
    """
    def text(key: str, missing: str = "unknown") -> str:
        value = provenance.get(key)
        return html.escape(str(value) if value not in (None, "") else missing)

    sha = provenance.get("dataset_sha256") or ""
    commit = provenance.get("git_commit")
    commit_html = (f'<code title="{html.escape(commit)}">{html.escape(commit[:7])}</code>'
                   + (" dirty" if provenance.get("git_dirty") else "")
                   if commit else "<code>unknown</code>")
    items = [
        ("profile", f"<code>{text('profile')}</code>"),
        # A page made with --set differs from its profile file: it says so, and how.
        *((("overrides", ", ".join(f"<code>{html.escape(str(item))}</code>"
                                   for item in provenance["overrides"])),)
          if provenance.get("overrides") else ()),
        ("data", f"<code>{text('dataset')}</code> sha256 "
                 f'<code title="{html.escape(sha)}">{html.escape(sha[:12] or "unknown")}</code>'),
        ("commit", commit_html),
        ("software", f"TensorFlow {text('tensorflow', 'not installed')}, "
                     f"Keras {text('keras', 'not installed')} "
                     f"(backend {text('keras_backend')}), "
                     f"keras-hub {text('keras_hub', 'not installed')}"),
        *((("trained on", text("trained_on")),) if provenance.get("trained_on") else ()),
        ("rendered on", text("machine")),
        *((("training", text("training")),) if provenance.get("training") else ()),
        ("date", html.escape(str(provenance.get("date") or "unknown").replace("T", " "))),
    ]
    spans = "\n".join(f"<span><b>{label}</b> {value}</span>" for label, value in items)
    return f'<div class="ferlib-provenance">\n{spans}\n</div>\n'


def add_provenance(page: str, provenance: dict) -> str:
    """``page`` with ``PAGE_STYLE`` in its head and the provenance header first in its body."""
    style = f"<style>{PAGE_STYLE}</style>\n"
    page = page.replace("</head>", style + "</head>", 1) if "</head>" in page else style + page
    header = provenance_header(provenance)
    body = re.search(r"<body[^>]*>\s*(?:<main>\s*)?", page)
    if body is None:
        return header + page
    return page[:body.end()] + header + page[body.end():]


def render_html(notebook_path: Path, html_path: Path, provenance: dict,
                paths: dict[str, str] | None = None) -> None:
    """Render an executed notebook to standalone HTML (figures embedded, code hidden).

    Parameters
    ----------
    notebook_path : Path
        The executed notebook.
    html_path : Path
        Where the page goes (written atomically).
    provenance : dict
        ``ferlib.runs.provenance(...)``, shown in a header at the top of the page.
    paths : dict, optional
        ``machine_paths(...)`` for this run; default: the project root, home and temp folders.
    """
    import nbformat
    from nbconvert import HTMLExporter

    notebook = nbformat.read(notebook_path, as_version=4)
    scrub_notebook(notebook, machine_paths() if paths is None else paths)
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, embed_images=True)
    title = f"FER2013 study: {provenance.get('profile', '')} {Path(html_path).stem}"
    body, _ = exporter.from_notebook_node(notebook, resources={"metadata": {"name": title}})
    atomic_write_text(html_path, add_provenance(body, provenance))


class _QuietStream:
    """Forward a stream but drop the backend's start-up chatter, line by line."""

    def __init__(self, stream):
        self.stream, self.pending, self.noise = stream, "", NoiseFilter()

    def write(self, text: str) -> int:
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            if self.noise.keep(line):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def partial_notebook(output: Path) -> Path:
    """Where a step's notebook is executed: renamed to ``output`` only once it finished, so a
    step killed mid-notebook is never taken for a finished one."""
    return output.with_name(f"{output.stem}.partial{output.suffix}")


def execute(step: str, notebook: Path, output: Path, parameters: dict) -> None:
    """Run one notebook with papermill, streaming its output (minus backend noise)."""
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_notebook(output)
    with contextlib.redirect_stderr(_QuietStream(sys.stderr)), \
            contextlib.redirect_stdout(_QuietStream(sys.stdout)):
        try:
            papermill.execute_notebook(str(notebook), str(partial), parameters=parameters,
                                       log_output=True, progress_bar=False,
                                       cwd=str(NOTEBOOKS_DIR), kernel_name="python3")
        except papermill.PapermillExecutionError as error:
            raise StepFailed(f"step {step} failed in {notebook.name}, cell {error.exec_count}: "
                             f"{error.ename}: {error.evalue}\n"
                             f"The partially executed notebook is {partial}; earlier artifacts "
                             f"are kept, rerun to resume.") from error
    os.replace(partial, output)


def with_training_machine(origin: dict, run: Path, params: dict) -> dict:
    """``origin`` with ``trained_on``: where the run's models were trained, read from their
    results (``ferlib.artifacts.trained_on``), which may differ from the rendering machine in
    ``machine`` (a run trained on a lent GPU and rendered here)."""
    from ferlib.artifacts import trained_on

    return {**origin, "trained_on": trained_on(run, params["models"])}


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

    Notes
    -----
    A step's inputs are the resolved params, its notebook, the source of the ``ferlib``
    modules it runs (``step_modules``), the dataset's hash and the result files its report
    shows (``upstream_results``). Every page gets the same provenance header, computed once
    here and also saved in ``runs/<profile>/manifest.json``.
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
    env = environment()
    origin = provenance(params, data_path, data_hash, env)
    paths = machine_paths(run=run, reports=reports, data_path=data_path)
    if overrides:  # shown in every page's header, machine paths scrubbed like the pages
        origin["overrides"] = [scrub_text(item, paths) for item in overrides]
    run.mkdir(parents=True, exist_ok=True)
    for folder in (reports, run, run / "notebooks", run / "figures"):
        remove_dead_temporaries(folder)  # leftovers of a report killed mid-write
    files = Run(run)
    write_yaml(files.params, params)
    steps = plan(params)
    timings = {}
    say = lambda text: print(f"[report {name}] {text}", flush=True)  # noqa: E731
    say(f"{len(steps)} steps; run directory {run}; reports {reports}")
    for index, (step, notebook_name, extra) in enumerate(steps, start=1):
        notebook = NOTEBOOKS_DIR / notebook_name
        executed = run / "notebooks" / f"{step}.ipynb"
        html_file = reports / f"{step}.html"
        with files.step_lock(step):  # one writer per step: a second report exits, naming it
            upstream = upstream_results(params, step, extra)
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
            render_html(executed, html_file, with_training_machine(origin, run, params), paths)
            seconds = time.time() - step_started
            timings[step] = seconds
            # The compare step's inputs include the models' results, read again after training.
            write_json(marker, {"inputs": _step_inputs(params, notebook, data_hash, upstream, run),
                                "seconds": seconds})
            say(f"({index}/{len(steps)}) {step}: done in {seconds / 60:.1f} min -> {html_file}")

    origin = with_training_machine(origin, run, params)
    write_json(files.manifest, {
        "profile": name, "seed": params["seed"], "data": {"path": str(data_path),
                                                          "sha256": data_hash},
        "steps": [s for s, _, _ in steps], "step_seconds": timings,
        "wall_seconds": time.time() - started, "environment": env, "provenance": origin,
        "preprocess": read_json(files.data_summary)})
    cards = export_model_cards(run, reports, params["models"])
    write_index(params, run, reports, steps, origin, cards)
    export_figures(run, reports)
    say(f"done in {(time.time() - started) / 60:.1f} min: open {reports / 'index.html'}")
    return 0


# Figures the README shows, copied from the run into the committed report folder. They hold no
# dataset pixels (the HTML reports, which the issues ask to commit, are where faces appear).
EXPORTED_FIGURES = {"mean_saliency_no_face.png": "mean_saliency.png",
                    "learning_curves_all.png": "learning_curves.png",
                    "compute_curves.png": "compute_curves.png"}


def export_figures(run: Path, reports: Path) -> list[Path]:
    """Copy :data:`EXPORTED_FIGURES` from ``run/figures`` to ``reports/figures``."""
    written = []
    for source_name, target_name in EXPORTED_FIGURES.items():
        source = Path(run) / "figures" / source_name
        if source.exists():
            target = Path(reports) / "figures" / target_name
            atomic_write_bytes(target, source.read_bytes())
            written.append(target)
    return written


MODEL_CARDS_DIR = "model_cards"


def export_model_cards(run: Path, reports: Path, models) -> list[Path]:
    """Copy each trained model's ``MODEL_CARD.md`` to ``reports/model_cards/<model>.md``, so the
    committed report folder carries the cards beside the pages (a card holds no pixels)."""
    written = []
    for model in models:
        for name, card in model_cards(run, model):
            target = Path(reports) / MODEL_CARDS_DIR / f"{name}.md"
            atomic_write_text(target, card.read_text())
            written.append(target)
    return written


def model_cards(run: Path, model: str) -> list[tuple[str, Path]]:
    """(name, card) of a model's folder, or of each of its folds under cross-validation."""
    directory = Run(run).model(model)
    if directory.model_card.exists():
        return [(model, directory.model_card)]
    folds = sorted(directory.directory.glob("fold*/" + artifacts.MODEL_CARD))
    return [(f"{model}_{card.parent.name}", card) for card in folds]


def protocol_sentence(run: Path, models) -> str:
    """What the run's PrivateTest ledger says: "scored once" only where that is true."""
    from collections import Counter

    from ferlib.artifacts import LEDGER

    ledger = Run(run).test_scorings()
    counts = Counter((entry["model"], entry["part"]) for entry in ledger
                     if entry["model"] in models)
    if counts and all(count == 1 for count in counts.values()):
        return ("Models were selected on PublicTest only; PrivateTest was scored once per "
                f"trained model (ledger: {LEDGER}).")
    listed = ", ".join(f"{model}{'/' + part if part else ''} {count}x"
                       for (model, part), count in sorted(counts.items())) or "none recorded"
    return (f"Models were selected on PublicTest only. PrivateTest scorings per trained model, "
            f"replaced runs included: {listed}.")


def write_index(params: dict, run: Path, reports: Path, steps, provenance: dict,
                cards=()) -> None:
    """``index.html``: the headline table (from the compare step) and links to every report.

    Parameters
    ----------
    params : dict
        Resolved parameters (``profile``, ``description``).
    run : Path
        The run directory (its ``compare/summary.csv``); shown as ``runs/<profile>``.
    reports : Path
        The report folder the page is written to.
    steps : list
        ``plan(params)``: the pages to link.
    provenance : dict
        ``ferlib.runs.provenance(...)``, shown in a header at the top of the page.
    cards : sequence of Path
        The model cards :func:`export_model_cards` wrote into ``reports``, linked from the page.
    """
    import pandas as pd

    summary_file = Run(run).compare_summary
    table = "<p>(no comparison yet)</p>"
    if summary_file.exists():
        table = pd.read_csv(summary_file).to_html(index=False, border=0, classes="results",
                                                  na_rep="")
    links = "\n".join(f'<li><a href="{html.escape(step)}.html">{html.escape(step)}</a></li>'
                      for step, _, _ in steps)
    card_links = ("<h2>Model cards</h2><ul>\n" + "\n".join(
        f'<li><a href="{MODEL_CARDS_DIR}/{html.escape(card.name)}">{html.escape(card.stem)}</a>'
        f'</li>' for card in cards) + "\n</ul>") if cards else ""
    description = html.escape(params.get("description") or "")
    profile = html.escape(str(params["profile"]))
    shown_run = scrub_text(str(run), machine_paths(run=run), drop_warnings=False)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>FER2013 study: {profile}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table.results{{border-collapse:collapse}} table.results td,table.results th{{padding:4px 10px;
border-bottom:1px solid #ddd;text-align:right}}</style></head><body>
<h1>FER2013 study: ViT vs ResNet50V2 vs AlexNet-style CNN &mdash; profile <code>{
        profile}</code></h1>
<p>{description}</p>
<h2>Headline (PrivateTest, 95% bootstrap CIs) next to the paper's claims</h2>
{table}
<p>{html.escape(protocol_sentence(run, params["models"]))}</p>
<h2>Reports</h2><ul>
{links}
</ul>
{card_links}
<p>Run directory: <code>{html.escape(shown_run)}</code> (params.yaml, manifest.json, models/).</p>
</body></html>
"""
    atomic_write_text(reports / "index.html", add_provenance(page, provenance))
