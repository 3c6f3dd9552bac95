"""Tests for ferlib.data: readers (CSV, folders, zip), errors, skip mode, cache, splits, checks.

Every fixture is generated into ``tmp_path`` with numpy and PIL; only the tests marked as such
read the real dataset, and only when ``FER2013_PATH`` is set. PNG (or BMP, where the byte size
must stay fixed) is used wherever pixels are compared exactly (JPEG is lossy).
"""

import gzip
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

import ferlib.data
from ferlib import EMOTIONS
from ferlib.data import (DatasetNotFoundError, FERData, FERDataError, class_counts,
                         class_weights, cross_split_overlap, duplicate_summary, duplicates,
                         load_dataset, load_fer2013, near_blank,
                         pixel_statistics, reader_version, seen_elsewhere, sharpness,
                         sharpness_by_split, sharpness_warning, stratified_folds, subsample)

SIZE = 48
needs_real_data = pytest.mark.skipif(not os.environ.get("FER2013_PATH"),
                                     reason="FER2013_PATH is not set")


def random_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)


def pixels_field(image: np.ndarray) -> str:
    return " ".join(str(int(v)) for v in image.ravel())


# ----------------------------------------------------------------------------- CSV fixtures

# (emotion, Usage) per data row; rows 2.. in the file (row 1 is the header).
CSV_ROWS = [(0, "Training"), (3, "Training"), (6, "Training"), (1, "Training"),
            (4, "PublicTest"), (5, "PublicTest"), (2, "PrivateTest"), (3, "PrivateTest")]


def write_csv(path: Path, rows, header="emotion,pixels,Usage", compress=False) -> Path:
    """``rows``: (emotion, pixels string, usage) triples, or longer/shorter lists as given."""
    lines = [header] + [",".join(str(field) for field in row) for row in rows]
    text = "\n".join(lines) + "\n"
    if compress:
        with gzip.open(path, "wt", newline="") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def good_csv_rows(seed_offset=0):
    images = [random_image(seed_offset + i) for i in range(len(CSV_ROWS))]
    rows = [(emotion, pixels_field(image), usage)
            for (emotion, usage), image in zip(CSV_ROWS, images)]
    return rows, images


@pytest.fixture
def challenge_csv(tmp_path):
    rows, images = good_csv_rows()
    return write_csv(tmp_path / "fer2013.csv", rows), images


# ----------------------------------------------------------------------------- folder fixtures

# (top folder, class folder, file stem) of an official-layout image folder.
OFFICIAL_ENTRIES = [
    ("train", "angry", "Training_10"), ("train", "happy", "Training_11"),
    ("train", "neutral", "Training_12"), ("train", "disgust", "Training_13"),
    ("train", "happy", "Training_14"),
    ("test", "sad", "PublicTest_20"), ("test", "surprise", "PublicTest_21"),
    ("test", "fear", "PrivateTest_30"), ("test", "happy", "PrivateTest_31"),
]
PREFIX_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}


def save_image(path: Path, array: np.ndarray, mode=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    image.save(path)


def make_official_folder(root: Path, suffix: str = ".png", entries=OFFICIAL_ENTRIES) -> dict:
    """Write an official-layout folder; return {relative id: (label, split, image)}."""
    expected = {}
    for seed, (top, class_folder, stem) in enumerate(entries):
        image = random_image(100 + seed)
        relative = f"{top}/{class_folder}/{stem}{suffix}"
        save_image(root / relative, image)
        split = PREFIX_SPLIT[stem.split("_")[0]]
        expected[relative] = (ferlib.data.class_index(class_folder), split, image)
    return expected


def make_unsplit_folder(root: Path, train_per_class=10, test_per_class=3,
                        classes=("angry", "happy", "neutral")) -> None:
    """train/ and test/ without split prefixes in the file names (JPEG)."""
    seed = 0
    for top, count in (("train", train_per_class), ("test", test_per_class)):
        for class_folder in classes:
            for number in range(count):
                seed += 1
                save_image(root / top / class_folder / f"img_{seed}.jpg", random_image(seed))


def zip_folder(root: Path, zip_path: Path, top_folder: str = "") -> Path:
    """Zip ``root`` as a typical archive would: directory entries, a README, macOS junk."""
    with zipfile.ZipFile(zip_path, "w") as archive:
        if top_folder:
            archive.writestr(f"{top_folder}/", "")
        archive.writestr(f"{top_folder}/README.txt" if top_folder else "README.txt", "FER")
        for path in sorted(root.rglob("*")):
            arcname = f"{top_folder}/" if top_folder else ""
            arcname += path.relative_to(root).as_posix()
            if path.is_dir():
                archive.writestr(arcname + "/", "")
            else:
                archive.write(path, arcname)
                archive.writestr(f"__MACOSX/{arcname}", b"\x00\x05\x16\x07 not an image")
    return zip_path


def make_data(labels, splits, images=None, seed=0) -> FERData:
    labels = np.asarray(labels, dtype=np.int64)
    if images is None:
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (len(labels), SIZE, SIZE), dtype=np.uint8)
    return FERData(images=np.asarray(images, dtype=np.uint8), labels=labels,
                   split=np.asarray(splits, dtype="<U5"),
                   source_ids=np.array([f"id{i}" for i in range(len(labels))]))


def check_arrays(data: FERData) -> None:
    assert data.images.dtype == np.uint8
    assert data.images.shape == (len(data), SIZE, SIZE)
    assert data.labels.shape == (len(data),)
    assert np.issubdtype(data.labels.dtype, np.integer)
    assert set(np.unique(data.labels)) <= set(range(len(EMOTIONS)))
    assert set(data.split) <= {"train", "val", "test"}
    assert len(data.source_ids) == len(data)


def by_id(data: FERData) -> dict:
    return {str(sid): (int(label), str(split), image)
            for sid, label, split, image in zip(data.source_ids, data.labels, data.split,
                                                data.images)}


# ----------------------------------------------------------------------------- readers

def test_emotions_are_in_challenge_csv_order():
    assert EMOTIONS == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_read_challenge_csv(tmp_path, compress):
    rows, images = good_csv_rows()
    name = "fer2013.csv.gz" if compress else "fer2013.csv"
    path = write_csv(tmp_path / name, rows, compress=compress)
    data = load_fer2013(path, cache=False)
    check_arrays(data)
    assert len(data) == len(CSV_ROWS)
    np.testing.assert_array_equal(data.images, np.stack(images))
    assert data.labels.tolist() == [emotion for emotion, _ in CSV_ROWS]
    assert data.split.tolist() == [PREFIX_SPLIT[usage] for _, usage in CSV_ROWS]
    assert data.source_ids.tolist() == [f"row{n}" for n in range(2, 2 + len(CSV_ROWS))]
    assert data.skipped == [] and data.converted == 0
    assert data.source_hash == ferlib.data.file_sha256(path)


def test_read_csv_tolerates_whitespace_and_crlf(tmp_path):
    rows, images = good_csv_rows()
    text = "emotion,pixels,Usage\r\n" + "".join(
        f" {emotion} ,{pixels} , {usage}\r\n" for emotion, pixels, usage in rows)
    path = tmp_path / "fer2013.csv"
    path.write_bytes(text.encode())
    data = load_fer2013(path, cache=False)
    np.testing.assert_array_equal(data.images, np.stack(images))
    assert data.labels.tolist() == [emotion for emotion, _ in CSV_ROWS]


def test_read_official_image_folder(tmp_path):
    root = tmp_path / "fer2013"
    expected = make_official_folder(root, suffix=".png")
    (root / "README.md").write_text("a file at the root is not an image of a class")
    data = load_fer2013(root, cache=False)
    check_arrays(data)
    found = by_id(data)
    assert set(found) == set(expected)
    for relative, (label, split, image) in expected.items():
        assert found[relative][:2] == (label, split), relative
        np.testing.assert_array_equal(found[relative][2], image)
    assert sorted(data.split.tolist()) == sorted(
        ["train"] * 5 + ["val"] * 2 + ["test"] * 2)
    assert data.converted == 0 and data.skipped == []


def test_read_jpeg_folder(tmp_path):
    root = tmp_path / "fer2013"
    expected = make_official_folder(root, suffix=".jpg")
    data = load_fer2013(root, cache=False)
    check_arrays(data)
    found = by_id(data)
    assert {k: v[:2] for k, v in found.items()} == {k: v[:2] for k, v in expected.items()}
    # JPEG is lossy: the decoded image is close to, not equal to, what was written.
    for relative, (_, _, image) in expected.items():
        difference = np.abs(found[relative][2].astype(int) - image.astype(int)).mean()
        assert difference < 40, relative


def test_folder_without_split_prefixes_slices_val_from_train(tmp_path):
    root = tmp_path / "images"
    make_unsplit_folder(root, train_per_class=10, test_per_class=3)
    data = load_fer2013(root, val_fraction=0.2, seed=1, cache=False)
    check_arrays(data)
    counts = class_counts(data)
    for emotion in ("angry", "happy", "neutral"):
        assert counts.loc[emotion, "train"] == 8
        assert counts.loc[emotion, "val"] == 2  # stratified: 20% of each class
        assert counts.loc[emotion, "test"] == 3
    val_ids = set(data.source_ids[data.split == "val"])
    test_ids = set(data.source_ids[data.split == "test"])
    assert all(sid.startswith("train/") for sid in val_ids)
    assert all(sid.startswith("test/") for sid in test_ids)

    again = load_fer2013(root, val_fraction=0.2, seed=1, cache=False)
    assert set(again.source_ids[again.split == "val"]) == val_ids  # seeded
    other = load_fer2013(root, val_fraction=0.2, seed=2, cache=False)
    assert set(other.source_ids[other.split == "val"]) != val_ids
    none = load_fer2013(root, val_fraction=0.0, cache=False)
    assert (none.split == "val").sum() == 0


@pytest.mark.parametrize("top_folder", ["", "fer2013"], ids=["flat", "top-folder"])
def test_read_zip_matches_folder(tmp_path, top_folder):
    root = tmp_path / "images"
    expected = make_official_folder(root, suffix=".jpg")
    archive = zip_folder(root, tmp_path / "fer2013.zip", top_folder)
    from_zip = load_fer2013(archive, cache=False)
    from_folder = load_fer2013(root, cache=False)
    check_arrays(from_zip)
    prefix = f"{top_folder}/" if top_folder else ""
    zip_found = {sid.removeprefix(prefix): value for sid, value in by_id(from_zip).items()}
    folder_found = by_id(from_folder)
    assert set(zip_found) == set(expected) == set(folder_found)
    for relative in expected:
        assert zip_found[relative][:2] == expected[relative][:2]
        np.testing.assert_array_equal(zip_found[relative][2], folder_found[relative][2])
    assert from_zip.skipped == []


def test_zip_without_split_prefixes(tmp_path):
    root = tmp_path / "images"
    make_unsplit_folder(root, train_per_class=10, test_per_class=2)
    archive = zip_folder(root, tmp_path / "fer.zip", "FER-2013")
    data = load_fer2013(archive, val_fraction=0.1, seed=0, cache=False)
    assert (data.split == "val").sum() == 3  # 1 of 10 per class
    assert (data.split == "train").sum() == 27
    assert (data.split == "test").sum() == 6


SPLIT_FOLDER_COUNTS = {"train": 6, "val": 2, "test": 3}  # images per class


def make_split_folder(root: Path, names=("train", "val", "test"),
                      classes=("angry", "happy", "neutral")) -> None:
    """train/, val/ and test/ (named ``names``) without split prefixes in the file names."""
    seed = 0
    for name, (split, count) in zip(names, SPLIT_FOLDER_COUNTS.items()):
        for class_folder in classes:
            for number in range(count):
                seed += 1
                save_image(root / name / class_folder / f"face{seed}-{split}.png",
                           random_image(2000 + seed))


@pytest.mark.parametrize("names", [("train", "val", "test"),
                                   ("Training", "Validation", "Testing"),
                                   ("TRAIN", "valid", "Test")], ids=["short", "long", "case"])
@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_val_folder_is_the_validation_split(tmp_path, names, as_zip):
    root = tmp_path / "images"
    make_split_folder(root, names)
    source = zip_folder(root, tmp_path / "fer.zip", "fer2013") if as_zip else root
    # A val/ folder exists, so no slice of train becomes validation, whatever val_fraction says.
    data = load_fer2013(source, val_fraction=0.2, seed=1, cache=False)
    check_arrays(data)
    counts = class_counts(data)
    for emotion in ("angry", "happy", "neutral"):
        assert counts.loc[emotion, ["train", "val", "test"]].tolist() == [6, 2, 3], emotion
    prefix = "fer2013/" if as_zip else ""
    for split, name in zip(("train", "val", "test"), names):
        ids = data.source_ids[data.split == split]
        assert all(sid.startswith(f"{prefix}{name}/") for sid in ids), split
        assert all(sid.endswith(f"-{split}.png") for sid in ids), split
    assert not set(data.source_ids[data.split == "test"]) & set(
        data.source_ids[data.split == "val"])


def test_file_prefix_wins_over_split_folder(tmp_path):
    root = tmp_path / "images"
    make_split_folder(root)
    save_image(root / "val/sad/PrivateTest_1.png", random_image(1))
    save_image(root / "test/sad/Training_2.png", random_image(2))
    found = by_id(load_fer2013(root, cache=False))
    assert found["val/sad/PrivateTest_1.png"][1] == "test"
    assert found["test/sad/Training_2.png"][1] == "train"
    assert found["val/angry/face19-val.png"][1] == "val"


def test_class_folder_aliases_and_case(tmp_path):
    root = tmp_path / "images"
    folders = {"Anger": 0, "HAPPINESS": 3, "Surprised": 5, "sadness": 4, "Fearful": 2,
               "Disgusted": 1, "NEUTRAL": 6}
    for number, folder in enumerate(folders):
        save_image(root / "Train" / folder / f"Training_{number}.png", random_image(number))
    data = load_fer2013(root, cache=False)
    found = by_id(data)
    for number, (folder, label) in enumerate(folders.items()):
        assert found[f"Train/{folder}/Training_{number}.png"][0] == label


def test_other_sizes_and_rgb_are_converted(tmp_path):
    root = tmp_path / "images"
    gray = random_image(1)
    save_image(root / "train/angry/Training_1.png", gray)  # already 48x48 gray: unchanged
    save_image(root / "train/angry/Training_2.png", np.full((96, 96), 77, np.uint8))
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    rgb[..., 1] = 200
    save_image(root / "train/happy/Training_3.png", rgb)
    save_image(root / "test/sad/PublicTest_4.jpg",
               np.random.default_rng(4).integers(0, 256, (80, 64, 3), dtype=np.uint8))
    data = load_fer2013(root, cache=False)
    check_arrays(data)
    assert data.converted == 3
    found = by_id(data)
    np.testing.assert_array_equal(found["train/angry/Training_1.png"][2], gray)
    assert (found["train/angry/Training_2.png"][2] == 77).all()
    expected_gray = Image.fromarray(rgb).convert("L").getpixel((0, 0))
    assert (found["train/happy/Training_3.png"][2] == expected_gray).all()
    assert found["test/sad/PublicTest_4.jpg"][:2] == (4, "val")


# ----------------------------------------------------------------------------- bad input

def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "fer2013.csv"
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        load_fer2013(missing, cache=False)


def test_unrecognised_layout(tmp_path):
    path = tmp_path / "fer2013.txt"
    path.write_text("emotion,pixels,Usage\n")
    with pytest.raises(FERDataError) as error:
        load_fer2013(path, cache=False)
    assert str(path) in str(error.value)
    assert "csv" in str(error.value).lower() and "zip" in str(error.value)


def test_wrong_csv_header(tmp_path):
    rows, _ = good_csv_rows()
    path = write_csv(tmp_path / "fer2013.csv", rows, header="label,pixels,Usage")
    with pytest.raises(FERDataError) as error:
        load_fer2013(path, cache=False)
    message = str(error.value)
    assert str(path) in message and "row 1" in message and "emotion,pixels,Usage" in message


def test_empty_csv_and_header_only(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(FERDataError, match="empty.csv"):
        load_fer2013(empty, cache=False)
    header_only = write_csv(tmp_path / "header.csv", [])
    with pytest.raises(FERDataError, match="no usable images"):
        load_fer2013(header_only, cache=False)


def test_not_gzip_and_not_zip(tmp_path):
    fake_gz = tmp_path / "fer2013.csv.gz"
    fake_gz.write_text("emotion,pixels,Usage\n")
    with pytest.raises(FERDataError, match="fer2013.csv.gz"):
        load_fer2013(fake_gz, cache=False)
    fake_zip = tmp_path / "fer2013.zip"
    fake_zip.write_bytes(b"this is not a zip archive")
    with pytest.raises(FERDataError, match="fer2013.zip"):
        load_fer2013(fake_zip, cache=False)


GOOD_PIXELS = pixels_field(random_image(0))
BAD_ROWS = {
    "too-few-pixels": ((3, "1 2 3", "Training"), "3 values"),
    "too-many-pixels": ((3, GOOD_PIXELS + " 7", "Training"), "2305 values"),
    "non-integer-pixel": ((3, "abc " + " ".join(["1"] * 2303), "Training"), "non-integer"),
    "float-pixel": ((3, "1.5 " + " ".join(["1"] * 2303), "Training"), "non-integer"),
    "pixel-300": ((3, "300 " + " ".join(["1"] * 2303), "Training"), "0..255"),
    "negative-pixel": ((3, "-1 " + " ".join(["1"] * 2303), "Training"), "0..255"),
    "label-7": ((7, GOOD_PIXELS, "Training"), "0..6"),
    "label-negative": ((-1, GOOD_PIXELS, "Training"), "0..6"),
    "label-text": (("happy", GOOD_PIXELS, "Training"), "0..6"),
    "unknown-usage": ((3, GOOD_PIXELS, "Validation"), "Usage"),
    "missing-field": ((3, GOOD_PIXELS), "3 fields"),
}


@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
def test_bad_csv_row_names_file_and_row(tmp_path, case):
    bad_row, fragment = BAD_ROWS[case]
    rows, _ = good_csv_rows()
    rows.insert(1, bad_row)  # the second data row is row 3 of the file
    path = write_csv(tmp_path / "fer2013.csv", rows)
    with pytest.raises(FERDataError) as error:
        load_fer2013(path, cache=False)
    message = str(error.value)
    assert str(path) in message
    assert "row 3" in message
    assert fragment in message


def test_undecodable_image(tmp_path):
    root = tmp_path / "images"
    make_official_folder(root, suffix=".jpg")
    corrupt = root / "train" / "fear" / "Training_99.jpg"
    corrupt.parent.mkdir(parents=True, exist_ok=True)
    corrupt.write_bytes(b"\xff\xd8 garbage, not a JPEG body" * 3)
    with pytest.raises(FERDataError) as error:
        load_fer2013(root, cache=False)
    message = str(error.value)
    assert "train/fear/Training_99.jpg" in message and str(root) in message
    assert "decode" in message


def test_undecodable_image_in_zip(tmp_path):
    root = tmp_path / "images"
    make_official_folder(root, suffix=".jpg")
    (root / "test/sad/PrivateTest_99.jpg").write_bytes(b"garbage")
    archive = zip_folder(root, tmp_path / "fer2013.zip")
    with pytest.raises(FERDataError, match="test/sad/PrivateTest_99.jpg"):
        load_fer2013(archive, cache=False)


def test_unknown_class_folder_and_class_map(tmp_path):
    root = tmp_path / "images"
    make_official_folder(root, suffix=".png")
    save_image(root / "train" / "contempt" / "Training_50.png", random_image(50))
    with pytest.raises(FERDataError) as error:
        load_fer2013(root, cache=False)
    message = str(error.value)
    assert "contempt" in message and "Training_50.png" in message
    assert "angry" in message  # says which names are known

    data = load_fer2013(root, class_map={"contempt": "disgust"}, cache=False)
    found = by_id(data)
    assert found["train/contempt/Training_50.png"][:2] == (EMOTIONS.index("disgust"), "train")
    assert len(data) == len(OFFICIAL_ENTRIES) + 1


def test_folder_without_images(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FERDataError, match="no images"):
        load_fer2013(tmp_path / "empty", cache=False)


def test_on_error_must_be_known(tmp_path, challenge_csv):
    path, _ = challenge_csv
    with pytest.raises(ValueError, match="on_error"):
        load_fer2013(path, on_error="ignore", cache=False)


# ----------------------------------------------------------------------------- skip mode

def test_skip_mode_csv(tmp_path):
    rows, images = good_csv_rows()
    rows.insert(1, (3, "1 2 3", "Training"))         # file row 3
    rows.insert(4, (9, GOOD_PIXELS, "PublicTest"))   # file row 6
    path = write_csv(tmp_path / "fer2013.csv", rows)
    data = load_fer2013(path, on_error="skip", cache=False)
    assert len(data) == len(CSV_ROWS)
    np.testing.assert_array_equal(data.images, np.stack(images))
    assert data.labels.tolist() == [emotion for emotion, _ in CSV_ROWS]
    assert "row3" not in data.source_ids and "row6" not in data.source_ids
    assert len(data.skipped) == 2
    (entry3, reason3), (entry6, reason6) = data.skipped
    assert entry3.endswith("row 3") and str(path) in entry3 and "pixels" in reason3
    assert entry6.endswith("row 6") and "0..6" in reason6
    summary = data.summary()
    assert summary["skipped"] == 2 and summary["num_images"] == len(CSV_ROWS)


def test_skip_mode_folder(tmp_path):
    root = tmp_path / "images"
    make_official_folder(root, suffix=".png")
    (root / "test/sad/PublicTest_99.jpg").write_bytes(b"garbage")
    data = load_fer2013(root, on_error="skip", cache=False)
    assert len(data) == len(OFFICIAL_ENTRIES)
    assert len(data.skipped) == 1
    entry, reason = data.skipped[0]
    assert "test/sad/PublicTest_99.jpg" in entry and "decode" in reason


def test_skip_mode_with_nothing_left(tmp_path):
    path = write_csv(tmp_path / "fer2013.csv", [(9, GOOD_PIXELS, "Training")])
    with pytest.raises(FERDataError, match="1 skipped"):
        load_fer2013(path, on_error="skip", cache=False)


# ----------------------------------------------------------------------------- cache

def assert_same_data(first: FERData, second: FERData) -> None:
    for field in ("images", "labels", "split", "source_ids"):
        a, b = getattr(first, field), getattr(second, field)
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype or (a.dtype.kind == b.dtype.kind == "U"), field
    assert second.images.dtype == np.uint8
    assert first.skipped == second.skipped
    assert first.converted == second.converted
    assert first.source_hash == second.source_hash


def test_second_load_reads_cache(tmp_path, monkeypatch, challenge_csv):
    path, _ = challenge_csv
    cache_dir = tmp_path / "cache"
    first = load_fer2013(path, cache_dir=cache_dir)
    cached = list(cache_dir.glob("*.npz"))
    assert len(cached) == 1

    def not_again(*args, **kwargs):
        raise AssertionError("read_csv was called although the cache holds this source")

    monkeypatch.setattr(ferlib.data, "read_csv", not_again)
    second = load_fer2013(path, cache_dir=cache_dir)
    assert_same_data(first, second)
    assert list(cache_dir.glob("*.npz")) == cached
    assert not list(cache_dir.glob("*.tmp*"))  # atomic write left no temp file


def test_cache_keeps_skipped_and_converted(tmp_path, monkeypatch):
    root = tmp_path / "images"
    make_official_folder(root, suffix=".png")
    save_image(root / "train/sad/Training_77.png", np.full((64, 64), 9, np.uint8))
    (root / "test/sad/PublicTest_99.jpg").write_bytes(b"garbage")
    cache_dir = tmp_path / "cache"
    first = load_fer2013(root, on_error="skip", cache_dir=cache_dir)
    assert first.converted == 1 and len(first.skipped) == 1
    monkeypatch.setattr(ferlib.data, "read_folder", lambda *a, **k: pytest.fail("not cached"))
    second = load_fer2013(root, on_error="skip", cache_dir=cache_dir)
    assert_same_data(first, second)


def test_changed_source_or_options_make_new_cache_entries(tmp_path):
    cache_dir = tmp_path / "cache"
    path = tmp_path / "fer2013.csv"
    rows, images = good_csv_rows()
    write_csv(path, rows)
    first = load_fer2013(path, cache_dir=cache_dir)
    rows2, images2 = good_csv_rows(seed_offset=1000)
    write_csv(path, rows2)
    second = load_fer2013(path, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("*.npz"))) == 2
    np.testing.assert_array_equal(second.images, np.stack(images2))
    assert first.source_hash != second.source_hash

    root = tmp_path / "images"
    make_unsplit_folder(root)
    load_fer2013(root, val_fraction=0.2, cache_dir=cache_dir)
    load_fer2013(root, val_fraction=0.1, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("*.npz"))) == 4


def rewrite_keeping_size_and_mtime(path: Path, image: np.ndarray) -> None:
    """Overwrite ``path`` with ``image`` as ``cp -p`` of a same-size file would."""
    before = path.stat()
    save_image(path, image)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_folder_cache_sees_content_not_just_size_and_mtime(tmp_path):
    root = tmp_path / "images"
    relative = "train/happy/Training_1.bmp"  # BMP: the byte size depends only on the shape
    save_image(root / relative, random_image(1))
    save_image(root / "test/sad/PublicTest_2.bmp", random_image(2))
    cache_dir = tmp_path / "cache"
    first = load_fer2013(root, cache_dir=cache_dir)
    np.testing.assert_array_equal(by_id(first)[relative][2], random_image(1))

    rewrite_keeping_size_and_mtime(root / relative, random_image(3))
    second = load_fer2013(root, cache_dir=cache_dir)
    np.testing.assert_array_equal(by_id(second)[relative][2], random_image(3))
    assert second.source_hash != first.source_hash
    assert len(list(cache_dir.glob("*.npz"))) == 2


def test_folder_hash_covers_names_and_bytes(tmp_path):
    root = tmp_path / "images"
    save_image(root / "train/happy/a.png", random_image(1))
    digest = ferlib.data.source_hash(root)
    assert digest == ferlib.data.source_hash(root)  # stable
    (root / "train/happy/a.png").rename(root / "train/happy/b.png")
    renamed = ferlib.data.source_hash(root)
    assert renamed != digest
    (root / "notes.txt").write_text("x")
    assert ferlib.data.source_hash(root) != renamed


def test_reader_version_is_part_of_the_cache_key(tmp_path, monkeypatch, challenge_csv):
    path, images = challenge_csv
    cache_dir = tmp_path / "cache"
    version = reader_version()
    assert len(version) == 16 and version == reader_version()
    load_fer2013(path, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("*.npz"))) == 1
    monkeypatch.setattr(ferlib.data, "reader_version", lambda: "a-newer-reader")
    data = load_fer2013(path, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("*.npz"))) == 2
    np.testing.assert_array_equal(data.images, np.stack(images))


def test_reader_version_follows_reader_code_and_constants(monkeypatch):
    version = reader_version()
    try:
        ferlib.data.reader_version.cache_clear()
        monkeypatch.setitem(ferlib.data._READER_CONSTANTS, "FOLDER_TO_SPLIT", {"train": "train"})
        assert reader_version() != version
        ferlib.data.reader_version.cache_clear()
        monkeypatch.undo()
        changed = ferlib.data._READER_FUNCTIONS[:-1] + (ferlib.data.subsample,)
        monkeypatch.setattr(ferlib.data, "_READER_FUNCTIONS", changed)
        assert reader_version() != version
    finally:
        monkeypatch.undo()
        ferlib.data.reader_version.cache_clear()
    assert reader_version() == version


def test_cache_false_writes_nothing(tmp_path, monkeypatch, challenge_csv):
    path, _ = challenge_csv
    monkeypatch.setenv("FERLIB_CACHE", str(tmp_path / "default-cache"))
    cache_dir = tmp_path / "cache"
    load_fer2013(path, cache=False, cache_dir=cache_dir)
    load_fer2013(path, cache=False)
    assert not cache_dir.exists() or not any(cache_dir.iterdir())
    assert not (tmp_path / "default-cache").exists()


def test_default_cache_dir_follows_ferlib_cache(tmp_path, monkeypatch, challenge_csv):
    path, _ = challenge_csv
    monkeypatch.setenv("FERLIB_CACHE", str(tmp_path / "default-cache"))
    load_fer2013(path)
    assert len(list((tmp_path / "default-cache").glob("*.npz"))) == 1


def test_damaged_cache_is_rebuilt(tmp_path, challenge_csv):
    path, images = challenge_csv
    cache_dir = tmp_path / "cache"
    load_fer2013(path, cache_dir=cache_dir)
    (cache_file,) = cache_dir.glob("*.npz")
    cache_file.write_bytes(b"truncated")
    data = load_fer2013(path, cache_dir=cache_dir)
    np.testing.assert_array_equal(data.images, np.stack(images))
    assert cache_file.stat().st_size > 1000  # written again


def test_load_dataset_applies_profile_limits(tmp_path, monkeypatch):
    from ferlib.config import validate

    monkeypatch.delenv("FER2013_PATH", raising=False)
    monkeypatch.setenv("FERLIB_CACHE", str(tmp_path / "cache"))
    labels = [0, 3, 6] * 10
    rows = [(label, pixels_field(random_image(i)), "Training") for i, label in enumerate(labels)]
    rows += [(label, pixels_field(random_image(100 + i)), "PublicTest")
             for i, label in enumerate([0, 3, 6] * 2)]
    path = write_csv(tmp_path / "fer2013.csv", rows)
    params = validate({"seed": 3, "data": {"path": str(path),
                                           "limit_per_split": {"train": 9}}})
    data = load_dataset(params)
    assert (data.split == "train").sum() == 9
    assert (data.split == "val").sum() == 6
    assert np.bincount(data.labels[data.split == "train"]).tolist() == [3, 0, 0, 3, 0, 0, 3]


# ----------------------------------------------------------------------------- splits, folds

def imbalanced_data() -> FERData:
    train_labels = [0] * 60 + [3] * 30 + [1] * 10
    val_labels = [0] * 20 + [3] * 10
    return make_data(train_labels + val_labels + [6] * 5,
                     ["train"] * 100 + ["val"] * 30 + ["test"] * 5)


def test_subsample_is_stratified_and_seeded():
    data = imbalanced_data()
    small = subsample(data, {"train": 20, "val": 6}, seed=0)
    train = small.labels[small.split == "train"]
    assert np.bincount(train, minlength=7)[[0, 3, 1]].tolist() == [12, 6, 2]
    assert np.bincount(small.labels[small.split == "val"], minlength=7)[[0, 3]].tolist() == [4, 2]
    assert (small.split == "test").sum() == 5  # no limit: kept whole
    assert set(small.source_ids) <= set(data.source_ids)
    # every kept image is the original one
    index = [int(sid[2:]) for sid in small.source_ids]
    np.testing.assert_array_equal(small.images, data.images[index])

    again = subsample(data, {"train": 20, "val": 6}, seed=0)
    np.testing.assert_array_equal(again.source_ids, small.source_ids)
    other = subsample(data, {"train": 20, "val": 6}, seed=1)
    assert set(other.source_ids) != set(small.source_ids)
    assert len(subsample(data, {"train": 1000})) == len(data)


def test_subsample_never_exceeds_the_limit():
    data = make_data([0] * 10 + [1] * 10 + [2] * 10, ["train"] * 30)
    small = subsample(data, {"train": 5}, seed=0)
    assert len(small) <= 5
    assert set(small.labels.tolist()) == {0, 1, 2}


def test_stratified_folds():
    counts = [50, 23, 37, 12, 80, 5, 40]
    labels = np.repeat(np.arange(7), counts)
    np.random.default_rng(0).shuffle(labels)
    folds = stratified_folds(labels, k=5, seed=7)
    assert len(folds) == 5
    everything = np.arange(len(labels))
    validation = []
    for train_index, val_index in folds:
        assert len(np.intersect1d(train_index, val_index)) == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([train_index, val_index])),
                                      everything)
        per_class = np.bincount(labels[val_index], minlength=7)
        expected = np.asarray(counts) / 5
        assert (np.abs(per_class - expected) <= 1).all(), per_class
        validation.append(val_index)
    joined = np.concatenate(validation)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)  # disjoint, cover

    again = stratified_folds(labels, k=5, seed=7)
    for (a_train, a_val), (b_train, b_val) in zip(folds, again):
        np.testing.assert_array_equal(a_val, b_val)
        np.testing.assert_array_equal(a_train, b_train)
    other = stratified_folds(labels, k=5, seed=8)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


def test_class_weights():
    weights = class_weights(np.array([0, 0, 0, 1]), num_classes=2)
    assert weights == pytest.approx({0: 4 / 6, 1: 2.0})
    labels = np.repeat(np.arange(7), [10, 2, 8, 20, 10, 5, 10])
    weights = class_weights(labels)
    assert list(weights) == list(range(7))
    from sklearn.utils.class_weight import compute_class_weight
    expected = compute_class_weight("balanced", classes=np.arange(7), y=labels)
    assert [weights[c] for c in range(7)] == pytest.approx(expected.tolist())
    # balanced: every class contributes the same total weight
    assert np.allclose([weights[c] * n for c, n in enumerate(np.bincount(labels))],
                       len(labels) / 7)
    assert class_weights(np.array([0, 0, 3]))[1] == 0.0  # absent class


# ----------------------------------------------------------------------------- data checks

def test_class_counts():
    data = make_data([0, 0, 3, 6, 1, 3, 3, 4],
                     ["train", "train", "train", "train", "val", "val", "test", "test"])
    table = class_counts(data)
    assert table.shape == (8, 4)
    assert list(table.index) == list(EMOTIONS) + ["total"]
    assert list(table.columns) == ["train", "val", "test", "total"]
    assert table.loc["angry", "train"] == 2
    assert table.loc["happy"].tolist() == [1, 1, 1, 3]
    assert table.loc["total"].tolist() == [4, 2, 2, 8]
    assert table.loc["surprise", "total"] == 0
    assert table.loc["total", "total"] == len(data)
    assert (table.loc[list(EMOTIONS), ["train", "val", "test"]].sum(axis=1)
            == table.loc[list(EMOTIONS), "total"]).all()


def data_with_duplicates() -> FERData:
    images = np.stack([random_image(500 + i) for i in range(10)])
    images[5] = images[0]                 # within train, same label
    images[8] = images[1]                 # train vs test, conflicting labels
    images[3] = images[2]                 # three copies within val
    images[4] = images[2]
    labels = [0, 3, 2, 2, 2, 0, 6, 6, 4, 1]
    splits = ["train", "train", "val", "val", "val", "train", "train", "test", "test", "test"]
    return make_data(labels, splits, images)


def test_duplicates_within_and_across_splits():
    dups = duplicates(data_with_duplicates())
    assert sorted(dups["index"].tolist()) == [0, 1, 2, 3, 4, 5, 8]
    groups = {tuple(sorted(group["index"])): group.iloc[0] for _, group in dups.groupby("group")}
    assert set(groups) == {(0, 5), (1, 8), (2, 3, 4)}
    assert groups[(0, 5)]["splits_in_group"] == "train"
    assert not groups[(0, 5)]["conflicting_labels"]
    assert groups[(1, 8)]["splits_in_group"] == "test+train"
    assert groups[(1, 8)]["conflicting_labels"]
    assert groups[(2, 3, 4)]["group_size"] == 3
    assert set(dups.loc[dups["index"] == 8, "source_id"]) == {"id8"}

    summary = duplicate_summary(data_with_duplicates())
    assert summary.loc["within train"].tolist() == [1, 2]
    assert summary.loc["within val"].tolist() == [1, 3]
    assert summary.loc["within test"].tolist() == [0, 0]
    assert summary.loc["across splits"].tolist() == [1, 2]
    assert summary.loc["with conflicting labels"].tolist() == [1, 2]


def test_duplicate_summary_without_duplicates():
    data = make_data([0, 1, 2], ["train", "val", "test"])
    assert duplicates(data).empty
    summary = duplicate_summary(data)
    assert (summary[["groups", "images"]] == 0).all().all()
    assert len(summary) == 5


def test_seen_elsewhere():
    data = data_with_duplicates()  # test images 7, 8, 9; 8 is a copy of train image 1
    assert seen_elsewhere(data).tolist() == [False, True, False]
    assert seen_elsewhere(data, "test").dtype == bool
    assert seen_elsewhere(data, "train").tolist() == [False, True, False, False]  # 0, 1, 5, 6
    assert seen_elsewhere(data, "val").tolist() == [False, False, False]  # copies only in val
    assert len(seen_elsewhere(data, "test")) == len(data.subset("test")[1])
    with pytest.raises(ValueError, match="train, val, test"):
        seen_elsewhere(data, "PrivateTest")


def overlap_data() -> FERData:
    """train A B C D; val A E F; test B B A G E (labels chosen for two conflicting groups)."""
    a, b, c, d, e, f, g = (random_image(900 + i) for i in range(7))
    images = [a, b, c, d, a, e, f, b, b, a, g, e]
    labels = [0, 0, 0, 0, 1, 2, 2, 0, 0, 0, 3, 5]
    splits = ["train"] * 4 + ["val"] * 3 + ["test"] * 5
    return make_data(labels, splits, np.stack(images))


def test_seen_elsewhere_counts_every_copy():
    # test B, B (in train), A (in train and val), G (nowhere), E (in val)
    assert seen_elsewhere(overlap_data()).tolist() == [True, True, True, False, True]


def test_cross_split_overlap_hand_computed():
    table = cross_split_overlap(overlap_data())
    assert table.index.name == "what"
    assert list(table.columns) == ["images", "share of the split (%)"]
    expected = {  # (images, share %)
        "PrivateTest images also in Training": (3, 60.0),              # B, B, A of 5
        "PublicTest images also in Training": (1, 33.3),               # A of 3
        "PrivateTest images also in PublicTest": (2, 40.0),            # A, E of 5
        "PrivateTest images also in Training or PublicTest": (4, 80.0),
    }
    for what, (images, share) in expected.items():
        assert table.loc[what, "images"] == images, what
        assert table.loc[what, "share of the split (%)"] == pytest.approx(share), what
    # A is labelled 0, 1, 0 and E 2, 5: two groups; B (0, 0, 0) agrees.
    conflicting = table.iloc[-1]
    assert "conflicting labels" in table.index[-1]
    assert conflicting["images"] == 2 and np.isnan(conflicting["share of the split (%)"])
    assert len(table) == 5


def test_cross_split_overlap_without_overlap_or_val():
    data = make_data([0, 1, 2], ["train", "test", "test"])
    table = cross_split_overlap(data)
    assert table["images"].tolist() == [0, 0, 0, 0, 0]
    assert table.loc["PrivateTest images also in Training", "share of the split (%)"] == 0
    assert np.isnan(table.loc["PublicTest images also in Training", "share of the split (%)"])


def test_near_blank():
    images = np.stack([random_image(700 + i) for i in range(5)])
    images[1] = 128                                     # uniform
    images[3] = 60
    images[3, 0, :2] = 61                               # almost flat
    data = make_data([0, 1, 2, 3, 4], ["train", "val", "test", "train", "val"], images)
    blank = near_blank(data)
    assert blank["index"].tolist() == [1, 3]
    assert blank["source_id"].tolist() == ["id1", "id3"]
    assert blank["split"].tolist() == ["val", "train"]
    assert blank["label"].tolist() == ["disgust", "happy"]
    assert blank["pixel_std"].iloc[0] == 0
    assert near_blank(data, std_threshold=0.0).empty


def test_pixel_statistics():
    images = np.zeros((5, SIZE, SIZE), np.uint8)
    images[0], images[1], images[2] = 10, 30, 200
    images[3, :24], images[3, 24:] = 0, 100              # mean 50, std 50 within the image
    images[4] = 100
    data = make_data([0] * 5, ["train", "train", "val", "test", "test"], images)
    stats = pixel_statistics(data)
    assert list(stats.index) == ["train", "val", "test"]
    assert stats.loc["train", "images"] == 2
    assert stats.loc["train", "mean"] == pytest.approx(20)
    assert stats.loc["train", "std"] == pytest.approx(10)
    assert stats.loc["train", "mean_image_std"] == pytest.approx(0)
    assert stats.loc["val", "mean"] == pytest.approx(200)
    assert stats.loc["test", "mean"] == pytest.approx(75)
    assert stats.loc["test", "mean_image_std"] == pytest.approx(25)


def test_fer_data_select_and_summary():
    data = make_data([0, 3, 6, 3], ["train", "val", "test", "train"])
    data.skipped = [("row 9", "bad")]
    part = data.select(data.split == "train")
    assert part.labels.tolist() == [0, 3] and part.source_ids.tolist() == ["id0", "id3"]
    assert part.skipped == data.skipped
    summary = data.summary()
    assert summary["per_split"] == {"train": 2, "val": 1, "test": 1}
    assert summary["num_images"] == 4 and summary["skipped"] == 1
    import json
    json.dumps(summary)  # JSON-able for the manifest


# ----------------------------------------------------------------------------- real data

REAL_CLASS_COUNTS = {  # angry, disgust, fear, happy, sad, surprise, neutral (data README)
    "train": [3995, 436, 4097, 7215, 4830, 3171, 4965],
    "val": [467, 56, 496, 895, 653, 415, 607],
    "test": [491, 55, 528, 879, 594, 416, 626],
}


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    return load_fer2013(os.environ["FER2013_PATH"], cache_dir=tmp_path_factory.mktemp("cache"))


@needs_real_data
def test_real_fer2013(real_data):
    data = real_data
    check_arrays(data)
    assert data.skipped == []
    per_split = data.summary()["per_split"]
    assert per_split == {"train": 28709, "val": 3589, "test": 3589}
    table = class_counts(data)
    for split, counts in REAL_CLASS_COUNTS.items():
        assert table.loc[list(EMOTIONS), split].tolist() == counts, split
    assert isinstance(table, pd.DataFrame)


@needs_real_data
def test_real_cross_split_overlap(real_data):
    table = cross_split_overlap(real_data)
    values = table["images"].tolist()
    shares = table["share of the split (%)"].tolist()
    # PrivateTest in Training, PublicTest in Training, PrivateTest in PublicTest, either, groups
    assert values == [288, 280, 44, 314, 57]
    assert shares[:4] == [8.0, 7.8, 1.2, 8.7]
    assert seen_elsewhere(real_data, "test").sum() == 314


@needs_real_data
def test_real_fer2013_splits_are_equally_sharp(real_data):
    assert sharpness_warning(real_data) is None


# ----------------------------------------------------------------------------- sharpness

def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of uint8 (N, H, W) images, back to uint8: a synthetic low-resolution copy."""
    blurred = gaussian_filter(np.asarray(images, np.float32), sigma=(0, sigma, sigma),
                              mode="mirror")
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


def _faces(count, seed=0):
    """Random images with sharp structure (blocks), so blurring them is measurable."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (count, 12, 12)).astype(np.uint8)
    return np.kron(blocks, np.ones((4, 4), np.uint8))


def noise(count, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE), dtype=np.uint8)


def test_sharpness_falls_with_blur():
    images = _faces(20)
    values = [float(np.median(sharpness(blur(images, sigma) if sigma else images)))
              for sigma in (0, 1, 2, 3)]
    assert values == sorted(values, reverse=True) and values[0] > 3 * values[-1]
    assert sharpness(np.full((2, 48, 48), 128, np.uint8)).tolist() == [0.0, 0.0]


def test_sharpness_by_split_shows_the_gap():
    images = np.concatenate([blur(_faces(10), 3.0), _faces(10, seed=3)])
    data = make_data([0] * 20, ["train"] * 10 + ["test"] * 10, images=images)
    table = sharpness_by_split(data)
    assert list(table.index) == ["train", "test"]
    assert table.loc["train", "median"] * 3 < table.loc["test", "median"]


def test_sharpness_warning_names_the_blurred_split():
    images = np.concatenate([blur(noise(30, seed=1), 2.0), noise(10, seed=2), noise(10, seed=3)])
    data = make_data([0] * 50, ["train"] * 30 + ["val"] * 10 + ["test"] * 10, images=images)
    message = sharpness_warning(data)
    assert message is not None and message.startswith("Warning:")
    values = sharpness(images)
    low = np.median(values[:30])
    high = max(np.median(values[30:40]), np.median(values[40:]))
    sharpest = "val" if np.median(values[30:40]) > np.median(values[40:]) else "test"
    assert f"the train images are much blurrier than the {sharpest} images" in message
    assert f"median sharpness {low:.1f} vs {high:.1f}" in message
    assert f"{high / low:.0f}x apart" in message or f"{high / low:.1f}x apart" in message
    assert "resolution shift" in message
    assert sharpness_warning(data, ratio=1000) is None


def test_sharpness_warning_is_silent_on_alike_splits():
    data = make_data([0] * 30, ["train"] * 10 + ["val"] * 10 + ["test"] * 10,
                     images=noise(30, seed=4))
    assert sharpness_warning(data) is None
    blurred = make_data([0] * 20, ["train"] * 10 + ["test"] * 10,
                        images=blur(noise(20, seed=5), 2.0))
    assert sharpness_warning(blurred) is None  # both blurred: alike
    single = make_data([0] * 5, ["train"] * 5, images=blur(noise(5), 2.0))
    assert sharpness_warning(single) is None
