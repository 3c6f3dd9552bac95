"""Shared test helpers."""

from pathlib import Path

import numpy as np
from PIL import Image

from ferlib import EMOTIONS


def make_fer_folder(root: Path, per_split=None, seed: int = 0) -> Path:
    """A small FER-style image folder (``train/<emotion>/``, ``test/<emotion>/``) with the
    official split in the file names and a class-specific bright band a tiny model learns."""
    rng = np.random.default_rng(seed)
    counts = per_split or {"Training": ("train", 24), "PublicTest": ("test", 8),
                           "PrivateTest": ("test", 8)}
    for prefix, (folder, per_class) in counts.items():
        for label, emotion in enumerate(EMOTIONS):
            directory = root / folder / emotion
            directory.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                image = rng.integers(0, 60, (48, 48)).astype(np.uint8)
                image[6 * label:6 * label + 8, 10:38] = 220  # a class-specific bright band
                Image.fromarray(image).save(directory / f"{prefix}_{label}{index:03d}.png")
    return root
