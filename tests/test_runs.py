"""Tests for ferlib.runs' code fingerprints: they follow the functions that an entry point runs,
not the files they sit in. An edit to a used function changes the fingerprint; moving it
unchanged to another module, or editing an unused function, does not.

Each variant of the code is a small generated package (its own name, so imports stay apart)."""

import importlib
import sys
import textwrap

import pytest

from ferlib.runs import code_closure, code_fingerprint

HELPER = """
    RATE = 0.5

    def helper(x):
        return x * RATE
"""
UNUSED = """
    def unused():
        return "not called by the entry"
"""
ENTRY = """
    def entry(x):
        from {package}.{helper_module} import helper
        return helper(x) + 1
"""


def make_package(tmp_path, name, modules: dict) -> object:
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text("")
    for module, text in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(text))
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(f"{name}.core")
    finally:
        sys.path.remove(str(tmp_path))


def fingerprint_of(tmp_path, name, modules):
    core = make_package(tmp_path, name, modules)
    return code_fingerprint(core.entry, package=name), code_closure(core.entry, package=name)


def test_moving_a_used_function_keeps_the_fingerprint_and_editing_it_changes_it(tmp_path):
    original, closure = fingerprint_of(tmp_path, "pkg_original", {
        "core": HELPER + UNUSED + ENTRY.format(package="pkg_original", helper_module="core")})
    assert set(closure) == {"entry", "helper", "helper:RATE"}
    moved, _ = fingerprint_of(tmp_path, "pkg_moved", {
        "core": UNUSED + ENTRY.format(package="pkg_moved", helper_module="helpers"),
        "helpers": HELPER})
    assert moved == original
    documented, _ = fingerprint_of(tmp_path, "pkg_documented", {
        "core": HELPER.replace("return x * RATE", '"""Scale."""\n        return x * RATE  # why')
        + UNUSED + ENTRY.format(package="pkg_documented", helper_module="core")})
    assert documented == original
    unused_edited, _ = fingerprint_of(tmp_path, "pkg_unused", {
        "core": HELPER + UNUSED.replace("not called", "still not called")
        + ENTRY.format(package="pkg_unused", helper_module="core")})
    assert unused_edited == original
    edited, _ = fingerprint_of(tmp_path, "pkg_edited", {
        "core": HELPER.replace("x * RATE", "x * RATE * 2") + UNUSED
        + ENTRY.format(package="pkg_edited", helper_module="core")})
    assert edited != original
    constant, _ = fingerprint_of(tmp_path, "pkg_constant", {
        "core": HELPER.replace("0.5", "0.25") + UNUSED
        + ENTRY.format(package="pkg_constant", helper_module="core")})
    assert constant != original


def test_the_training_fingerprint_covers_the_loop_and_the_models_but_not_the_metrics():
    pytest.importorskip("keras")
    from ferlib import train

    closure = code_closure(train.train, exclude_modules=train.NOT_TRAINING_MODULES)
    for name in ("train", "learning_rate_at", "_batches", "reseed_generators", "build_alexnet",
                 "build_vit", "Augmentation", "augmentation_layers", "derived_seed"):
        assert name in closure, name
    for name in ("classification_metrics", "write_json", "model_settings", "load_fer2013"):
        assert name not in closure, name
    assert train.training_code() == train.training_code()
