"""Project-level checks: the conda environment matches pyproject, notebooks are stored clean,
every module says what it is for."""

import ast
import re
import tomllib
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MODULES = sorted((ROOT / "ferlib").glob("*.py"))


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def environment():
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def test_environment_yml_is_for_conda(environment):
    assert environment["name"] == "ferlib"
    assert environment["channels"] == ["conda-forge"]
    assert "pip" in environment["dependencies"]


def test_environment_python_matches_requires_python(environment, pyproject):
    pins = [d for d in environment["dependencies"]
            if isinstance(d, str) and re.match(r"python\b", d)]
    assert len(pins) == 1, pins
    match = re.fullmatch(r"python\s*=+\s*(\d+)\.(\d+)(?:\.\*)?", pins[0])
    assert match, f"expected python=X.Y, got {pins[0]!r}"
    major, minor = match.groups()
    allowed = SpecifierSet(pyproject["project"]["requires-python"])
    # every patch release of the conda Python satisfies requires-python...
    assert f"{major}.{minor}.0" in allowed and f"{major}.{minor}.99" in allowed
    # ...and it is the oldest Python that pyproject supports, so conda users test the floor
    if int(minor) > 0:
        assert f"{major}.{int(minor) - 1}.99" not in allowed


def test_environment_installs_the_package_with_dev_extras(environment, pyproject):
    pip_sections = [d["pip"] for d in environment["dependencies"]
                    if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1
    assert "-e .[dev]" in pip_sections[0]
    assert "dev" in pyproject["project"]["optional-dependencies"]
    dev = pyproject["project"]["optional-dependencies"]["dev"]
    assert any(dependency.startswith("pytest") for dependency in dev)


# With no notebooks yet, pytest reports this test as skipped (empty parameter set).
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_clean_with_one_parameters_cell(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for number, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {number} has outputs"
            assert cell.execution_count is None, f"{path.name} cell {number} has a count"
    tagged = [cell for cell in notebook.cells
              if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters'"
    assert tagged[0].cell_type == "code"
    # papermill (and `papermill --help-notebook`) must see every parameter: it skips, with only
    # a log warning, any line holding two equals signs, e.g. one in a comment.
    names = {line.split("=")[0].strip() for line in tagged[0].source.splitlines()
             if "=" in line and not line.lstrip().startswith("#")}
    assert set(papermill.inspect_notebook(str(path))) == names


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_module_starts_with_a_docstring(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    docstring = ast.get_docstring(tree)
    assert docstring and docstring.strip(), f"{path.name} has no module docstring"
