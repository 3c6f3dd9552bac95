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


@pytest.mark.train
@pytest.mark.parametrize("phase, seed", [("start-up", 1), ("training", 3)])
def test_two_concurrent_trains_killed_at_random_points_leave_a_resumable_run(
        tmp_path, phase, seed):
    """Two ``train`` processes of one model start together; both are sent SIGKILL at random
    moments (seeded) of one phase: start-up (data loading, the lock, building the model) or
    training (after the first committed epoch). Whatever was interrupted, one more ``train``
    finishes the run: every epoch once, no orphan checkpoint, no stale copy."""
    import json
    import random
    import time

    from test_train import cli_training, history_of

    from ferlib.runs import read_json

    epochs = 8
    _, run_dir, out, command, env = cli_training(tmp_path, epochs)
    rng = random.Random(seed)
    logs = [tmp_path / f"writer-{index}.log" for index in range(2)]
    handles = [open(log, "w") for log in logs]
    writers = [subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=handle,
                                stderr=subprocess.STDOUT) for handle in handles]
    try:
        if phase == "start-up":
            origin = time.time()
            moments = sorted(rng.uniform(1.0, 6.0) for _ in writers)
        else:  # wait for the first committed epoch, then kill within the next few
            deadline = time.time() + 300
            while (time.time() < deadline and any(w.poll() is None for w in writers)
                   and not read_json(out / "state.json", {}).get("history")):
                time.sleep(0.05)
            assert read_json(out / "state.json", {}).get("history"), "no epoch within 300 s"
            origin = time.time()
            moments = sorted(rng.uniform(0.0, 3.0) for _ in writers)
        for writer, moment in zip(writers, moments):
            time.sleep(max(0.0, origin + moment - time.time()))
            if writer.poll() is None:
                os.kill(writer.pid, signal.SIGKILL)
    finally:
        for writer, handle in zip(writers, handles):
            if writer.poll() is None:
                writer.kill()
            writer.wait(timeout=60)
            handle.close()
    kill_after = (phase, moments)
    texts = [log.read_text() for log in logs]
    codes = [writer.returncode for writer in writers]
    # A writer that was not killed either finished the run or was refused in one line.
    for code, text in zip(codes, texts):
        assert code in (0, 1, -signal.SIGKILL), text[-2000:]
        if code == 1:
            assert "is being trained by another process" in text and "Traceback" not in text
    assert codes.count(0) <= 1, codes
    killed_at = len(read_json(out / "state.json", {}).get("history", []))
    if phase == "training":
        assert 1 <= killed_at < epochs and -signal.SIGKILL in codes, (kill_after, codes)

    again = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, (kill_after, codes, again.stdout[-2000:], again.stderr[-2000:])
    if killed_at:
        assert f"resuming after epoch {killed_at}" in again.stdout, again.stdout[-2000:]
    assert history_of(out)["epoch"].tolist() == list(range(1, epochs + 1)), (kill_after, texts)
    metrics = read_json(out / "metrics.json")
    assert metrics["epochs_run"] == epochs and metrics["stopped_reason"] == "completed"
    assert json.loads((out / "state.json").read_text())["finished"]
    assert not list(out.glob("checkpoint-*")), sorted(p.name for p in out.iterdir())
    assert not list(out.parent.glob("alexnet.stale-*")) and not list(out.parent.glob("*.next"))


def test_a_report_step_being_run_elsewhere_stops_a_second_report_with_one_line(
        tmp_path, capsys, monkeypatch):
    from conftest import make_fer_folder

    monkeypatch.setenv("FER2013_PATH", str(make_fer_folder(tmp_path / "faces")))
    run = Run(tmp_path / "runs" / "smoke")
    with run.step_lock("01_eda"):  # another report is executing the first step
        code = main(["report", "--profile", "smoke", "--runs-root", str(tmp_path / "runs"),
                     "--reports-root", str(tmp_path / "reports")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"report step 01_eda is being run by another process (pid {os.getpid()} on " in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (run.directory / "notebooks" / "01_eda.ipynb").exists()  # nothing was run
    assert not (tmp_path / "reports" / "smoke" / "01_eda.html").exists()


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


def test_hostile_strings_in_markdown_and_tables_of_a_page_render_escaped(tmp_path):
    """A notebook's Markdown outputs (profile names, warnings naming files) and its tables
    (``plots.table``: model and class names) reach the HTML page as text, not as markup."""
    import nbformat
    import pandas as pd
    from IPython.display import Markdown

    from ferlib import pipeline, plots

    hostile = "<script>alert(1)</script>"
    frame = pd.DataFrame({"class": [hostile, "happy"], hostile: [0.5, 0.25]})
    cell = nbformat.v4.new_code_cell("")
    cell.outputs = [
        nbformat.v4.new_output("display_data", {
            "text/markdown": Markdown(f"**profile** `{hostile}`: {hostile} <img src=x "
                                      f"onerror=alert(2)>\n\n| a |\n|---|\n| {hostile} |"
                                      )._repr_markdown_(), "text/plain": "md"}),
        nbformat.v4.new_output("display_data", {"text/html": plots.table(frame)._repr_html_(),
                                                "text/plain": "table"})]
    notebook = nbformat.v4.new_notebook(cells=[cell])
    nbformat.write(notebook, tmp_path / "page.ipynb")
    pipeline.render_html(tmp_path / "page.ipynb", tmp_path / "page.html", {"profile": hostile})
    page = (tmp_path / "page.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 6  # every one shown as text
    assert "<strong>profile</strong>" in page and "<td" in page  # Markdown still renders


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
