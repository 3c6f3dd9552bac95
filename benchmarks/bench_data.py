"""Benchmark ``data``: cold load of FER2013 (decode + hash + cache write) and the cached load.

Run by ``run_all.py`` (``--only data``); it has no command line of its own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import common

NAME = "data"
COLD_LIMIT_SECONDS = 15.0
CACHED_LIMIT_SECONDS = 1.0


def run(quick: bool = False, context: dict | None = None) -> dict:
    """Load the dataset into an empty cache folder (cold), then again from that cache.

    ``quick`` changes nothing: one cold and one cached load is already the smallest check.
    """
    from ferlib.data import resolve_data_path
    from ferlib.data import load_fer2013

    path = resolve_data_path()
    with tempfile.TemporaryDirectory(prefix="ferlib-bench-cache-") as cache_dir:
        loaded = {}

        def load():
            loaded["data"] = load_fer2013(path, cache=True, cache_dir=Path(cache_dir))

        cold_seconds = common.seconds_of(load)
        cached_seconds = common.seconds_of(load)
    data = loaded["data"]
    return {
        "settings": {"path": str(path), "size_mb": round(path.stat().st_size / 2**20, 1),
                     "cache": "fresh temporary folder: cold = empty, cached = second call"},
        "images": len(data),
        "cold_seconds": cold_seconds,
        "cached_seconds": cached_seconds,
        "checks": {"cold_seconds": common.check(cold_seconds, COLD_LIMIT_SECONDS, "s"),
                   "cached_seconds": common.check(cached_seconds, CACHED_LIMIT_SECONDS, "s")},
    }


def print_section(section: dict) -> None:
    checks = section["checks"]
    common.print_table(
        f"data: load {section['settings']['path']} ({section['images']:,} images)",
        ["load", "seconds", "target"],
        [["cold (empty cache)", section["cold_seconds"], common.verdict(checks["cold_seconds"])],
         ["cached", section["cached_seconds"], common.verdict(checks["cached_seconds"])]])
