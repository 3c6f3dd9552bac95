"""Benchmark ``smoke_report``: wall time of ``make report PROFILE=smoke``, in a throw-away folder.

Runs ``python -m ferlib report --profile smoke --force`` as a subprocess with its runs and
reports roots in a temporary folder, so the project's ``runs/`` and ``reports/`` are never
touched. The dataset cache is the project's usual one (``.cache/``, or ``FERLIB_CACHE``), as
in ``make report``. ``quick`` changes nothing: the smoke profile is already the smallest run.

Run by ``run_all.py`` (``--only smoke_report``); it has no command line of its own.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import common

NAME = "smoke_report"
PROFILE = "smoke"
OUTPUT_TAIL_CHARACTERS = 3000


def run(quick: bool = False, context: dict | None = None) -> dict:
    from ferlib import PROJECT_ROOT

    with tempfile.TemporaryDirectory(prefix="ferlib-bench-report-") as root:
        command = [sys.executable, "-m", "ferlib", "report", "--profile", PROFILE, "--force",
                   "--runs-root", str(Path(root) / "runs"),
                   "--reports-root", str(Path(root) / "reports")]
        finished = {}
        seconds = common.seconds_of(lambda: finished.update(process=subprocess.run(
            command, cwd=PROJECT_ROOT, capture_output=True, text=True)))
        process = finished["process"]
        reports = sorted(p.name for p in (Path(root) / "reports" / PROFILE).glob("*.html"))
    if process.returncode:
        output = (process.stdout + process.stderr)[-OUTPUT_TAIL_CHARACTERS:]
        raise RuntimeError(f"{' '.join(command[1:])} exited with {process.returncode} after "
                           f"{seconds:.0f} s:\n{output}")
    return {
        "settings": {"command": " ".join(["python", *command[1:]]).replace(root, "<tmp>"),
                     "data_cache": "project default (.cache/ or FERLIB_CACHE)"},
        "seconds": seconds,
        "html_reports": reports,
    }


def print_section(section: dict) -> None:
    common.print_table(
        f"smoke_report: {section['settings']['command']}",
        ["what", "seconds", "HTML pages"],
        [["make report PROFILE=smoke", section["seconds"], len(section["html_reports"])]])
