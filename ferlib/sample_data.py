"""A small real labelled face set that is not FER2013, for trying ``finetune`` and ``evaluate``.

scikit-image ships ``skimage.data.lfw_subset()`` inside its wheel (``skimage/data/
lfw_subset.npy``, 1 MB): 200 gray 25x25 crops from Labeled Faces in the Wild (Huang et al.
2007), the first 100 faces, the other 100 non-faces cut from the backgrounds of the same
photos, labelled as such by scikit-image for its face-detection example. It is the only
labelled face set a package on PyPI carries that may be used here (the machines reach PyPI
only; JAFFE, CK+ and KDEF are not on PyPI, and their licences forbid redistribution). LFW was
published for research; scikit-image redistributes this subset under its own licence. Its
labels are face / non-face, not emotions, so a fine-tune on it takes the new-head path.

``python -m ferlib.sample_data lfw-subset --out data/lfw_subset`` (after
``pip install -e .[samples]``) writes ``<out>/face/*.png`` and ``<out>/non_face/*.png``, a
folder ``finetune`` and ``evaluate`` read. Write it under the git-ignored ``data/``: images
from a dataset are never committed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

LFW_CLASSES = ("face", "non_face")


def lfw_subset_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's LFW subset as uint8 images (200, 25, 25) and labels (0 face, 1 non-face)."""
    try:
        from skimage.data import lfw_subset
    except ImportError:
        raise SystemExit("scikit-image is not installed: pip install -e .[samples]") from None
    images = np.asarray(lfw_subset())
    if images.dtype != np.uint8:  # the wheel's copy holds floats in [0, 1]
        images = np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)
    labels = np.repeat([0, 1], len(images) // 2)  # the first half faces, the rest non-faces
    return images, labels


def write_lfw_subset(out) -> dict[str, int]:
    """Write the LFW subset as ``out/<class>/lfw_<index>.png``; returns images per class."""
    images, labels = lfw_subset_images()
    out = Path(out)
    counts = {}
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = out / LFW_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"lfw_{index:03d}.png")
        counts[LFW_CLASSES[label]] = counts.get(LFW_CLASSES[label], 0) + 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferlib.sample_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    lfw = commands.add_parser("lfw-subset", help="scikit-image's 200 LFW crops, face / non-face")
    lfw.add_argument("--out", default="data/lfw_subset", help="folder to write (git-ignored "
                     "under data/)")
    args = parser.parse_args(argv)
    counts = write_lfw_subset(args.out)
    print(f"wrote {sum(counts.values())} images to {args.out}: "
          + ", ".join(f"{name} {count}" for name, count in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
