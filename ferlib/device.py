"""A lent GPU session (docs/gpu.md): what travels there, training within a time budget, what
comes back, and the merge of what came back into ``runs/<profile>/`` here.

- **Data there.** :func:`pack_data` turns the dataset file (the FER2013 zip) into one xz
  stream of its bytes, split into parts, and a manifest (``data.json``) with the sha256 of every
  part and of the file. xz's solid compression drops the per-entry zip headers and the JPEG
  headers the 35,887 files share; :func:`unpack_data` rebuilds the very same file (bit-exact,
  checked against the manifest's sha256), so the data fingerprint of a training there equals
  the one computed here.
- **Training there.** :func:`train_session` trains a profile's models one after another with
  ``ferlib.train.train`` and stops cleanly after the epoch that leaves no room for another
  before the budget's deadline. An epoch is committed when it ends, so a stopped model is an
  ordinary unfinished run: it resumes where it stopped.
- **Results back.** :func:`pack_results` puts the finished models (weights as float16, every
  other file as written) and the resume state of unfinished ones (exact, float32) into one tar
  split into parts, within the return limits (:data:`RETURN_LIMITS`), with a manifest
  (``results.json``) that says what was left out.
- **Here.** :func:`merge_results` checks the parts, checks that this checkout computes the same
  training fingerprint for every model (else ``make report`` would train it again), and puts
  the models into ``runs/<profile>/models/`` (best.keras back as float32, its values rounded to
  float16), the PrivateTest scorings into the ledger and the session record into
  ``device_sessions.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import lzma
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from ferlib import artifacts
from ferlib.artifacts import ModelRun, Run
from ferlib.runs import atomic_write_bytes, read_json, write_json

MIB = 2 ** 20
DATA_MANIFEST = "data.json"
RESULTS_MANIFEST = "results.json"
RESULTS_TAR = "results.tar"
SESSION = "session.json"
SESSION_LOG = "train.log"
FLOAT16_MODEL = "best.float16.keras"
"""The name ``best.keras`` travels under, its float32 weights stored as float16."""
MODEL_RESULT_FILES = (artifacts.HISTORY, artifacts.TIMING, artifacts.PREDICTIONS,
                      artifacts.METRICS, artifacts.SETTINGS, artifacts.STATE,
                      artifacts.CALIBRATION)
RESUME_FILES = (artifacts.STATE, artifacts.SETTINGS, artifacts.HISTORY, artifacts.TIMING)
KERAS_WEIGHTS = "model.weights.h5"   # inside a .keras zip (Keras 3's saving format)
ORIGINAL_DTYPE = "ferlib_original_dtype"


@dataclasses.dataclass(frozen=True)
class ReturnLimits:
    """What one device call can bring back."""

    files: int = 8
    file_bytes: int = 16 * MIB
    total_bytes: int = 64 * MIB


RETURN_LIMITS = ReturnLimits()


class DeviceError(ValueError):
    """A transfer or merge that cannot go on: one line saying what and what to do."""


class SessionBudgetSpent(Exception):
    """Raised after a committed epoch when the next one would end past the deadline."""


# ----------------------------------------------------------------------------- small helpers

def sha256_file(path: Path) -> str:
    from ferlib.data import file_sha256

    return file_sha256(path)


def _chunks(paths, size: int = 4 * MIB):
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(size):
                yield chunk


def split_file(path: Path, folder: Path, stem: str, part_bytes: int) -> list[dict]:
    """Cut ``path`` into ``stem.1``, ``stem.2``, ... of at most ``part_bytes`` each, in
    ``folder``; returns ``[{"file", "bytes", "sha256"}]`` in order."""
    parts = []
    with open(path, "rb") as source:
        index = 1
        while chunk := source.read(part_bytes):
            name = f"{stem}.{index}"
            atomic_write_bytes(Path(folder) / name, chunk)
            parts.append({"file": name, "bytes": len(chunk),
                          "sha256": hashlib.sha256(chunk).hexdigest()})
            index += 1
    return parts


def check_parts(folder: Path, parts: list[dict], what: str, hint: str) -> list[Path]:
    """The part files, each present with its recorded size and sha256; else one line naming
    the first that is not."""
    paths = []
    for number, part in enumerate(parts, start=1):
        path = Path(folder) / part["file"]
        if not path.exists():
            raise DeviceError(f"{what}: part {number} of {len(parts)} ({path}) is missing; "
                              f"{hint}")
        if path.stat().st_size != part["bytes"] or sha256_file(path) != part["sha256"]:
            raise DeviceError(f"{what}: part {number} of {len(parts)} ({path}) is damaged "
                              f"(size or sha256 differs from the manifest); {hint}")
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- data there

def pack_data(source: Path, folder: Path, parts: int = 2,
              preset: int = 9 | lzma.PRESET_EXTREME) -> dict:
    """Compress ``source`` (the dataset file) with xz into ``parts`` parts of equal size in
    ``folder``, and write ``folder/data.json``.

    Returns
    -------
    dict
        The manifest: ``source`` (file name), ``sha256`` and ``bytes`` of the file, ``format``
        ("xz"), ``parts`` (``file``, ``bytes``, ``sha256`` each) and ``packed_bytes``.
    """
    source, folder = Path(source), Path(folder)
    if not source.is_file():
        raise DeviceError(f"{source}: no such file (pack_data packs one dataset file, e.g. "
                          f"data/fer2013.zip)")
    if parts < 1:
        raise DeviceError(f"parts: {parts}; expected 1 or more")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{source.name}.xz.*"):
        old.unlink()
    digest = hashlib.sha256()
    compressor = lzma.LZMACompressor(preset=preset)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        stream = Path(scratch) / f"{source.name}.xz"
        with open(stream, "wb") as out:
            for chunk in _chunks([source]):
                digest.update(chunk)
                out.write(compressor.compress(chunk))
            out.write(compressor.flush())
        packed = stream.stat().st_size
        pieces = split_file(stream, folder, f"{source.name}.xz", -(-packed // parts))
    manifest = {"source": source.name, "sha256": digest.hexdigest(),
                "bytes": source.stat().st_size, "format": "xz", "parts": pieces,
                "packed_bytes": packed}
    write_json(folder / DATA_MANIFEST, manifest)
    return manifest


def data_parts_present(folder: Path) -> str:
    """One line: which of the data parts are here so far (device call 1 brings some)."""
    manifest = _data_manifest(folder)
    present = [number for number, part in enumerate(manifest["parts"], start=1)
               if (Path(folder) / part["file"]).exists()]
    return (f"data {manifest['source']}: parts present {present or 'none'} of "
            f"{len(manifest['parts'])} ({manifest['packed_bytes'] / MIB:.1f} MiB packed)")


def _data_manifest(folder: Path) -> dict:
    path = Path(folder) / DATA_MANIFEST
    if not path.exists():
        raise DeviceError(f"{path}: no data manifest; pack the data first (benchmarks/"
                          f"gpu_study.sh pack) and carry the manifest with the first call")
    return read_json(path)


def unpack_data(folder: Path, target: Path) -> Path:
    """Rebuild the dataset file from the parts in ``folder`` into ``target/<source name>``,
    verified: its sha256 must equal the manifest's. A file already there with that sha256 is
    kept (a second call on a warm machine). Returns its path."""
    manifest = _data_manifest(folder)
    destination = Path(target) / manifest["source"]
    if destination.exists() and sha256_file(destination) == manifest["sha256"]:
        return destination
    paths = check_parts(folder, manifest["parts"], f"data {manifest['source']}",
                        "carry every part (call 1 and call 2 back to back, so the machine "
                        "keeps call 1's files), or pack the data again")
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    decompressor = lzma.LZMADecompressor()
    temp = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    try:
        with open(temp, "wb") as out:
            for chunk in _chunks(paths):
                plain = decompressor.decompress(chunk)
                digest.update(plain)
                out.write(plain)
        if digest.hexdigest() != manifest["sha256"]:
            raise DeviceError(f"data {manifest['source']}: the rebuilt file's sha256 "
                              f"{digest.hexdigest()[:12]} differs from the original's "
                              f"{manifest['sha256'][:12]}; pack the data again")
        os.replace(temp, destination)
    finally:
        temp.unlink(missing_ok=True)
    return destination


# ----------------------------------------------------------------------------- training there

def check_environment() -> dict:
    """Import what training imports under this backend; one line naming a missing module."""
    try:
        import keras
        import keras_hub  # noqa: F401  (the ViT's backbone)

        import ferlib.calibration
        import ferlib.train  # noqa: F401  (the training path and what it imports)
    except ModuleNotFoundError as error:
        raise DeviceError(f"this machine lacks the Python module {error.name!r}: add its wheel "
                          f"to benchmarks/gpu_wheels.txt and pack again") from None
    from ferlib.runs import gpu_names
    from ferlib.train import machine_description

    return {"keras_backend": keras.backend.backend(), "machine": machine_description(),
            "gpus": gpu_names()}


def train_session(params: dict, budget_seconds: float, run_dir, *, models=None,
                  reserve_seconds: float = 45.0, min_model_seconds: float = 60.0,
                  session_file: Path | None = None) -> dict:
    """Train ``models`` (default: the profile's) one after another within ``budget_seconds``.

    After every committed epoch the time of that epoch is taken as the time of the next; when
    it would end later than ``budget_seconds - reserve_seconds`` after the start, the model
    stops there, unfinished and resumable (the reserve covers the final evaluation of a model
    that finishes and the packing). The first model always starts (and commits at least one
    epoch); a later one is not started with less than ``min_model_seconds`` left.

    Returns
    -------
    dict
        The session record (also written to ``session_file`` after every model): profile,
        budget, environment, GPU names, the training machine, the training code's fingerprint,
        and per model ``outcome`` (finished / stopped / not started), epochs and seconds.
    """
    from ferlib.data import load_dataset
    from ferlib.runs import environment, gpu_names
    from ferlib.train import machine_description, train, training_code

    started = time.monotonic()
    deadline = started + budget_seconds - reserve_seconds
    session = {"profile": params["profile"], "budget_seconds": budget_seconds,
               "reserve_seconds": reserve_seconds, "run_dir": str(Path(run_dir).resolve()),
               "environment": environment(), "gpus": gpu_names(),
               "machine": machine_description(), "training_code": training_code(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": {}}

    def save():
        if session_file is not None:
            write_json(session_file, session)

    data = load_dataset(params, progress=True)
    session["load_data_seconds"] = round(time.monotonic() - started, 1)
    save()
    for index, name in enumerate(models or params["models"]):
        left = deadline - time.monotonic()
        if index and left < min_model_seconds:
            session["models"][name] = {"outcome": "not started",
                                       "why": f"{max(left, 0):.0f} s left"}
            print(f"[session] {name}: not started ({max(left, 0):.0f} s left of the budget)",
                  flush=True)
            save()
            continue
        model_started = clock = time.monotonic()
        record = {}

        def stop_before_deadline(row, record=record):
            nonlocal clock
            now = time.monotonic()
            record["last_epoch"], epoch_seconds, clock = row["epoch"], now - clock, now
            if now + epoch_seconds > deadline:
                raise SessionBudgetSpent(row["epoch"])

        try:
            result = train(name, data, params, run_dir, on_epoch=stop_before_deadline)
            record = {"outcome": "finished", "epochs_run": result["epochs_run"],
                      "stopped_reason": result["stopped_reason"]}
        except SessionBudgetSpent as stop:
            record = {"outcome": "stopped", "after_epoch": stop.args[0],
                      "why": "the next epoch would end past the session's deadline"}
            print(f"[session] {name}: stopped after epoch {stop.args[0]} (budget); it resumes "
                  f"from there next session", flush=True)
        record["seconds"] = round(time.monotonic() - model_started, 1)
        session["models"][name] = record
        save()
    session["seconds"] = round(time.monotonic() - started, 1)
    save()
    return session


# ----------------------------------------------------------------------------- results back

def convert_keras_floats(source: Path, target: Path, to_dtype: str) -> None:
    """Copy a ``.keras`` file with its float32 weights stored as float16 (``to_dtype`` =
    "float16"), or back (``"float32"``: only datasets that were float32 before). Config and
    metadata are copied byte for byte; Keras loads either."""
    import h5py
    import numpy as np

    with tempfile.TemporaryDirectory() as scratch:
        original, converted = Path(scratch) / "in.h5", Path(scratch) / "out.h5"
        with zipfile.ZipFile(source) as archive:
            members = {info.filename: archive.read(info) for info in archive.infolist()}
        if KERAS_WEIGHTS not in members:
            raise DeviceError(f"{source}: not a Keras 3 model file ({KERAS_WEIGHTS} missing)")
        original.write_bytes(members[KERAS_WEIGHTS])
        with h5py.File(original, "r") as old, h5py.File(converted, "w") as new:
            new.attrs.update(old.attrs)

            def copy(name, item):
                if isinstance(item, h5py.Group):
                    new.require_group(name).attrs.update(item.attrs)
                    return
                value, attrs = item[()], dict(item.attrs)
                if to_dtype == "float16" and item.dtype == np.float32:
                    value, attrs[ORIGINAL_DTYPE] = value.astype(np.float16), "float32"
                elif to_dtype == "float32" and attrs.pop(ORIGINAL_DTYPE, None) == "float32":
                    value = value.astype(np.float32)
                new.create_dataset(name, data=value).attrs.update(attrs)

            old.visititems(copy)
        members[KERAS_WEIGHTS] = converted.read_bytes()
        temp = Path(scratch) / "model.keras"
        with zipfile.ZipFile(temp, "w") as archive:
            for name, payload in members.items():
                archive.writestr(name, payload)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(temp, target)


def _model_dirs(run_dir: Path) -> list[ModelRun]:
    """The trainings of a run (``models/<name>/`` with a state.json), neither a retrain in
    progress (.next) nor a replaced run (.stale-)."""
    models = Path(run_dir) / "models"
    return [ModelRun(state.parent) for state in sorted(models.glob(f"*/{artifacts.STATE}"))
            if "." not in state.parent.name]


def pack_results(run_dir: Path, out: Path, *, session_file: Path | None = None,
                 log_file: Path | None = None, limits: ReturnLimits = RETURN_LIMITS) -> dict:
    """Pack what the reports need into ``out``: ``results.tar.1..N`` and ``results.json``.

    In order, while the limits allow: the session record, its log and the PrivateTest ledger;
    every finished model (history, timing, predictions, metrics, settings, state, calibration
    and best.keras with float16 weights); the resume state of every unfinished model (state,
    settings, history, timing, the last checkpoint and the best epoch's weights, exact). A
    model that does not fit is listed in ``left_out`` with its size.

    Returns
    -------
    dict
        The manifest written to ``out/results.json``.
    """
    run_dir, out = Path(run_dir), Path(out)
    session = read_json(session_file, {}) if session_file else {}
    out.mkdir(parents=True, exist_ok=True)
    room = min(limits.total_bytes, (limits.files - 1) * limits.file_bytes) - MIB  # manifest
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        groups = [("session", [(SESSION, session_file), (SESSION_LOG, log_file),
                               (artifacts.LEDGER, Run(run_dir).ledger)])]
        models = {}
        for model in _model_dirs(run_dir):
            name = model.directory.name
            state = model.read_state() or {}
            arc = f"models/{name}"
            if state.get("finished") and model.metrics.exists():
                fp16 = scratch / name / FLOAT16_MODEL
                convert_keras_floats(model.best_model, fp16, "float16")
                files = [(f"{arc}/{file}", model.directory / file)
                         for file in MODEL_RESULT_FILES] + [(f"{arc}/{FLOAT16_MODEL}", fp16)]
                models[name] = {"outcome": "finished", "epochs": len(state["history"])}
            else:
                files = [(f"{arc}/{file}", model.directory / file) for file in
                         (*RESUME_FILES, state.get("checkpoint"), state.get("best_weights"))
                         if file]
                models[name] = {"outcome": "unfinished", "epochs": len(state.get("history", []))}
            groups.append((name, files))
        included, left_out, used = [], {}, 0
        for name, files in groups:
            files = [(arc, Path(path)) for arc, path in files if path and Path(path).exists()]
            size = sum(path.stat().st_size + 1024 for _, path in files)  # + tar headers
            if used + size > room:
                left_out[name] = {"bytes": size, "why": f"does not fit the {room / MIB:.0f} MiB "
                                                        f"left in one return"}
                continue
            used += size
            included.extend(files)
            if name in models:
                models[name]["returned_bytes"] = size
        tar_file = scratch / RESULTS_TAR
        with tarfile.open(tar_file, "w") as tar:
            for arc, path in included:
                tar.add(path, arcname=arc)
        for old in out.glob(f"{RESULTS_TAR}.*"):
            old.unlink()
        parts = split_file(tar_file, out, RESULTS_TAR, limits.file_bytes)
    manifest = {"profile": session.get("profile"), "session": session.get("models", {}),
                "models": models, "left_out": left_out, "parts": parts,
                "bytes": sum(part["bytes"] for part in parts), "weights": "float16",
                "limits": dataclasses.asdict(limits),
                "packed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(out / RESULTS_MANIFEST, manifest)
    returned = [out / RESULTS_MANIFEST, *(out / part["file"] for part in parts)]
    sizes = [path.stat().st_size for path in returned]
    if (len(returned) > limits.files or max(sizes) > limits.file_bytes
            or sum(sizes) > limits.total_bytes):
        raise DeviceError(f"results: {len(returned)} files, {sum(sizes) / MIB:.1f} MiB exceed "
                          f"the return limits {limits}")  # by construction this cannot happen
    return manifest


# ----------------------------------------------------------------------------- here: merge

def _extract(source: Path, scratch: Path) -> dict:
    manifest_file = Path(source) / RESULTS_MANIFEST
    if not manifest_file.exists():
        raise DeviceError(f"{manifest_file}: missing; give the folder the device call's files "
                          f"were fetched into")
    manifest = read_json(manifest_file)
    paths = check_parts(source, manifest["parts"], "results",
                        "fetch every file the device call returned")
    tar_file = scratch / RESULTS_TAR
    with open(tar_file, "wb") as out:
        out.writelines(_chunks(paths))
    with tarfile.open(tar_file) as tar:
        tar.extractall(scratch / "content", filter="data")
    return manifest


def merge_results(source: Path, params: dict, run_dir: Path, *, say=print) -> dict:
    """Put a device session's results (a folder holding ``results.json`` and its parts) into
    ``run_dir`` (``runs/<profile>/``).

    Every model must have the training fingerprint this checkout computes for it (settings,
    data, training code); otherwise one line says what differs and nothing is merged. A
    finished model replaces what is there (an earlier, different run is moved aside as
    ``<name>.stale-<date>``); an unfinished one is merged only if it is further along than what
    is there, and resumes from there (next device session, or ``ferlib train`` here).

    Returns
    -------
    dict
        ``{model name: what was done}``.
    """
    from ferlib.config import model_settings
    from ferlib.data import load_dataset
    from ferlib.runs import fingerprint
    from ferlib.train import describe_change, training_key_parts

    if params["cv_folds"]:
        raise DeviceError("gpu-merge: merges trainings on the official split (cv_folds: 0); "
                          "this profile cross-validates")
    run = Run(run_dir)
    run.directory.mkdir(parents=True, exist_ok=True)
    done = {}
    with tempfile.TemporaryDirectory(dir=run.directory, prefix=".merge-") as scratch:
        scratch = Path(scratch)
        manifest = _extract(Path(source), scratch)
        content = scratch / "content"
        if manifest.get("profile") not in (None, params["profile"]):
            raise DeviceError(f"results: trained for profile {manifest['profile']!r}, not "
                              f"{params['profile']!r}; merge with --profile "
                              f"{manifest['profile']}")
        incoming = sorted((content / "models").glob("*")) if (content / "models").exists() \
            else []
        data = load_dataset(params) if incoming else None
        checked = []
        for folder in incoming:
            name, model = folder.name, ModelRun(folder)
            state = model.read_state()
            settings = model_settings(params, name)
            parts = training_key_parts(settings, data)
            if state.get("fingerprint") != fingerprint(parts):
                change = describe_change(read_json(model.settings), state.get("key_parts"),
                                         settings, parts)
                raise DeviceError(f"{name}: trained with other settings, data or code than this "
                                  f"checkout computes (device -> here: {change}); merge with the --set values "
                                  f"and the commit of the device run, or make report would "
                                  f"train it again")
            checked.append((name, model, state))
        for name, model, state in checked:
            done[name] = _merge_model(name, model, state, run, say)
        ledger = read_json(content / artifacts.LEDGER, [])
        known = run.test_scorings()
        added = [entry for entry in ledger if entry not in known]
        if added:
            write_json(run.ledger, known + added)
        session = read_json(content / SESSION)
        if session is not None:
            sessions = read_json(run.device_sessions, [])
            session["returned"] = {key: manifest[key] for key in ("models", "left_out", "bytes")}
            if session not in sessions:
                write_json(run.device_sessions, sessions + [session])
        for name, why in manifest.get("left_out", {}).items():
            say(f"[merge] {name}: not returned by the device ({why['bytes'] / MIB:.1f} MiB, "
                f"{why['why']})")
    return done


def _merge_model(name: str, incoming: ModelRun, state: dict, run: Run, say) -> str:
    live = run.model(name)
    present = live.read_state()
    finished = bool(state.get("finished"))
    same = present and present.get("fingerprint") == state["fingerprint"]
    if same and (present.get("finished")
                 or (not finished and len(present["history"]) >= len(state["history"]))):
        say(f"[merge] {name}: already here ({len(present['history'])} epochs), kept")
        return "kept"
    if finished:
        convert_keras_floats(incoming.directory / FLOAT16_MODEL, incoming.best_model, "float32")
        (incoming.directory / FLOAT16_MODEL).unlink()
    staging = live.directory.with_name(f".{name}.merging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(incoming.directory, staging)
    moved = None
    if live.directory.exists():
        if present and present.get("fingerprint") != state["fingerprint"]:
            moved = live.stale_copy()
            live.directory.rename(moved)
        else:
            shutil.rmtree(live.directory)  # the same training, less far along
    staging.rename(live.directory)
    # The device has no tensorboard package: its epochs get their TensorBoard files here.
    from ferlib import tensorboard_logs

    tensorboard_logs.log_epochs(live.directory, state["history"], state.get("timing", []),
                                only_missing=True)
    what = (f"finished ({len(state['history'])} epochs)" if finished
            else f"unfinished after epoch {len(state['history'])}: it resumes from there")
    say(f"[merge] {name}: {what}" + (f"; the earlier run moved aside as {moved.name}"
                                     if moved else ""))
    return "finished" if finished else "unfinished"


def describe_manifest(manifest: dict) -> str:
    """The returned files in one line each (sizes in MiB)."""
    lines = [f"{part['file']}: {part['bytes'] / MIB:.2f} MiB" for part in manifest["parts"]]
    lines.append(f"in all {manifest['bytes'] / MIB:.2f} MiB in {len(manifest['parts'])} parts "
                 f"+ {RESULTS_MANIFEST}")
    for name, model in manifest["models"].items():
        lines.append(f"{name}: {model['outcome']}, {model['epochs']} epochs"
                     + (f", {model['returned_bytes'] / MIB:.2f} MiB"
                        if "returned_bytes" in model else ", NOT returned"))
    return "\n".join(lines)
