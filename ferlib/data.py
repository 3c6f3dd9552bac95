"""FER2013 data layer: readers (CSV, image folders, zip), splits, folds, cache and data checks.

Every reader returns a :class:`FERData` with uint8 ``(N, 48, 48)`` images, integer labels in the
original CSV order (see :data:`ferlib.EMOTIONS`), a split per image (``train``, ``val``,
``test``) and a source id per image. Bad input raises :class:`FERDataError` naming the file and
row or entry; ``on_error="skip"`` skips bad entries instead and lists them in ``skipped``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import hashlib
import inspect
import io
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from ferlib import EMOTIONS, IMAGE_SIZE, PROJECT_ROOT

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm")
CSV_HEADER = ("emotion", "pixels", "Usage")
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
FILE_PREFIX_TO_SPLIT = {"training": "train", "publictest": "val", "privatetest": "test"}
# Top folder (any case) -> split. A file-name prefix above wins over the folder.
FOLDER_TO_SPLIT = {"train": "train", "training": "train",
                   "val": "val", "valid": "val", "validation": "val",
                   "test": "test", "testing": "test"}
CLASS_ALIASES = {
    "angry": "angry", "anger": "angry", "mad": "angry",
    "disgust": "disgust", "disgusted": "disgust", "disgusting": "disgust",
    "fear": "fear", "fearful": "fear", "afraid": "fear", "scared": "fear",
    "happy": "happy", "happiness": "happy", "joy": "happy", "happy_face": "happy",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise", "suprise": "surprise",
    "neutral": "neutral", "neutrality": "neutral", "calm": "neutral",
}


class FERDataError(ValueError):
    """Bad or unreadable input: the message names the file and the row or entry."""


class DatasetNotFoundError(FileNotFoundError):
    """No FER2013 source where we looked."""


DEFAULT_DATA_LOCATIONS = ("data/fer2013.zip", "data/fer2013.csv", "data/fer2013.csv.gz",
                          "data/fer2013")


def resolve_data_path(path: str | None = None, must_exist: bool = True) -> Path:
    """Where FER2013 is: ``$FER2013_PATH``, else ``path``, else the usual places under data/."""
    candidates = []
    if os.environ.get("FER2013_PATH"):
        candidates.append(Path(os.environ["FER2013_PATH"]).expanduser())
    elif path:
        candidates.append(Path(path).expanduser())
    else:
        candidates.extend(PROJECT_ROOT / location for location in DEFAULT_DATA_LOCATIONS)
    candidates = [c if c.is_absolute() else PROJECT_ROOT / c for c in candidates]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    if not must_exist:
        return candidates[0]
    looked = "\n  ".join(str(c) for c in candidates)
    raise DatasetNotFoundError(
        f"FER2013 not found. Looked in:\n  {looked}\n"
        "Get it from Kaggle, either distribution works:\n"
        "  - the original challenge file fer2013.csv (columns emotion,pixels,Usage), or\n"
        "  - the 'FER-2013' images archive (train/<class>/, test/<class>/ as a .zip or folder).\n"
        "Then set FER2013_PATH=/path/to/fer2013.zip (or .csv, or the folder), or put it at "
        "data/fer2013.zip (a symlink is fine; data/ is git-ignored).")


@dataclasses.dataclass
class FERData:
    """Decoded FER-style dataset held in memory.

    Attributes
    ----------
    images : ndarray, uint8, shape (N, 48, 48)
    labels : ndarray, int64, shape (N,), indices into ``EMOTIONS``
    split : ndarray of str, shape (N,), each ``train``, ``val`` or ``test``
    source_ids : ndarray of str, shape (N,), the CSV row or archive entry of each image
    skipped : list of (entry, reason) for entries skipped with ``on_error="skip"``
    converted : number of images that were resized or converted to grayscale
    source : where the data came from
    source_hash : sha256 of the source (file content; for a folder, every file's name and bytes)
    """

    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    source_ids: np.ndarray
    skipped: list = dataclasses.field(default_factory=list)
    converted: int = 0
    source: str = ""
    source_hash: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of one split."""
        mask = self.split == split
        return self.images[mask], self.labels[mask]

    def select(self, mask_or_index) -> "FERData":
        """A new FERData holding only the selected images (bookkeeping fields are kept)."""
        return dataclasses.replace(
            self, images=self.images[mask_or_index], labels=self.labels[mask_or_index],
            split=self.split[mask_or_index], source_ids=self.source_ids[mask_or_index])

    def summary(self) -> dict:
        """Small JSON-able description for manifests."""
        return {
            "source": self.source, "source_hash": self.source_hash, "num_images": len(self),
            "per_split": {s: int((self.split == s).sum()) for s in SPLITS},
            "skipped": len(self.skipped), "skipped_examples": self.skipped[:20],
            "converted": int(self.converted),
        }


# ----------------------------------------------------------------------------- helpers

def class_name(name: str, class_map: dict | None = None) -> str:
    """The class a folder name stands for: after ``class_map``, an emotion's canonical name
    (case-insensitive, common aliases: ``Joy`` -> ``happy``), else the name in lower case."""
    key = name.strip().lower()
    if class_map:
        lowered = {k.lower(): v for k, v in class_map.items()}
        key = lowered.get(key, key).lower()
    return CLASS_ALIASES.get(key, key)


def class_index(name: str, class_map: dict | None = None,
                classes: tuple[str, ...] | None = None) -> int | None:
    """Index of a class folder name in ``EMOTIONS`` (case-insensitive, common aliases), or in
    ``classes`` (a model's own classes, e.g. a fine-tuned head's), or None if unknown."""
    names = list(EMOTIONS) if classes is None else [c.lower() for c in classes]
    key = class_name(name, class_map)
    return names.index(key) if key in names else None


def class_folders(path, class_map: dict | None = None) -> dict[str, list[str]]:
    """The classes of an image folder or zip (``[split/]<class>/<image>``): each
    :func:`class_name` with the folder names it stands for, emotions first (in ``EMOTIONS``
    order), then the others alphabetically. Reads names only, no image."""
    path = Path(path).expanduser()
    kind = detect_format(path)
    if kind == "csv":
        raise FERDataError(f"{path}: a FER2013 CSV has no class folders; expected an image "
                           f"folder (<class>/*.jpg, optionally under train/, val/, test/) or a "
                           f"zip of one")
    if kind == "folder":
        parts = [f.relative_to(path).parts for f in sorted(path.rglob("*"))
                 if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                names, strip = _zip_image_names(archive)
        except zipfile.BadZipFile as error:
            raise FERDataError(f"{path}: not a readable zip archive ({error})") from error
        parts = [PurePosixPath(n).parts[strip:] for n in names]
    found: dict[str, set] = {}
    for entry in parts:
        if len(entry) >= 2:
            found.setdefault(class_name(entry[-2], class_map), set()).add(entry[-2])
    order = sorted(found, key=lambda c: (EMOTIONS.index(c) if c in EMOTIONS else len(EMOTIONS),
                                         c))
    return {name: sorted(found[name]) for name in order}


def _decode_image(raw: bytes) -> tuple[np.ndarray, bool]:
    """Decode image bytes to uint8 (48, 48) gray; also say whether a conversion was needed."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as image:
        converted = image.mode != "L" or image.size != (IMAGE_SIZE, IMAGE_SIZE)
        if image.mode != "L":
            image = image.convert("L")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8), converted


def update_digest_from_file(digest, path: Path, chunk_size: int = 1 << 22) -> None:
    """Feed a file's bytes to a hashlib digest in chunks (large files never sit in memory)."""
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)


def file_sha256(path: Path, chunk_size: int = 1 << 22) -> str:
    """sha256 of a file's bytes (64 hex digits): the one file hash of ferlib."""
    digest = hashlib.sha256()
    update_digest_from_file(digest, path, chunk_size)
    return digest.hexdigest()


def source_hash(path: Path) -> str:
    """sha256 of a source: a file's bytes, or a folder's content.

    For a folder every file below it counts, in sorted order: its relative name (POSIX form),
    its size and its bytes. Sizes and modification times alone are not enough: an image
    rewritten with the same size and its old mtime (``cp -p``, a restored backup) must still
    change the hash, or the ``.npz`` cache would return stale pixels.
    """
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        # The name and size frame the bytes, so no two different folders hash alike.
        digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\0".encode())
        update_digest_from_file(digest, file)
    return digest.hexdigest()


class _Collector:
    """Accumulates decoded entries; raises or records bad ones depending on ``on_error``."""

    def __init__(self, on_error: str):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.images, self.labels, self.split, self.ids = [], [], [], []
        self.skipped: list[tuple[str, str]] = []
        self.converted = 0

    def bad(self, entry: str, reason: str) -> None:
        if self.on_error == "raise":
            raise FERDataError(f"{entry}: {reason}")
        self.skipped.append((entry, reason))

    def add(self, image, label, split, source_id, converted=False) -> None:
        self.images.append(image)
        self.labels.append(label)
        self.split.append(split)
        self.ids.append(source_id)
        self.converted += int(converted)

    def result(self, source: str) -> FERData:
        images = (np.stack(self.images) if self.images
                  else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8))
        return FERData(images=images.astype(np.uint8), labels=np.asarray(self.labels, np.int64),
                       split=np.asarray(self.split, dtype="<U5"),
                       source_ids=np.asarray(self.ids, dtype=str),
                       skipped=self.skipped, converted=self.converted, source=source)


# ----------------------------------------------------------------------------- CSV reader

def read_csv(path: Path, on_error: str = "raise", splits=SPLITS) -> FERData:
    """Read the challenge CSV (``emotion,pixels,Usage``; plain or gzip-compressed); rows of a
    split not in ``splits`` are passed over before their pixels are parsed."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    collector = _Collector(on_error)
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = tuple(h.strip() for h in next(reader, ()))
            if header != CSV_HEADER:
                raise FERDataError(
                    f"{path}: row 1 (header): expected columns {','.join(CSV_HEADER)}, "
                    f"got {','.join(header) or 'an empty file'}")
            for row_number, row in enumerate(reader, start=2):
                entry = f"{path}: row {row_number}"
                if len(row) != 3:
                    collector.bad(entry, f"expected 3 fields, got {len(row)}")
                    continue
                emotion, pixels, usage = (field.strip() for field in row)
                if not emotion.isdigit() or not 0 <= int(emotion) < len(EMOTIONS):
                    collector.bad(entry, f"emotion {emotion!r} is not an integer in 0..6")
                    continue
                if usage not in USAGE_TO_SPLIT:
                    collector.bad(entry, f"Usage {usage!r} is not one of "
                                         f"{', '.join(USAGE_TO_SPLIT)}")
                    continue
                if USAGE_TO_SPLIT[usage] not in splits:
                    continue
                try:
                    values = np.array(pixels.split(), dtype=np.int64)
                except ValueError:
                    values = None
                if values is None or values.size != IMAGE_SIZE * IMAGE_SIZE \
                        or values.min() < 0 or values.max() > 255:
                    count = "non-integer values" if values is None else f"{values.size} values"
                    collector.bad(entry, f"pixels must be {IMAGE_SIZE * IMAGE_SIZE} integers "
                                         f"in 0..255 ({count} found)")
                    continue
                collector.add(values.reshape(IMAGE_SIZE, IMAGE_SIZE).astype(np.uint8),
                              int(emotion), USAGE_TO_SPLIT[usage], f"row{row_number}")
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:
        raise FERDataError(f"{path}: cannot read as a FER2013 CSV ({error})") from error
    return collector.result(str(path))


# ----------------------------------------------------------------------------- folder / zip

def _split_of(parts: tuple[str, ...]) -> tuple[str | None, str, str | None]:
    """Where an entry belongs, from its path parts below the root.

    Returns
    -------
    (prefix split, class folder, folder split)
        ``prefix split`` comes from a ``Training_`` / ``PublicTest_`` / ``PrivateTest_`` file
        name (None without one); ``folder split`` from the top folder (``train``,
        ``val``/``valid``/``validation``, ``test``, any case; None for another or no folder).
    """
    class_folder, file_name = parts[-2], parts[-1]
    top = parts[-3].lower() if len(parts) >= 3 else ""
    prefix = re.split(r"[_\-.]", file_name, maxsplit=1)[0].lower()
    return FILE_PREFIX_TO_SPLIT.get(prefix), class_folder, FOLDER_TO_SPLIT.get(top)


def _read_entries(entries, root: str, on_error: str, class_map: dict | None,
                  val_fraction: float, seed: int, splits=SPLITS, classes=None,
                  default_split: str = "test") -> FERData:
    """Shared logic for folders and zips: ``entries`` yields (name, relative parts, reader).

    The split of an entry is its file-name prefix if it has one, else its top folder's
    (:data:`FOLDER_TO_SPLIT`), else ``default_split``. With ``classes``, labels index into
    them instead of ``EMOTIONS``. Only a layout without any validation image gets
    a seeded stratified ``val_fraction`` of its prefix-less train images as validation.
    Entries of a split not in ``splits`` are passed over unread (a search never opens a
    PrivateTest image).
    """
    collector = _Collector(on_error)
    unsplit: list[int] = []  # indices whose split came from the folder, not the file name
    for name, parts, read in entries:
        if len(parts) < 2:
            continue  # a file at the root (README, licence) is not an image of a class
        split, class_folder, folder_split = _split_of(parts)
        label = class_index(class_folder, class_map, classes)
        entry = f"{root}: {name}"
        if label is None:
            known = ", ".join(sorted(set(CLASS_ALIASES)) if classes is None else classes)
            raise FERDataError(f"{entry}: unknown class folder {class_folder!r}; known names "
                               f"(case-insensitive): {known}; map others with a class map "
                               f"(e.g. --class-map contempt=disgust)")
        if (split or folder_split or default_split) not in splits:
            continue
        try:
            image, converted = _decode_image(read())
        except Exception as error:  # PIL raises many types for corrupt data
            collector.bad(entry, f"cannot decode image ({type(error).__name__}: {error})")
            continue
        if split is None:
            split = folder_split or default_split
            unsplit.append(len(collector.labels))
        collector.add(image, label, split, name, converted)
    data = collector.result(root)
    # A layout with its own validation images keeps them; carving more out of train would
    # shrink train for nothing and make two kinds of validation image.
    if unsplit and not (data.split == "val").any():
        data.split[_stratified_val_slice(data, np.asarray(unsplit), val_fraction, seed)] = "val"
    return data


def _stratified_val_slice(data: FERData, candidates: np.ndarray, fraction: float,
                          seed: int) -> np.ndarray:
    """Indices of a seeded stratified ``fraction`` of the train images among ``candidates``."""
    train = candidates[data.split[candidates] == "train"]
    if fraction <= 0 or len(train) == 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(data.labels[train]):
        members = train[data.labels[train] == label]
        count = int(round(len(members) * fraction))
        chosen.append(rng.permutation(members)[:count])
    return np.concatenate(chosen)


def read_folder(path: Path, on_error="raise", class_map=None, val_fraction=0.1, seed=0,
                splits=SPLITS, classes=None, default_split="test"):
    """Read an image-folder root (``train/<class>/``, ``val/<class>/``, ``test/<class>/`` or
    just ``<class>/``)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FERDataError(f"{path}: no images found (expected train/<class>/*.jpg, "
                           f"val/<class>/*.jpg, test/<class>/*.jpg or <class>/*.jpg)")
    entries = ((str(f.relative_to(path)), f.relative_to(path).parts, f.read_bytes)
               for f in files)
    return _read_entries(entries, str(path), on_error, class_map, val_fraction, seed, splits,
                         classes, default_split)


def _zip_image_names(archive: zipfile.ZipFile) -> tuple[list[str], int]:
    """The image entries of an archive, and how many leading folders are not part of the
    layout (1 for a common top folder such as ``fer2013/train/...``, else 0)."""
    names = sorted(n for n in archive.namelist()
                   if not n.endswith("/") and "__MACOSX" not in n
                   and PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES)
    first = {PurePosixPath(n).parts[0] for n in names}
    strip = 1 if len(first) == 1 and all(len(PurePosixPath(n).parts) >= 4 for n in names) \
        else 0
    return names, strip


def read_zip(path: Path, on_error="raise", class_map=None, val_fraction=0.1, seed=0,
             splits=SPLITS, classes=None, default_split="test"):
    """Read a ``.zip`` of the image-folder layout without extracting it to disk."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise FERDataError(f"{path}: not a readable zip archive ({error})") from error
    with archive:
        # A common top folder (fer2013/train/...) is not part of the layout.
        names, strip = _zip_image_names(archive)
        if not names:
            raise FERDataError(f"{path}: the archive holds no images")
        entries = ((n, PurePosixPath(n).parts[strip:], lambda n=n: archive.read(n))
                   for n in names)
        return _read_entries(entries, str(path), on_error, class_map, val_fraction, seed,
                             splits, classes, default_split)


# ----------------------------------------------------------------------------- entry point

def detect_format(path: Path) -> str:
    """``csv``, ``zip`` or ``folder``; raises for a missing path or an unrecognised layout."""
    path = Path(path)
    if not path.exists():
        raise DatasetNotFoundError(f"{path}: no such file or folder")
    name = path.name.lower()
    if path.is_dir():
        return "folder"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    if name.endswith(".zip"):
        return "zip"
    raise FERDataError(f"{path}: unrecognised layout; expected the challenge CSV "
                       f"(fer2013.csv, optionally .gz), an image-folder root or a .zip of it")


def default_cache_dir() -> Path:
    return Path(os.environ.get("FERLIB_CACHE", PROJECT_ROOT / ".cache"))


def load_fer2013(path, *, on_error: str = "raise", class_map: dict | None = None,
                 val_fraction: float = 0.1, seed: int = 0, cache: bool = True,
                 cache_dir: Path | None = None, splits=SPLITS, classes=None,
                 default_split: str = "test") -> FERData:
    """Load a FER-style dataset from a CSV, an image folder or a zip (auto-detected).

    Parameters
    ----------
    path : str or Path
        The challenge CSV, an image-folder root or a zip of that layout.
    on_error : {"raise", "skip"}
        Raise on the first bad entry, or skip bad entries and list them in ``skipped``.
    class_map : dict, optional
        Extra class-folder names, ``{"contempt": "disgust"}``.
    val_fraction, seed : float, int
        Used only when the layout has no validation images (no ``PublicTest_`` file names, no
        ``val/`` folder): the seeded stratified slice of ``train/`` that becomes validation.
    splits : sequence of str
        The splits to read (default all); ``("train", "val")`` leaves every PrivateTest entry
        unread, its image never decoded (the recipe search).
    classes : sequence of str, optional
        A folder layout's own classes (a fine-tuned head's): labels index into them, folder
        names matched as :func:`class_name` reads them. Default: ``EMOTIONS``.
    default_split : str
        The split of an image whose path and name say none (default ``test``: to a model
        trained elsewhere, a user's dataset is test data; fine-tuning reads ``train``).
    cache : bool
        Read and write a ``.npz`` cache keyed by the source's content hash, these options and
        :func:`reader_version`, so a changed file or a changed reader never returns stale data.

    Returns
    -------
    FERData
    """
    path = Path(path).expanduser()
    kind = detect_format(path)
    digest = source_hash(path)
    splits = tuple(split for split in SPLITS if split in splits)
    options = {"on_error": on_error, "class_map": class_map, "val_fraction": val_fraction,
               "seed": seed, "reader": reader_version()}
    if splits != SPLITS:
        options["splits"] = splits  # only then: the caches of whole datasets keep their keys
    if classes is not None or default_split != "test":
        options.update(classes=list(classes or []), default_split=default_split)
    key = hashlib.sha256((digest + json.dumps(options, sort_keys=True)).encode()).hexdigest()
    cache_file = Path(cache_dir or default_cache_dir()) / f"fer-{key[:24]}.npz"
    if cache and cache_file.exists():
        try:
            return _read_cache(cache_file, str(path), digest)
        except Exception:  # a damaged cache is rebuilt, never trusted
            cache_file.unlink(missing_ok=True)
    if kind == "csv":
        data = read_csv(path, on_error, splits)
    else:
        reader = read_zip if kind == "zip" else read_folder
        data = reader(path, on_error, class_map, val_fraction, seed, splits, classes,
                      default_split)
    data.source_hash = digest
    if len(data) == 0:
        raise FERDataError(f"{path}: no usable images ({len(data.skipped)} skipped)")
    if cache:
        _write_cache(cache_file, data)
    return data


def _write_cache(cache_file: Path, data: FERData) -> None:
    """Write ``data`` to ``cache_file`` atomically (temp file in the same folder + rename)."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp.npz")
    os.close(handle)
    np.savez(temp, images=data.images, labels=data.labels, split=data.split,
             source_ids=data.source_ids,
             skipped=np.asarray(json.dumps(data.skipped)), converted=data.converted)
    os.replace(temp, cache_file)


def _read_cache(cache_file: Path, source: str, digest: str) -> FERData:
    """The FERData that :func:`_write_cache` stored, labelled with ``source`` and ``digest``."""
    with np.load(cache_file, allow_pickle=False) as archive:
        return FERData(images=archive["images"], labels=archive["labels"],
                       split=archive["split"], source_ids=archive["source_ids"],
                       skipped=[tuple(s) for s in json.loads(str(archive["skipped"]))],
                       converted=int(archive["converted"]), source=source, source_hash=digest)


# The code and constants whose change can change what a load returns. Held here as objects, not
# looked up by name at call time, so a test that monkeypatches a reader does not change the key.
_READER_FUNCTIONS = (class_name, class_index, _zip_image_names, _decode_image, _Collector,
                     read_csv, _split_of, _read_entries, _stratified_val_slice, read_folder,
                     read_zip, detect_format, _write_cache, _read_cache)
_READER_CONSTANTS = {"EMOTIONS": EMOTIONS, "IMAGE_SIZE": IMAGE_SIZE, "SPLITS": SPLITS,
                     "IMAGE_SUFFIXES": IMAGE_SUFFIXES, "CSV_HEADER": CSV_HEADER,
                     "USAGE_TO_SPLIT": USAGE_TO_SPLIT,
                     "FILE_PREFIX_TO_SPLIT": FILE_PREFIX_TO_SPLIT,
                     "FOLDER_TO_SPLIT": FOLDER_TO_SPLIT, "CLASS_ALIASES": CLASS_ALIASES}


@functools.lru_cache(maxsize=None)
def reader_version() -> str:
    """Short sha256 of the reading code, part of every cache key.

    Hashes the source text of the functions that decode, read, split and cache (and the
    module constants they use) plus the Pillow version (JPEG decoding may differ between its
    releases). Any edit to them gives a new version, so caches written by older code are never
    read; nobody has to remember to bump a number.

    Returns
    -------
    str
        16 hex digits.
    """
    from PIL import __version__ as pillow_version

    digest = hashlib.sha256()
    for part in _READER_FUNCTIONS:
        try:
            text = inspect.getsource(part)
        except (OSError, TypeError):  # no source file (frozen build): fall back on bytecode
            text = repr(part.__code__.co_code) if hasattr(part, "__code__") else part.__name__
        digest.update(f"{part.__qualname__}\0{text}\0".encode())
    digest.update(json.dumps(_READER_CONSTANTS, sort_keys=True).encode())
    digest.update(f"pillow {pillow_version}".encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- splits

def subsample(data: FERData, per_split: dict[str, int], seed: int = 0) -> FERData:
    """A seeded, stratified subset with at most ``per_split[split]`` images per split."""
    rng = np.random.default_rng(seed)
    keep = []
    for split in SPLITS:
        index = np.flatnonzero(data.split == split)
        limit = per_split.get(split)
        if limit is None or limit >= len(index):
            keep.append(index)
            continue
        # Proportional per class (largest remainder), so the total is exactly ``limit``.
        labels = data.labels[index]
        classes, sizes = np.unique(labels, return_counts=True)
        quotas = limit * sizes / len(index)
        counts = np.floor(quotas).astype(int)
        remainder = limit - counts.sum()
        counts[np.argsort(quotas - counts)[::-1][:remainder]] += 1
        chosen = [rng.permutation(index[labels == label])[:count]
                  for label, count in zip(classes, counts)]
        keep.append(np.sort(np.concatenate(chosen)))
    return data.select(np.concatenate(keep))


def stratified_folds(labels: np.ndarray, k: int = 5, seed: int = 0):
    """Seeded stratified k folds: a list of (train_index, val_index) into ``labels``."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


def class_weights(labels: np.ndarray, num_classes: int = len(EMOTIONS)) -> dict[int, float]:
    """Balanced class weights ``N / (C * count_c)`` for the classes present."""
    counts = np.bincount(labels, minlength=num_classes)
    total = counts.sum()
    return {c: float(total / (num_classes * n)) if n else 0.0 for c, n in enumerate(counts)}


# ----------------------------------------------------------------------------- data checks

def class_counts(data: FERData) -> pd.DataFrame:
    """Images per class (rows, in EMOTIONS order) and split (columns), with totals."""
    table = pd.crosstab(pd.Categorical(np.asarray(EMOTIONS)[data.labels], EMOTIONS),
                        pd.Categorical(data.split, SPLITS), dropna=False)
    table.index.name, table.columns.name = "emotion", "split"
    table = table.reindex(index=list(EMOTIONS), columns=list(SPLITS), fill_value=0)
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    return table


def content_hashes(images: np.ndarray) -> np.ndarray:
    return np.array([hashlib.blake2b(image.tobytes(), digest_size=12).hexdigest()
                     for image in images])


def duplicates(data: FERData) -> pd.DataFrame:
    """Groups of exactly identical images: one row per image that has a twin.

    Columns: group, index, source_id, split, label, group_size, splits_in_group,
    conflicting_labels.
    """
    frame = pd.DataFrame({"hash": content_hashes(data.images), "index": np.arange(len(data)),
                          "source_id": data.source_ids, "split": data.split,
                          "label": np.asarray(EMOTIONS)[data.labels]})
    frame = frame[frame.duplicated("hash", keep=False)].copy()
    if frame.empty:
        return frame.drop(columns="hash").assign(
            group=pd.Series(dtype=int), group_size=pd.Series(dtype=int),
            splits_in_group=pd.Series(dtype=str), conflicting_labels=pd.Series(dtype=bool))
    grouped = frame.groupby("hash")
    frame["group"] = grouped.ngroup()
    frame["group_size"] = grouped["index"].transform("size")
    frame["splits_in_group"] = grouped["split"].transform(lambda s: "+".join(sorted(set(s))))
    frame["conflicting_labels"] = grouped["label"].transform("nunique") > 1
    return frame.drop(columns="hash").sort_values(["group", "index"]).reset_index(drop=True)


def duplicate_summary(data: FERData, dups: pd.DataFrame | None = None) -> pd.DataFrame:
    """Counts of duplicate groups within one split and across splits."""
    dups = duplicates(data) if dups is None else dups
    groups = dups.drop_duplicates("group")
    rows = []
    for name, selected in [("within " + s, groups[groups.splits_in_group == s]) for s in SPLITS]:
        rows.append((name, len(selected), int(selected.group_size.sum())))
    across = groups[groups.splits_in_group.astype(str).str.contains("+", regex=False)]
    rows.append(("across splits", len(across), int(across.group_size.sum())))
    conflicting = groups[groups.conflicting_labels]
    rows.append(("with conflicting labels", len(conflicting), int(conflicting.group_size.sum())))
    return pd.DataFrame(rows, columns=["kind", "groups", "images"]).set_index("kind")


def seen_elsewhere(data: FERData, split: str = "test") -> np.ndarray:
    """Which images of ``split`` also occur, pixel for pixel, in another split.

    Parameters
    ----------
    data : FERData
    split : {"train", "val", "test"}

    Returns
    -------
    ndarray of bool
        One value per image of ``split``, in the order of ``data.subset(split)``; True where an
        identical image is in any other split (for ``test``: Training or PublicTest). Scoring
        only the False ones measures a model on images it cannot have memorised.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    hashes = content_hashes(data.images)
    mask = data.split == split
    elsewhere = set(hashes[~mask])
    return np.array([value in elsewhere for value in hashes[mask]], dtype=bool)


OVERLAP_COLUMNS = ["images", "share of the split (%)"]


def cross_split_overlap(data: FERData) -> pd.DataFrame:
    """How many evaluation images also occur, pixel for pixel, in another split.

    Rows (index ``what``): PrivateTest (test) images also in Training (train); PublicTest
    (val) images also in Training; PrivateTest images also in PublicTest; PrivateTest images
    also in Training or PublicTest; duplicate groups with conflicting labels. Every image is
    counted, so two copies in PrivateTest of one Training image count twice.

    Returns
    -------
    DataFrame
        Columns ``images`` and ``share of the split (%)`` (of the first split named in the
        row). The last row counts groups of identical images, anywhere in the data, whose
        copies carry different labels; it has no share.
    """
    hashes = content_hashes(data.images)
    in_split = {split: set(hashes[data.split == split]) for split in SPLITS}

    def also_in(split: str, others: tuple[str, ...]) -> tuple[int, float]:
        own = hashes[data.split == split]
        seen = set().union(*(in_split[other] for other in others))
        count = int(sum(value in seen for value in own))
        return count, (round(100 * count / len(own), 1) if len(own) else float("nan"))

    rows = {
        "PrivateTest images also in Training": also_in("test", ("train",)),
        "PublicTest images also in Training": also_in("val", ("train",)),
        "PrivateTest images also in PublicTest": also_in("test", ("val",)),
        "PrivateTest images also in Training or PublicTest": also_in("test", ("train", "val")),
    }
    labels = pd.DataFrame({"hash": hashes, "label": data.labels})
    conflicting = int((labels.groupby("hash")["label"].nunique() > 1).sum())
    rows["duplicate groups with conflicting labels (groups, not images)"] = (
        conflicting, float("nan"))
    table = pd.DataFrame.from_dict(rows, orient="index", columns=OVERLAP_COLUMNS)
    table.index.name = "what"
    return table


def near_blank(data: FERData, std_threshold: float = 3.0) -> pd.DataFrame:
    """Images whose pixel standard deviation is below ``std_threshold`` (blank or flat)."""
    stds = data.images.reshape(len(data), -1).std(axis=1)
    index = np.flatnonzero(stds < std_threshold)
    return pd.DataFrame({"index": index, "source_id": data.source_ids[index],
                         "split": data.split[index],
                         "label": np.asarray(EMOTIONS)[data.labels[index]],
                         "pixel_std": stds[index].round(3)})


def pixel_statistics(data: FERData) -> pd.DataFrame:
    """Mean and standard deviation of pixel values per split (for normalisation checks)."""
    rows = {}
    for split in SPLITS:
        images = data.images[data.split == split].astype(np.float32)
        if len(images):
            rows[split] = {"images": len(images), "mean": images.mean(), "std": images.std(),
                           "mean_image_std": images.reshape(len(images), -1).std(1).mean()}
    return pd.DataFrame(rows).T


def load_dataset(params: dict, progress: bool = False, splits=SPLITS) -> FERData:
    """The dataset a profile asks for: its source (``FER2013_PATH`` wins), options and limits;
    ``splits`` as in :func:`load_fer2013`."""
    settings = params["data"]
    path = resolve_data_path(os.environ.get("FER2013_PATH") or settings["path"])
    if progress:
        print(f"loading {path}", flush=True)
    data = load_fer2013(path, on_error=settings["on_error"], val_fraction=settings["val_fraction"],
                        seed=params["seed"], splits=splits)
    if settings["limit_per_split"]:
        data = subsample(data, settings["limit_per_split"], seed=params["seed"])
    return data


# ----------------------------------------------------------------------------- sharpness

def sharpness(images: np.ndarray) -> np.ndarray:
    """Mean absolute Laplacian per image: high for sharp faces, low for blurred ones."""
    x = np.asarray(images, dtype=np.float32)
    laplacian = (4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1]
                 - x[:, 1:-1, :-2] - x[:, 1:-1, 2:])
    return np.abs(laplacian).mean(axis=(1, 2))


def sharpness_by_split(data: FERData) -> pd.DataFrame:
    """Sharpness quantiles per split; a large gap means train and test differ in resolution."""
    values = sharpness(data.images)
    rows = {}
    for split in SPLITS:
        selected = values[data.split == split]
        if len(selected):
            rows[split] = {"images": len(selected), "p10": np.percentile(selected, 10),
                           "median": np.median(selected), "p90": np.percentile(selected, 90),
                           "share_below_3": float((selected < 3).mean())}
    return pd.DataFrame(rows).T


def sharpness_warning(data: FERData, ratio: float = 1.5) -> str | None:
    """A plain-words warning when one split is much blurrier than another, else None.

    Compares the median :func:`sharpness` of every split with images; fires when the sharpest
    split's median is more than ``ratio`` times the blurriest one's (a blurred copy of part of
    the data, or images upscaled from a lower resolution).

    Parameters
    ----------
    data : FERData
    ratio : float
        Largest tolerated ratio of split medians.

    Returns
    -------
    str or None
        E.g. "Warning: the train images are much blurrier than the test images (median
        sharpness 1.9 vs 28.6, 15x apart). ..."; None when all splits are alike.
    """
    values = sharpness(data.images)
    medians = {split: float(np.median(values[data.split == split]))
               for split in SPLITS if (data.split == split).any()}
    if len(medians) < 2:
        return None
    blurriest = min(medians, key=medians.get)
    sharpest = max(medians, key=medians.get)
    low, high = medians[blurriest], medians[sharpest]
    if high <= ratio * low:
        return None
    if low > 0:
        factor = high / low
        apart = f", {factor:.0f}x apart" if factor >= 10 else f", {factor:.1f}x apart"
    else:
        apart = ", the former flat"
    return (f"Warning: the {blurriest} images are much blurrier than the {sharpest} images "
            f"(median sharpness {low:.1f} vs {high:.1f}{apart}). Models trained on one and "
            f"tested on the other meet a resolution shift; check the data source.")
