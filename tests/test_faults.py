"""Faults a careful user or a hostile tester meets: a second writer on one run, a dead lock
holder, out-of-range settings, broken profile files, ordinary CLI mistakes. Each is one clear
line and leaves the run usable."""

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ferlib import PROJECT_ROOT
from ferlib.__main__ import main
from ferlib.artifacts import Run, RunBusy
from ferlib.config import validate

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from ferlib.artifacts import Run
    with Run(sys.argv[1]).lock("alexnet"):
        print("locked", flush=True)
        time.sleep(600)
""")


@pytest.mark.train
def test_a_second_writer_is_refused_with_the_holder_named_and_the_run_stays_usable(tmp_path):
    from test_train import make_params, synthetic_data

    data, params = synthetic_data(), make_params()
    run = Run(tmp_path / "run")
    with run.lock("alexnet"):
        with pytest.raises(RunBusy, match=rf"alexnet is being trained by another process "
                                          rf"\(pid {os.getpid()} on "):
            from ferlib.train import train

            train("alexnet", data, params, run.directory, progress=False)
    assert not run.model("alexnet").state.exists()  # refused before touching any file
    result = train("alexnet", data, params, run.directory, progress=False)
    assert result["epochs_run"] == 2


def test_the_lock_of_a_killed_process_is_free_at_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunBusy, match=f"pid {holder.pid}"):
        with Run(tmp_path).lock("alexnet"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with Run(tmp_path).lock("alexnet"):  # taken over: the OS released the dead holder's lock
        pass


@pytest.mark.parametrize("settings, message", [
    ({"train": {"epochs": 0}}, "train.epochs: 0 is out of range"),
    ({"train": {"epochs": -1}}, "train.epochs: -1 is out of range"),
    ({"train": {"batch_size": 0}}, "train.batch_size: 0 is out of range"),
    ({"train": {"learning_rate": 0}}, "train.learning_rate: 0.0 is out of range"),
    ({"train": {"label_smoothing": 1.0}}, "train.label_smoothing: 1.0 is out of range"),
    ({"train_overrides": {"vit": {"warmup_epochs": -1}}}, "train_overrides.vit.warmup_epochs"),
    ({"augment": {"rotation": 2.0}}, "augment.rotation: 2.0 is out of range"),
    ({"augment": {"mixup": -0.1}}, "augment.mixup: -0.1 is out of range"),
    ({"model_params": {"alexnet": {"dropout_rate": 1.0}}}, "dropout_rate: 1.0 is out of range"),
    ({"model_params": {"vit": {"patch_size": 5}}}, "patch_size: 5 does not divide"),
    ({"model_params": {"vit": {"num_heads": 5}}}, "does not split into 5 heads"),
    ({"data": {"val_fraction": 1.0}}, "data.val_fraction: 1.0 is out of range"),
    ({"report": {"bootstrap_samples": -5}}, "report.bootstrap_samples: -5 is out of range"),
])
def test_out_of_range_values_are_one_error_naming_the_key(settings, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        validate(settings)


def test_cli_errors_are_one_line_before_any_data_is_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FER2013_PATH", str(tmp_path / "no-such-data.zip"))  # never reached
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  epochs: 3\n   batch_size: 4\n")
    listed = tmp_path / "listed.yaml"
    listed.write_text("- train\n- epochs\n")
    cases = [(["train", "--profile", "smoke", "--model", "lenet"], "unknown model 'lenet'"),
             (["train", "--profile", "smoke", "--set", "train.epochs=0"], "train.epochs: 0"),
             (["train", "--profile", "smoke", "--set", "train.batch_size=0"], "batch_size: 0"),
             (["status", "--profile", str(broken)], f"{broken}:3:14: not valid YAML"),
             (["status", "--profile", str(listed)], "expected a mapping of settings")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)


def test_hostile_strings_in_parameters_render_escaped(tmp_path):
    import pandas as pd

    from ferlib import pipeline

    hostile = "<script>alert(1)</script>"
    run = Run(tmp_path / "run")
    run.save_table("summary", pd.DataFrame({"model": [hostile], "accuracy": [0.5]}))
    params = {"profile": hostile, "description": hostile, "models": [hostile]}
    pipeline.write_index(params, run.directory, tmp_path / "reports",
                         [(hostile, "01_eda.ipynb", {})], {"profile": hostile})
    page = (tmp_path / "reports" / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_moved_aside_runs_are_listed_and_pruned_on_request(tmp_path, capsys):
    run = Run(tmp_path / "run")
    aside = run.directory / "models" / "vit.stale-20261201-120000"
    (aside / "x").mkdir(parents=True)
    (aside / "x" / "best.keras").write_bytes(b"0" * 1024)
    (run.directory / "models" / "alexnet.next").mkdir()
    args = ["runs", "--profile", "smoke", "--run-dir", str(run.directory)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "moved aside: " in out and "vit.stale-20261201-120000" in out
    assert "retraining (not live yet)" in out and aside.exists()
    assert main([*args, "--prune"]) == 0
    assert not aside.exists() and (run.directory / "models" / "alexnet.next").exists()
    assert main(["status", "--profile", "smoke", "--run-dir", str(run.directory)]) == 0
    assert "retraining (not live yet): alexnet.next" in capsys.readouterr().out


def test_the_cli_prints_one_line_without_backend_noise(tmp_path):
    """In a real process: a corrupt model file is called corrupt, on one line, exit code 2,
    and TensorFlow's start-up messages stay off stderr (they come back with --debug)."""
    from conftest import make_fer_folder

    data = make_fer_folder(tmp_path / "faces", {"PrivateTest": ("test", 1)})
    truncated = tmp_path / "best.keras"
    truncated.write_bytes(b"PK\x03\x04 truncated")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    command = [sys.executable, "-m", "ferlib", "evaluate", "--model", str(truncated),
               "--data", str(data)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: {truncated}: not a complete .keras file (a .keras model is a zip archive; "
        f"this one is damaged or truncated): copy or train it again"]


def test_a_planted_symlink_at_a_temporary_name_is_not_followed(tmp_path):
    from ferlib.runs import atomic_save, atomic_write_text

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "out" / "metrics.json"
    target.parent.mkdir()
    # the names the writers used to use, and a few guesses at the new ones
    for name in (f".metrics.json.{os.getpid()}.tmp", f".metrics.tmp{os.getpid()}.json",
                 f".metrics.json.ferlib-{os.getpid()}-.tmp"):
        (target.parent / name).symlink_to(victim)
    atomic_write_text(target, "{}")
    atomic_save(lambda path: Path(path).write_text("model"), target.with_name("best.keras"))
    assert victim.read_text() == "precious"
    assert target.read_text() == "{}"


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    from ferlib.runs import remove_dead_temporaries

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    dead_pid = int(done.stdout)
    dead = tmp_path / f".04_compare.html.ferlib-{dead_pid}-x1y2.tmp"
    live = tmp_path / f".04_compare.html.ferlib-{os.getpid()}-a3b4.tmp"
    other = tmp_path / ".someone-elses.tmp"
    for path in (dead, live, other):
        path.write_bytes(b"x" * 2048)
    assert remove_dead_temporaries(tmp_path) == [dead]
    assert live.exists() and other.exists() and not dead.exists()


def _numeric_paths(schema, prefix=""):
    from ferlib.config import NUMBER

    for key, spec in schema.items():
        path = f"{prefix}{key}"
        if isinstance(spec, dict):
            yield from _numeric_paths(spec, f"{path}.")
        elif spec[0] in (int, NUMBER) or (isinstance(spec[0], tuple) and int in spec[0]):
            yield path


def _nested(path, value):
    node = result = {}
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return result


def test_every_ranged_numeric_setting_rejects_a_value_below_its_range():
    from ferlib.config import PATH_RANGES, RANGES, SCHEMA

    checked = 0
    for path in _numeric_paths(SCHEMA):
        parts = path.split(".")
        spec = PATH_RANGES.get(path) or PATH_RANGES.get(".".join(parts[-2:])) \
            or RANGES.get(parts[-1])
        if spec is None or spec[0] is None:
            continue
        low, _, low_included, _ = spec
        bad = low - 1 if low_included else low
        with pytest.raises(ValueError, match=rf"^{re.escape(path)}: .* is out of range"):
            validate(_nested(path, bad))
        checked += 1
    assert checked > 100  # every model's and every override's keys, not a sample
