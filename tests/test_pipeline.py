"""The whole study on the smoke profile: notebooks, HTML reports, index, resume, failures."""

import json
import shutil

import nbformat
import numpy as np
import pytest
from PIL import Image

from ferlib import EMOTIONS, pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fixture_dataset(tmp_path_factory):
    """A small FER-style image folder with the official split in the file names."""
    root = tmp_path_factory.mktemp("fer") / "fer2013"
    rng = np.random.default_rng(0)
    counts = {"Training": ("train", 24), "PublicTest": ("test", 8), "PrivateTest": ("test", 8)}
    for prefix, (folder, per_class) in counts.items():
        for label, emotion in enumerate(EMOTIONS):
            directory = root / folder / emotion
            directory.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                image = rng.integers(0, 60, (48, 48)).astype(np.uint8)
                image[6 * label:6 * label + 8, 10:38] = 220  # a class-specific bright band
                Image.fromarray(image).save(directory / f"{prefix}_{label}{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def smoke_run(fixture_dataset, tmp_path_factory):
    """Run `report --profile smoke` once into temporary runs/ and reports/ folders."""
    work = tmp_path_factory.mktemp("study")
    patch = pytest.MonkeyPatch()
    patch.setenv("FER2013_PATH", str(fixture_dataset))
    patch.setenv("FERLIB_CACHE", str(work / "cache"))
    code = pipeline.report("smoke", run_root=str(work / "runs"),
                           reports_root=str(work / "reports"))
    yield code, work
    patch.undo()


def test_smoke_pipeline_writes_every_report(smoke_run):
    code, work = smoke_run
    assert code == 0
    reports = work / "reports" / "smoke"
    expected = ["index", "01_eda", "02_preprocess", "03_train_alexnet", "03_train_resnet50v2",
                "03_train_vit", "04_compare"]
    for name in expected:
        page = (reports / f"{name}.html").read_text()
        assert len(page) > 1000, name
        if name not in ("index",):
            assert "data:image/png;base64" in page, f"{name} has no embedded figure"
            assert "Traceback" not in page, f"{name} shows an error"
    index = (reports / "index.html").read_text()
    assert "<table" in index and "ResNet50V2" in index and "ViT" in index
    for name in expected[1:]:
        assert f'href="{name}.html"' in index
    compare = (reports / "04_compare.html").read_text()
    for heading in ("paper", "McNemar", "Conclusion", "Learning curves"):
        assert heading in compare


def test_smoke_pipeline_artifacts(smoke_run):
    _, work = smoke_run
    run = work / "runs" / "smoke"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["sha256"] and manifest["environment"]["packages"]["keras"]
    assert set(manifest["step_seconds"]) == {"01_eda", "02_preprocess", "03_train_alexnet",
                                             "03_train_resnet50v2", "03_train_vit",
                                             "04_compare"}
    assert (run / "params.yaml").exists() and (run / "split.csv").exists()
    for model in ("alexnet", "resnet50v2", "vit"):
        directory = run / "models" / model
        for artifact in ("best.keras", "history.csv", "timing.csv", "predictions.npz",
                         "metrics.json", "settings.json"):
            assert (directory / artifact).exists(), f"{model}: {artifact}"
        assert not list(directory.glob("checkpoint-*.keras"))
    assert (run / "compare" / "summary.csv").exists()
    assert len(list((run / "figures").glob("*.png"))) >= 10


def test_rerun_skips_finished_steps(smoke_run, fixture_dataset, capsys, monkeypatch):
    _, work = smoke_run
    monkeypatch.setenv("FER2013_PATH", str(fixture_dataset))
    monkeypatch.setenv("FERLIB_CACHE", str(work / "cache"))
    capsys.readouterr()
    code = pipeline.report("smoke", run_root=str(work / "runs"),
                           reports_root=str(work / "reports"))
    assert code == 0
    output = capsys.readouterr().out
    assert output.count("up to date, skipped") == 6


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
    partial = tmp_path / "runs" / "smoke" / "notebooks" / "01_eda.ipynb"
    assert str(partial) in error and partial.exists()
    assert (tmp_path / "runs" / "smoke" / "params.yaml").exists()  # earlier artifacts kept


def test_missing_dataset_is_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("FER2013_PATH", str(tmp_path / "nowhere.zip"))
    from ferlib.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="FER2013_PATH"):
        pipeline.report("smoke", run_root=str(tmp_path / "runs"),
                        reports_root=str(tmp_path / "reports"))
