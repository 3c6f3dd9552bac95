"""The LFW-subset folder writer (``python -m ferlib.sample_data``), on a stand-in for
scikit-image's array so the test does not need scikit-image."""

import sys
import types

import numpy as np
from PIL import Image

from ferlib import data as fer_data, sample_data


def test_lfw_subset_is_written_as_a_class_folder_that_ferlib_reads(tmp_path, monkeypatch,
                                                                   capsys):
    rng = np.random.default_rng(0)
    crops = rng.random((6, 25, 25))  # floats in [0, 1], as the wheel's lfw_subset.npy holds
    fake = types.ModuleType("skimage.data")
    fake.lfw_subset = lambda: crops
    monkeypatch.setitem(sys.modules, "skimage", types.ModuleType("skimage"))
    monkeypatch.setitem(sys.modules, "skimage.data", fake)
    assert sample_data.main(["lfw-subset", "--out", str(tmp_path / "lfw")]) == 0
    assert "wrote 6 images" in capsys.readouterr().out
    faces = sorted((tmp_path / "lfw" / "face").glob("*.png"))
    assert len(faces) == 3 and len(list((tmp_path / "lfw" / "non_face").glob("*.png"))) == 3
    first = np.asarray(Image.open(faces[0]))
    assert first.dtype == np.uint8 and first.shape == (25, 25)
    assert np.array_equal(first, np.round(crops[0] * 255).astype(np.uint8))
    assert set(fer_data.class_folders(tmp_path / "lfw")) == {"face", "non_face"}
