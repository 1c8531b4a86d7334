"""Small image folders for tests: drawn here, so the tests never depend on files outside the repository."""

from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder, sizes=((96, 64), (64, 96), (80, 80)), seed=0, suffix=".png") -> list[Path]:
    """Random-coloured images of the given (width, height) sizes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index, (width, height) in enumerate(sizes):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        path = folder / f"{index:02d}{suffix}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
