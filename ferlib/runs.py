"""Run directories and their bookkeeping: atomic writes, manifests, settings fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import yaml

from ferlib import PROJECT_ROOT

PACKAGES = ("tensorflow", "keras", "keras-hub", "jax", "torch", "numpy", "pandas",
            "scikit-learn", "papermill", "nbconvert")


def run_dir(profile: str, root: Path | None = None) -> Path:
    """``runs/<profile>/`` under the project root (or ``root``)."""
    return Path(root or PROJECT_ROOT / "runs") / profile


TEMP_MARK = ".ferlib-"
"""In every temporary file name, followed by the writer's pid: a leftover of a dead writer
can be told from a live writer's file (:func:`remove_dead_temporaries`)."""


def temporary_file(path: Path, suffix: str = ".tmp") -> Path:
    """A new, empty, uniquely named file beside ``path`` (``mkstemp``: created with O_EXCL, so a
    symlink planted at a guessable name is never followed), readable by all."""
    handle, temp = tempfile.mkstemp(dir=Path(path).parent, suffix=suffix,
                                    prefix=f".{Path(path).name}{TEMP_MARK}{os.getpid()}-")
    os.close(handle)
    os.chmod(temp, 0o644)  # mkstemp makes 0600 files; artifacts are for sharing
    return Path(temp)


def remove_dead_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files in ``folder`` whose writer is no longer running (a process
    killed between writing and renaming); a live writer's files are left alone."""
    removed = []
    for temp in Path(folder).glob(f".*{TEMP_MARK}*"):
        try:
            pid = int(temp.name.split(TEMP_MARK, 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            temp.unlink(missing_ok=True)
            removed.append(temp)
        except (ValueError, PermissionError, IndexError):
            continue  # not ours, or another user's live process
    return removed


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write via a temp file in the same folder and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_file(path)
    handle = os.open(temp, os.O_WRONLY | os.O_TRUNC)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _finite(value):
    """NaN and infinities become null: JSON has no NaN, and strict readers reject it."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(path: Path, value) -> None:
    text = json.dumps(_finite(value), indent=2, sort_keys=True, default=_jsonable,
                      allow_nan=False)
    atomic_write_text(path, text + "\n")


def read_json(path: Path, default=None):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def write_yaml(path: Path, value) -> None:
    atomic_write_text(path, yaml.safe_dump(value, sort_keys=False))


def atomic_save(save, path: Path) -> None:
    """Call ``save(temp_path)`` (e.g. ``model.save``) then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keras insists on the final suffix (.keras / .weights.h5), so keep it on the temp name.
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".weights.h5") else path.suffix
    temp = temporary_file(path, suffix=suffix)
    try:
        save(str(temp))
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def fingerprint(value) -> str:
    """Stable short hash of a JSON-able value (used to notice changed settings or inputs)."""
    text = json.dumps(value, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_hash(*modules: str) -> str:
    """Short hash of the source of ``ferlib`` modules (``"train"``, ``"models"``...).

    Part of every fingerprint that decides whether a result is still current, so a fix to the
    code that computed a result invalidates it, and a change elsewhere does not.
    """
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for module in sorted(set(modules)):
        digest.update(module.encode() + b"\0" + (package / f"{module}.py").read_bytes())
    return digest.hexdigest()[:16]


_PLAIN = (int, float, str, bytes, bool, type(None))


def _plain(value) -> bool:
    """A constant whose repr is its content (numbers, strings, and containers of them)."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (tuple, list, frozenset, set)):
        return all(_plain(item) for item in value)
    if isinstance(value, dict):
        return all(_plain(key) and _plain(item) for key, item in value.items())
    return False


def _code_objects(code):
    yield code
    for constant in code.co_consts:
        if hasattr(constant, "co_code"):  # nested functions, lambdas, classes, comprehensions
            yield from _code_objects(constant)


def _referenced(function, package: str):
    """The objects a function's code names: its module's globals, names it imports inside
    (``from ferlib.x import y``) and attributes of package modules (``metrics.softmax``)."""
    import dis
    import importlib
    import types

    namespace = getattr(function, "__globals__", {})
    for code in _code_objects(function.__code__):
        imported = None
        module_object = None
        for instruction in dis.get_instructions(code):
            name = instruction.argval
            if instruction.opname == "IMPORT_NAME":
                imported = name
                continue
            if instruction.opname == "IMPORT_FROM" and imported:
                module = sys.modules.get(imported) or importlib.import_module(imported)
                if hasattr(module, name):
                    yield name, getattr(module, name)
                continue
            if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME") and name in namespace:
                value = namespace[name]
                module_object = value if isinstance(value, types.ModuleType) else None
                yield name, value
                continue
            if instruction.opname in ("LOAD_ATTR", "LOAD_METHOD") and module_object is not None:
                if module_object.__name__.startswith(package) and hasattr(module_object, name):
                    yield name, getattr(module_object, name)
                module_object = None


def _normalised_source(item) -> str:
    """Source text without import statements, docstrings and comments (``ast.unparse``): a
    function moved elsewhere imports its helpers from elsewhere, and that is not a change."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(item)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        kept = [statement for statement in body
                if not isinstance(statement, (ast.Import, ast.ImportFrom))]
        if (kept and isinstance(kept[0], ast.Expr) and isinstance(kept[0].value, ast.Constant)
                and isinstance(kept[0].value.value, str)):
            kept = kept[1:]  # the docstring
        node.body = kept or [ast.Pass()]
    return ast.unparse(tree)


def code_closure(*entries, package: str = "ferlib", exclude_modules=()) -> dict:
    """The functions, classes and plain constants of ``package`` that ``entries`` use,
    directly or through each other: ``{qualified name: source text or repr}``.

    Module names, imports, docstrings and comments are not part of the result, so moving a
    function unchanged to another module changes nothing; an edit to the code of any function
    in the closure changes its text. Objects defined
    in ``exclude_modules`` (and what only they use) are left out.
    """
    import inspect

    found: dict[str, str] = {}
    pending = list(entries)
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        module = getattr(item, "__module__", "") or ""
        if not module.startswith(package) or module in exclude_modules:
            continue
        try:
            found[item.__qualname__] = _normalised_source(item)
        except (OSError, TypeError):  # no source file: fall back on the bytecode
            found[item.__qualname__] = repr(getattr(item, "__code__", item).co_code
                                            if hasattr(item, "__code__") else item)
        functions = ([item] if inspect.isfunction(item) else
                     [member for member in vars(item).values() if inspect.isfunction(member)]
                     if inspect.isclass(item) else [])
        for function in functions:
            for name, value in _referenced(function, package):
                if inspect.isfunction(value) or inspect.isclass(value):
                    pending.append(value)
                elif isinstance(value, (dict, tuple, list)) and not _plain(value):
                    # A registry ({"alexnet": build_alexnet, ...}): follow what it holds.
                    members = value.values() if isinstance(value, dict) else value
                    pending.extend(member for member in members
                                   if inspect.isfunction(member) or inspect.isclass(member))
                    keys = sorted(map(str, value)) if isinstance(value, dict) else len(value)
                    found.setdefault(f"{function.__qualname__}:{name}", repr(keys))
                elif _plain(value) and not name.startswith("__"):
                    # A constant is named by the module-free name it is used under.
                    found.setdefault(f"{function.__qualname__}:{name}", repr(value))
    return found


def code_fingerprint(*entries, package: str = "ferlib", exclude_modules=()) -> str:
    """Short hash of :func:`code_closure` (16 hex digits): the code that ``entries`` run."""
    closure = code_closure(*entries, package=package, exclude_modules=exclude_modules)
    digest = hashlib.sha256()
    for name in sorted(closure):
        digest.update(f"{name}\0{closure[name]}\0".encode())
    return digest.hexdigest()[:16]


def git_commit() -> str | None:
    """HEAD's sha, with "-dirty" when tracked files differ from it. The rendered reports are
    outputs, not inputs: re-rendering them does not make the next render "dirty"."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)reports"],
                               cwd=PROJECT_ROOT, text=True, capture_output=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def environment() -> dict:
    """Machine and software facts for a manifest."""
    return {"python": platform.python_version(), "platform": platform.platform(),
            "processor": cpu_name(), "cpu_count": os.cpu_count(),
            "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
            "packages": package_versions(), "git_commit": git_commit(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def gpu_names() -> list[str]:
    """Names of the NVIDIA GPUs ``nvidia-smi`` sees (empty without a driver or a GPU)."""
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 text=True, capture_output=True, check=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listing.splitlines() if line.strip()]


def provenance(params: dict, data_path: Path, data_hash: str, env: dict | None = None) -> dict:
    """What produced a report, for the header of every rendered page and the manifest.

    Parameters
    ----------
    params : dict
        Resolved parameters (``profile`` is read).
    data_path : Path
        The dataset file or folder; only its name is kept, so no machine path leaks.
    data_hash : str
        Its sha256 (``ferlib.data.source_hash``).
    env : dict, optional
        ``environment()`` if already computed (it runs git), else computed here.

    Returns
    -------
    dict
        ``profile``, ``dataset`` (file name), ``dataset_sha256``, ``git_commit`` (full sha or
        None outside git), ``git_dirty`` (uncommitted changes to tracked files),
        ``tensorflow``, ``keras``, ``keras_hub`` (versions or None), ``keras_backend``,
        ``machine`` (GPU names if any, CPU model and core count), ``training`` (the
        distribution setting and global batch sizes) and ``date``.
    """
    env = environment() if env is None else env
    commit = env.get("git_commit") or ""
    packages = env.get("packages", {})
    cpu = f"{env.get('processor') or 'unknown CPU'} ({env.get('cpu_count') or '?'} cores)"
    gpus = gpu_names()
    machine = f"{', '.join(gpus)} GPU; {cpu}" if gpus else cpu
    return {"profile": params["profile"], "dataset": Path(data_path).name,
            "dataset_sha256": data_hash,
            "git_commit": commit.removesuffix("-dirty") or None,
            "git_dirty": commit.endswith("-dirty"),
            "tensorflow": packages.get("tensorflow"), "keras": packages.get("keras"),
            "keras_hub": packages.get("keras-hub"), "keras_backend": env.get("keras_backend"),
            "machine": machine, "training": training_setup(params), "date": env.get("time")}


def training_setup(params: dict) -> str | None:
    """``train.distribution`` and the global batch size(s): "none; global batch 64" or
    "data_parallel; global batch alexnet 64, vit 128". The batch is the global one, split across
    devices when data-parallel; the learning rate is used as given (not scaled)."""
    if "train" not in params:
        return None
    from ferlib.config import model_settings

    sizes = {name: model_settings(params, name)["train"]["batch_size"]
             for name in params.get("models", [])}
    batches = (str(next(iter(set(sizes.values())))) if len(set(sizes.values())) == 1
               else ", ".join(f"{name} {size}" for name, size in sizes.items()))
    return (f"distribution {params['train']['distribution']}; global batch {batches}; "
            f"learning rate not scaled with the device count")


def converged_by_curve(epochs_run: int, best_epoch: int, patience: int | None) -> bool:
    """The study's convergence rule: the best PublicTest epoch lies at least ``patience``
    epochs (3 when the profile has no early stopping) before the last epoch run."""
    return epochs_run - best_epoch >= (patience or 3)
