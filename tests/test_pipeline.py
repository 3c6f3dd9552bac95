"""The study runner: step fingerprints, scrubbing and provenance of the HTML (fast), and the
whole study on the smoke profile: notebooks, HTML reports, index, resume, failures (slow)."""

import ast
import io
import json
import math
import re
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from ferlib import pipeline, runs
from ferlib import PROJECT_ROOT
from ferlib.config import load_params, parse_overrides
from ferlib.paper import MODEL_DISPLAY_NAMES

from conftest import make_fer_folder

MACHINE_PATH = re.compile(r"/(home|root|tmp|work)/")
HEADER_FIRST = re.compile(r'<body[^>]*>\s*(?:<main>\s*)?<div class="ferlib-provenance">')


def header_of(page: str) -> str:
    match = re.search(r'<div class="ferlib-provenance">.*?</div>', page, re.S)
    assert match, "no provenance header"
    return match.group(0)


# --- step fingerprints ------------------------------------------------------------------------

def fingerprints(params, run: Path) -> dict:
    return {step: pipeline._step_inputs(params, pipeline.NOTEBOOKS_DIR / notebook, "data-hash",
                                        pipeline.upstream_results(params, step, extra), run)
            for step, notebook, extra in pipeline.plan(params)}


def test_changing_a_module_reruns_exactly_the_steps_that_run_it(tmp_path, monkeypatch):
    params = load_params("smoke")
    versions: dict = {}
    monkeypatch.setattr(pipeline, "code_hash", lambda *modules: runs.fingerprint(
        {module: versions.get(module, 0) for module in sorted(modules)}))
    before = fingerprints(params, tmp_path)
    assert fingerprints(params, tmp_path) == before  # stable
    steps = list(before)
    notebooks = {step: notebook for step, notebook, _ in pipeline.plan(params)}
    changed = {}
    for source in sorted(pipeline.PACKAGE_DIR.glob("*.py")):
        versions[source.stem] = 1
        after = fingerprints(params, tmp_path)
        versions[source.stem] = 0
        changed[source.stem] = [step for step in steps if after[step] != before[step]]
        assert changed[source.stem] == [
            step for step in steps
            if source.stem in pipeline.step_modules(notebooks[step])], source.stem
    trains = [step for step in steps if step.startswith("03_train_")]
    assert changed["data"] == changed["pipeline"] == steps
    assert changed["train"] == ["02_preprocess", *trains]  # 04 reads artifacts only
    # calibration is reached through results: derived, not listed, so it is not forgotten
    assert changed["calibration"] == ["02_preprocess", *trains, "04_compare", "05_cross"]
    assert changed["search"] == ["02_preprocess"]
    assert changed["apply"] == ["05_cross"]  # through ferlib.cross
    assert changed["__main__"] == []  # the CLI runs no notebook


def test_step_modules_follow_imports_inside_functions(tmp_path, monkeypatch):
    package = tmp_path / "ferlib"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "pipeline.py").write_text("")
    (package / "top.py").write_text("from ferlib import middle\n")
    (package / "middle.py").write_text("def f():\n    from ferlib.bottom import g\n")
    (package / "bottom.py").write_text("import numpy\n")
    (package / "unused.py").write_text("")
    monkeypatch.setattr(pipeline, "PACKAGE_DIR", package)
    assert pipeline.module_closure(["top"]) == ("bottom", "middle", "top")


def test_step_modules_skip_missing_files_and_cover_the_notebooks_imports():
    explain_exists = (pipeline.PACKAGE_DIR / "explain.py").exists()
    assert ("explain" in pipeline.step_modules("03_train")) == explain_exists
    for notebook in sorted(pipeline.NOTEBOOKS_DIR.glob("0*.ipynb")):
        modules = pipeline.step_modules(notebook.name)
        assert all((pipeline.PACKAGE_DIR / f"{module}.py").exists() for module in modules)
        imported = set()
        for cell in nbformat.read(notebook, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            source = "\n".join(line for line in cell.source.splitlines()
                               if not line.lstrip().startswith(("%", "!")))
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.ImportFrom) and node.module == "ferlib":
                    imported |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                        "ferlib."):
                    imported.add(node.module.split(".")[1])
                elif isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[1] for alias in node.names
                                 if alias.name.startswith("ferlib.")}
        imported = {name for name in imported if (pipeline.PACKAGE_DIR / f"{name}.py").exists()}
        assert imported <= set(modules), f"{notebook.name}: {imported - set(modules)}"
    with pytest.raises(ValueError, match="no file"):
        pipeline.step_modules("99_unknown.ipynb")


def test_every_step_declares_what_it_reads_and_writes():
    params = load_params("smoke")
    declared = {step: pipeline.step_artifacts(params, step, extra)
                for step, _, extra in pipeline.plan(params)}
    assert declared["01_eda"] == {"reads": [], "writes": ["eda.json"]}
    assert declared["02_preprocess"]["reads"] == ["search/studies.db"]
    assert declared["03_train_vit"]["writes"][0] == "models/vit/"
    assert declared["04_compare"]["reads"] == [f"models/{name}/metrics.json"
                                               for name in params["models"]]
    assert "compare/summary.csv" in declared["04_compare"]["writes"]
    with pytest.raises(ValueError, match="unknown"):
        pipeline.step_artifacts(params, "05_extra", {})


def test_upstream_results_follow_cross_validation(tmp_path):
    params = load_params("smoke")
    assert pipeline.upstream_results(params, "03_train_vit", {"model": "vit"}) == [
        "models/vit/metrics.json"]
    assert pipeline.upstream_results(params, "01_eda", {}) == []
    cv_params = load_params("smoke", parse_overrides(["cv_folds=5"]))
    assert pipeline.upstream_results(cv_params, "03_train_vit", {"model": "vit"}) == [
        "models/vit/cv_metrics.json"]
    assert pipeline.upstream_results(cv_params, "04_compare", {}) == [
        f"models/{model}/cv_metrics.json" for model in cv_params["models"]]
    before = fingerprints(cv_params, tmp_path)
    runs.write_json(tmp_path / "models" / "vit" / "cv_metrics.json", {"accuracy": 0.5})
    after = fingerprints(cv_params, tmp_path)
    assert sorted(s for s in before if after[s] != before[s]) == ["03_train_vit", "04_compare",
                                                                  "05_cross"]


# --- scrubbing and provenance -----------------------------------------------------------------

KERAS_WARNING = (
    "/work/main/.venv/lib/python3.11/site-packages/keras/src/trainers/data_adapters/"
    "py_dataset_adapter.py:121: UserWarning: Your `PyDataset` class should call "
    "`super().__init__(**kwargs)` in its constructor.\n"
    "  self._warn_if_super_not_called()\n")
TF_DEPRECATION = (
    "WARNING:tensorflow:From /usr/lib/python3/dist-packages/tensorflow/python/profiler/"
    "internal/flops_registry.py:140: tensor_shape_from_node_def_name (from tensorflow.python."
    "framework.graph_util_impl) is deprecated and will be removed in a future version.\n"
    "Instructions for updating:\n"
    "This API was designed for TensorFlow v1. See https://www.tensorflow.org/guide/migrate\n")
ABSL_NOISE = ("I0000 00:00:1718000000.123456   12345 cpu_feature_guard.cc:210] This TensorFlow "
              "binary is optimized to use available CPU instructions.\n")


@pytest.fixture()
def machine(tmp_path, monkeypatch):
    """A run directory, report folder and dataset in temporary folders, and a fake home."""
    monkeypatch.setenv("HOME", "/home/alice")
    monkeypatch.delenv("FERLIB_CACHE", raising=False)
    run, reports = tmp_path / "runs" / "smoke", tmp_path / "reports" / "smoke"
    data_path = tmp_path / "elsewhere" / "fer2013.csv"
    paths = pipeline.machine_paths(run=run, reports=reports, data_path=data_path)
    return run, reports, data_path, paths


def test_scrub_text_replaces_machine_paths(machine):
    run, reports, data_path, paths = machine
    text = (f"loading {data_path}\nsaved {run}/models/vit/best.keras and {reports}/01_eda.html"
            f"\nnotebooks in {PROJECT_ROOT}/notebooks. Keras config /home/alice/.keras/x.json, "
            f"scratch {run.parent.parent}/x, /tmp/other, /home/bob/data\n")
    scrubbed = pipeline.scrub_text(text, paths)
    assert scrubbed == ("loading fer2013.csv\nsaved runs/smoke/models/vit/best.keras and "
                        "reports/smoke/01_eda.html\nnotebooks in ./notebooks. Keras config "
                        f"~/.keras/x.json, scratch $TMPDIR/{run.parent.parent.relative_to('/tmp')}"
                        "/x, $TMPDIR/other, ~/data\n")
    assert not MACHINE_PATH.search(scrubbed)
    # only whole path components; URLs are not paths
    kept = "/tmpfoo /workshop https://www.tensorflow.org/guide/migrate root of /usr/bin"
    assert pipeline.scrub_text(kept, paths) == kept


def test_data_inside_the_project_is_shown_relative_to_it(tmp_path):
    paths = pipeline.machine_paths(data_path=PROJECT_ROOT / "data" / "fer2013" / "fer2013.zip")
    assert pipeline.scrub_text(f"read {PROJECT_ROOT}/data/fer2013/fer2013.zip", paths) == (
        "read data/fer2013/fer2013.zip")


def test_scrub_text_drops_library_warnings_and_backend_noise(machine):
    paths = machine[3]
    retracing = ("WARNING:tensorflow:5 out of the last 9 calls to <function f at 0x7f> "
                 "triggered tf.function retracing. Tracing is expensive.\n")
    text = ("epoch 1\n" + KERAS_WARNING + ABSL_NOISE + "epoch 2\n" + TF_DEPRECATION
            + retracing + "parameters: 553,479\n")
    assert pipeline.scrub_text(text, paths) == "epoch 1\nepoch 2\nparameters: 553,479\n"
    # Elsewhere (a traceback) a site-packages path is kept but shortened.
    trace = "File /work/main/.venv/lib/python3.11/site-packages/keras/src/x.py:3, in f\n"
    assert pipeline.scrub_text(trace, paths, drop_warnings=False) == (
        "File site-packages/keras/src/x.py:3, in f\n")


def test_console_stream_drops_warnings_split_across_writes():
    sink = io.StringIO()
    stream = pipeline._QuietStream(sink)
    for chunk in ("epoch 1\n" + KERAS_WARNING[:50], KERAS_WARNING[50:], TF_DEPRECATION,
                  ABSL_NOISE, "done\n"):
        stream.write(chunk)
    assert sink.getvalue() == "epoch 1\ndone\n"


def fake_environment(commit):
    return {"git_commit": commit, "processor": "Some CPU", "cpu_count": 2,
            "keras_backend": "tensorflow", "time": "2025-06-01T12:00:00+0000",
            "packages": {"tensorflow": "2.21.0", "keras": "3.15.0", "keras-hub": "0.20.0"}}


def test_provenance_dict_and_header():
    sha = "0123456789abcdef" * 4
    origin = runs.provenance({"profile": "smoke"}, Path("/somewhere/fer2013.zip"), sha,
                             fake_environment("f" * 40 + "-dirty"))
    assert origin["dataset"] == "fer2013.zip" and origin["dataset_sha256"] == sha
    assert origin["git_commit"] == "f" * 40 and origin["git_dirty"] is True
    assert origin["keras_hub"] == "0.20.0" and "Some CPU (2 cores)" in origin["machine"]
    header = pipeline.provenance_header(origin)
    assert f'title="{sha}">{sha[:12]}</code>' in header
    assert "<b>commit</b> <code" in header and ">fffffff</code> dirty" in header
    for fact in ("smoke", "TensorFlow 2.21.0", "Keras 3.15.0", "keras-hub 0.20.0", "tensorflow",
                 "Some CPU", "2025-06-01"):
        assert fact in header
    params = load_params("smoke", {"train_overrides": {"vit": {"batch_size": 16}}})
    with_training = runs.provenance(params, Path("fer2013.zip"), sha, fake_environment(None))
    assert with_training["training"] == ("distribution none; global batch alexnet 32, "
                                         "resnet50v2 32, vit 16, vit_conv 32; learning rate "
                                         "not scaled with the device count")
    assert "<b>training</b> distribution none; global batch" in pipeline.provenance_header(
        with_training)
    outside_git = runs.provenance({"profile": "smoke"}, Path("fer2013.zip"), sha,
                                  fake_environment(None))
    assert outside_git["git_commit"] is None and not outside_git["git_dirty"]
    assert "<code>unknown</code>" in pipeline.provenance_header(outside_git)
    assert "overrides" not in header  # only a page made with --set says so
    overridden = pipeline.provenance_header({**origin, "overrides": ["train.epochs=3", "a=<b>"]})
    assert "<b>overrides</b> <code>train.epochs=3</code>, <code>a=&lt;b&gt;</code>" in overridden
    json.dumps(origin)  # goes into the manifest


def test_render_html_scrubs_outputs_and_starts_with_the_header(machine, tmp_path):
    run, reports, data_path, paths = machine
    notebook = nbformat.v4.new_notebook()
    wide = "<table><tr>" + "".join(f"<td>column {i}</td>" for i in range(40)) + "</tr></table>"
    notebook.cells = [
        nbformat.v4.new_markdown_cell("# A report"),
        nbformat.v4.new_code_cell("x", outputs=[
            nbformat.v4.new_output("stream", name="stdout", text=f"loading {data_path}\n"),
            nbformat.v4.new_output("stream", name="stderr", text=KERAS_WARNING[:60]),
            nbformat.v4.new_output("stream", name="stderr", text=KERAS_WARNING[60:] + ABSL_NOISE),
            nbformat.v4.new_output("stream", name="stdout", text=TF_DEPRECATION),
            nbformat.v4.new_output("display_data", data={
                "text/html": f"{wide}<p>saved to {run}/figures</p>",
                "text/plain": f"saved to {run}/figures"}),
            nbformat.v4.new_output("display_data", data={
                "text/markdown": f"Report folder `{reports}`"}),
            nbformat.v4.new_output("execute_result", execution_count=1,
                                   data={"text/plain": f"PosixPath('{PROJECT_ROOT}/x')"})])]
    source = tmp_path / "executed.ipynb"
    nbformat.write(notebook, source)
    origin = runs.provenance({"profile": "smoke"}, data_path, "ab" * 32,
                             fake_environment("c" * 40))
    page_file = reports / "01_eda.html"
    pipeline.render_html(source, page_file, origin, paths)
    page = page_file.read_text()
    assert HEADER_FIRST.search(page)
    assert "ab" * 32 in header_of(page) and ">ccccccc</code>" in header_of(page)
    assert not MACHINE_PATH.search(page), MACHINE_PATH.search(page)
    for leak in ("site-packages", "dist-packages", "UserWarning", "Instructions for updating",
                 "cpu_feature_guard", "alice"):
        assert leak not in page, leak
    for kept in ("loading fer2013.csv", "saved to runs/smoke/figures", "column 39",
                 "reports/smoke", "./x"):
        assert kept in page, kept
    assert "overflow-x:auto" in page and ".jp-RenderedHTMLCommon table" in page


def test_index_has_header_and_relative_run_directory(machine):
    run, reports, data_path, _ = machine
    params = load_params("smoke")
    origin = runs.provenance(params, data_path, "ab" * 32, fake_environment(None))
    pipeline.write_index(params, run, reports, pipeline.plan(params), origin)
    page = (reports / "index.html").read_text()
    assert HEADER_FIRST.search(page) and "ab" * 32 in header_of(page)
    assert "Run directory: <code>runs/smoke</code>" in page
    assert not MACHINE_PATH.search(page)
    assert "table.results" in page and "overflow-x:auto" in page


# --- the whole study (slow) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_dataset(tmp_path_factory):
    """A small FER-style image folder with the official split in the file names."""
    return make_fer_folder(tmp_path_factory.mktemp("fer") / "fer2013")


@pytest.fixture(scope="module")
def smoke_run(fixture_dataset, tmp_path_factory):
    """Run `report --profile smoke` once into temporary runs/ and reports/ folders."""
    work = tmp_path_factory.mktemp("study")
    patch = pytest.MonkeyPatch()
    patch.setenv("FER2013_PATH", str(fixture_dataset))
    patch.setenv("FERLIB_CACHE", str(work / "cache"))
    cross = make_fer_folder(work / "other_faces", {"PrivateTest": ("test", 3)}, seed=5)
    code = pipeline.report("smoke", run_root=str(work / "runs"),
                           reports_root=str(work / "reports"),
                           overrides=[f"cross_datasets.generated={cross}"])
    yield code, work
    patch.undo()


@pytest.mark.slow
def test_smoke_pipeline_writes_every_report(smoke_run):
    code, work = smoke_run
    assert code == 0
    reports = work / "reports" / "smoke"
    origin = json.loads((work / "runs" / "smoke" / "manifest.json").read_text())["provenance"]
    commit = origin["git_commit"][:7] if origin["git_commit"] else "unknown"
    expected = ["index", "01_eda", "02_preprocess", "03_train_alexnet", "03_train_resnet50v2",
                "03_train_vit", "03_train_vit_conv", "04_compare", "05_cross"]
    for name in expected:
        page = (reports / f"{name}.html").read_text()
        assert len(page) > 1000, name
        assert HEADER_FIRST.search(page), f"{name} does not start with the provenance header"
        header = header_of(page)
        assert origin["dataset_sha256"] in header and f">{commit}</code>" in header, name
        # made with --set: the page says so (the folder's machine path scrubbed, below)
        assert "<b>overrides</b> <code>cross_datasets.generated=" in header, name
        leak = MACHINE_PATH.search(page)
        assert not leak, f"{name}: {page[max(leak.start() - 200, 0):leak.end() + 200]}"
        for noise in ("site-packages", "dist-packages", "cpu_feature_guard", "oneDNN"):
            assert noise not in page, f"{name} shows {noise}"
        # Tables read like a paper's: no pandas index column, no NaN.
        assert 'class="dataframe"' not in page and 'class="row_heading' not in page, name
        assert not re.search(r">\s*(NaN|nan)\s*<", page), f"{name} shows NaN"
        if name not in ("index",):
            assert "data:image/png;base64" in page, f"{name} has no embedded figure"
            assert "Traceback" not in page, f"{name} shows an error"
    index = (reports / "index.html").read_text()
    assert "<table" in index and "ResNet50V2" in index and "ViT" in index
    for name in expected[1:]:
        assert f'href="{name}.html"' in index
    compare = (reports / "04_compare.html").read_text()
    for heading in ("paper", "McNemar", "Conclusion", "Learning curves", "equal training compute",
                    "best PublicTest within it"):
        assert heading in compare
    assert (work / "runs" / "smoke" / "figures" / "compute_curves.png").exists()
    cross = (reports / "05_cross.html").read_text()
    assert "generated" in cross and "ensemble" in cross and "95% CI" in cross
    # The committed report folder carries every model's card, linked from the index, and the
    # cards' PrivateTest numbers are the compare report's.
    summary = pd.read_csv(work / "runs" / "smoke" / "compare" / "summary_full.csv")
    accuracy = dict(zip(summary.model, summary.accuracy))
    for model in ("alexnet", "resnet50v2", "vit", "vit_conv"):
        card = (reports / "model_cards" / f"{model}.md").read_text()
        assert card == (work / "runs" / "smoke" / "models" / model / "MODEL_CARD.md").read_text()
        assert f'href="model_cards/{model}.md"' in index
        shown = re.search(r"^\| accuracy \| (\d\.\d{3}) \[", card, re.MULTILINE).group(1)
        assert shown == f"{accuracy[MODEL_DISPLAY_NAMES[model]]:.3f}", model
        assert "generated" in card  # the cross-dataset section, written by 05_cross
        # rewritten after 04_compare: its accuracy without duplicates and saliency check
        row = summary[summary.model == MODEL_DISPLAY_NAMES[model]].iloc[0]
        unseen = re.search(r"^Accuracy without duplicates \(.*?\): (\d\.\d{3}) \[", card,
                           re.MULTILINE).group(1)
        assert unseen == f"{row.accuracy_unseen:.3f}", model
        check = json.loads((work / "runs" / "smoke" / "models" / model
                            / "saliency_check.json").read_text())
        spearman = "n/a" if check["spearman"] is None or math.isnan(check["spearman"]) \
            else f"{check['spearman']:.3f}"
        assert f"randomising the weights {spearman}; " in card, model
    assert len(re.findall(r"\[0\.\d{3}, [01]\.\d{3}\]", cross)) >= 5 * 3  # 5 rows x 3 CIs


@pytest.mark.slow
def test_smoke_pipeline_artifacts(smoke_run):
    _, work = smoke_run
    run = work / "runs" / "smoke"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["sha256"] and manifest["environment"]["packages"]["keras"]
    assert manifest["provenance"]["dataset_sha256"] == manifest["data"]["sha256"]
    assert manifest["provenance"]["profile"] == "smoke"
    assert set(manifest["step_seconds"]) == {"01_eda", "02_preprocess", "03_train_alexnet",
                                             "03_train_resnet50v2", "03_train_vit",
                                             "03_train_vit_conv", "04_compare", "05_cross"}
    assert (run / "params.yaml").exists() and (run / "split.csv").exists()
    for model in ("alexnet", "resnet50v2", "vit", "vit_conv"):
        directory = run / "models" / model
        for artifact in ("best.keras", "history.csv", "timing.csv", "predictions.npz",
                         "metrics.json", "settings.json"):
            assert (directory / artifact).exists(), f"{model}: {artifact}"
        assert not list(directory.glob("checkpoint-*.keras"))
    assert (run / "compare" / "summary.csv").exists()
    assert len(list((run / "figures").glob("*.png"))) >= 10


@pytest.mark.slow
def test_rerun_skips_finished_steps(smoke_run, fixture_dataset, capsys, monkeypatch):
    _, work = smoke_run
    monkeypatch.setenv("FER2013_PATH", str(fixture_dataset))
    monkeypatch.setenv("FERLIB_CACHE", str(work / "cache"))
    capsys.readouterr()
    cross = make_fer_folder(work / "other_faces", {"PrivateTest": ("test", 3)}, seed=5)
    code = pipeline.report("smoke", run_root=str(work / "runs"),
                           reports_root=str(work / "reports"),
                           overrides=[f"cross_datasets.generated={cross}"])
    assert code == 0
    output = capsys.readouterr().out
    assert output.count("up to date, skipped") == 8, output
    assert HEADER_FIRST.search((work / "reports" / "smoke" / "index.html").read_text())


@pytest.mark.slow
def test_smoke_pipeline_with_cross_validation(fixture_dataset, tmp_path, monkeypatch):
    """cv_folds: 2 end to end: every fold is trained and shown, the compare step compares the
    fold results, and no step trains a model that the reports do not show."""
    monkeypatch.setenv("FER2013_PATH", str(fixture_dataset))
    monkeypatch.setenv("FERLIB_CACHE", str(tmp_path / "cache"))
    code = pipeline.report("smoke", overrides=["cv_folds=2", "models=[alexnet, vit]"],
                           run_root=str(tmp_path / "runs"), reports_root=str(tmp_path / "reports"))
    assert code == 0
    run, reports = tmp_path / "runs" / "smoke", tmp_path / "reports" / "smoke"
    for model in ("alexnet", "vit"):
        directory = run / "models" / model
        assert (directory / "cv_metrics.json").exists()
        assert (directory / "fold1" / "metrics.json").exists()
        assert (directory / "fold2" / "metrics.json").exists()
        assert not (directory / "metrics.json").exists(), "an official-split model was trained"
        page = (reports / f"03_train_{model}.html").read_text()
        assert "Fold 1" in page and "Fold 2" in page and "2-fold cross-validation" in page
    compare = (reports / "04_compare.html").read_text()
    assert "(mean ± sd)" in compare and "paired t-test over folds" in compare
    assert "k-fold ensemble" in compare
    assert (run / "compare" / "cv_significance.csv").exists()


@pytest.mark.slow
def test_failing_step_names_the_notebook(fixture_dataset, tmp_path, capsys, monkeypatch):
    notebooks = tmp_path / "notebooks"
    shutil.copytree(pipeline.NOTEBOOKS_DIR, notebooks)
    broken = nbformat.read(notebooks / "01_eda.ipynb", as_version=4)
    broken.cells.append(nbformat.v4.new_code_cell("raise RuntimeError('planted failure')"))
    nbformat.write(broken, notebooks / "01_eda.ipynb")
    monkeypatch.setattr(pipeline, "NOTEBOOKS_DIR", notebooks)
    monkeypatch.setenv("FER2013_PATH", str(fixture_dataset))
    monkeypatch.setenv("FERLIB_CACHE", str(tmp_path / "cache"))
    code = pipeline.report("smoke", run_root=str(tmp_path / "runs"),
                           reports_root=str(tmp_path / "reports"))
    assert code == 1
    error = capsys.readouterr().err
    assert "01_eda" in error and "planted failure" in error
    partial = tmp_path / "runs" / "smoke" / "notebooks" / "01_eda.partial.ipynb"
    assert str(partial) in error and partial.exists()
    # never under the finished name: the next run re-executes the step
    assert not (tmp_path / "runs" / "smoke" / "notebooks" / "01_eda.ipynb").exists()
    assert (tmp_path / "runs" / "smoke" / "params.yaml").exists()  # earlier artifacts kept


def test_missing_dataset_is_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("FER2013_PATH", str(tmp_path / "nowhere.zip"))
    from ferlib.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="FER2013_PATH"):
        pipeline.report("smoke", run_root=str(tmp_path / "runs"),
                        reports_root=str(tmp_path / "reports"))


def test_protocol_sentence_says_scored_once_only_when_the_ledger_agrees(tmp_path):
    from ferlib.runs import write_json

    assert "none recorded" in pipeline.protocol_sentence(tmp_path, ["alexnet"])
    write_json(tmp_path / "privatetest_scorings.json",
               [{"model": "alexnet", "part": ""}, {"model": "vit", "part": ""}])
    assert "scored once per trained model" in pipeline.protocol_sentence(tmp_path,
                                                                         ["alexnet", "vit"])
    write_json(tmp_path / "privatetest_scorings.json",
               [{"model": "alexnet", "part": ""}, {"model": "alexnet", "part": ""}])
    sentence = pipeline.protocol_sentence(tmp_path, ["alexnet"])
    assert "once" not in sentence and "alexnet 2x" in sentence


def test_export_figures_copies_the_readme_figures(tmp_path):
    run, reports = tmp_path / "runs" / "quick", tmp_path / "reports" / "quick"
    assert pipeline.export_figures(run, reports) == []  # nothing to copy yet
    (run / "figures").mkdir(parents=True)
    (run / "figures" / "mean_saliency_no_face.png").write_bytes(b"png")
    (written,) = pipeline.export_figures(run, reports)  # copies what exists, skips the rest
    assert written == reports / "figures" / "mean_saliency.png"
    assert written.read_bytes() == b"png"
    (run / "figures" / "learning_curves_all.png").write_bytes(b"curves")
    assert [path.name for path in pipeline.export_figures(run, reports)] == [
        "mean_saliency.png", "learning_curves.png"]
    (run / "figures" / "compute_curves.png").write_bytes(b"compute")
    assert [path.name for path in pipeline.export_figures(run, reports)][-1] == "compute_curves.png"
