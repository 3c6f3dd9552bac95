"""Tests for ferlib.artifacts: the run directory's file names live in that module only, the
Run / ModelRun paths, the PrivateTest ledger, the compare-table writer and the mean-map cache."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ferlib import artifacts
from ferlib.artifacts import ModelRun, Run

ROOT = Path(__file__).resolve().parent.parent
RUN_FILE_NAMES = [artifacts.BEST_MODEL, artifacts.HISTORY, artifacts.TIMING,
                  artifacts.PREDICTIONS, artifacts.METRICS, artifacts.SETTINGS, artifacts.STATE,
                  artifacts.CALIBRATION, artifacts.CV_METRICS, artifacts.CV_PREDICTIONS,
                  artifacts.PARAMS, artifacts.MANIFEST, artifacts.DATA_SUMMARY, artifacts.LEDGER]


def test_no_other_module_spells_a_run_file_name():
    pattern = re.compile("|".join(rf"[\"']{re.escape(name)}[\"']" for name in RUN_FILE_NAMES))
    offenders = []
    for path in sorted([*(ROOT / "ferlib").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
                        *(ROOT / "benchmarks").glob("*.sh")]):
        if path.name == "artifacts.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_checker_would_see_a_literal(tmp_path):
    pattern = re.compile("|".join(rf"[\"']{re.escape(name)}[\"']" for name in RUN_FILE_NAMES))
    assert pattern.search('path = out / "metrics.json"')
    assert not pattern.search("the ``metrics.json`` of a run")  # prose in docstrings is fine


def test_model_run_paths(tmp_path):
    model = Run(tmp_path).model("vit", "fold2")
    assert model.directory == tmp_path / "models" / "vit" / "fold2"
    assert model.metrics.name == "metrics.json" and model.state.name == "state.json"
    assert model.checkpoint(3).name == "checkpoint-003.keras"
    assert model.best_weights(12).name == "best-012.weights.h5"
    assert Run(tmp_path).model("vit").fold(2) == model
    assert model.stale_copy().name.startswith("fold2.stale-")
    model.directory.mkdir(parents=True)
    for path in (model.checkpoint(1), model.best_weights(1), model.metrics):
        path.write_text("")
    assert sorted(p.name for p in model.epoch_files()) == ["best-001.weights.h5",
                                                           "checkpoint-001.keras"]


def test_the_ledger_counts_each_scoring(tmp_path):
    run = Run(tmp_path)
    assert run.count_test_scorings("alexnet") == 0
    assert run.record_test_scoring("alexnet", "", "key-1") == 1
    assert run.record_test_scoring("alexnet", "", "key-2") == 2
    assert run.record_test_scoring("alexnet", "fold1", "key-3") == 1
    assert [entry["fingerprint"] for entry in run.test_scorings()] == ["key-1", "key-2", "key-3"]


def test_compare_tables_and_mean_maps_are_written_by_ferlib(tmp_path):
    run = Run(tmp_path)
    frame = pd.DataFrame({"model": ["ViT"], "accuracy": [0.5]})
    path = run.save_table("summary", frame)
    assert path == run.compare_summary
    pd.testing.assert_frame_equal(pd.read_csv(path), frame)
    with pytest.raises(ValueError, match="compare table 'sumary'"):
        run.save_table("sumary", frame)
    assert run.load_mean_maps("vit") is None
    maps = np.random.default_rng(0).random((7, 48, 48)).astype(np.float32)
    run.save_mean_maps("vit", maps)
    np.testing.assert_array_equal(run.load_mean_maps("vit"), maps)
    assert not list(run.mean_maps("vit").parent.glob("*.tmp*"))


def test_result_file_follows_cross_validation(tmp_path):
    run = Run(tmp_path)
    assert run.result_file("vit") == ModelRun(tmp_path / "models" / "vit").metrics
    assert run.result_file("vit", cv_folds=5).name == "cv_metrics.json"
