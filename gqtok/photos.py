"""Photo files: finding them, the fixed held-out split, decoding to uint8 RGB, centre crops (numpy + Pillow).

One place for what every stage reads photos with: training, evaluation, the priors fit, the generator and the
benchmarks. It sits beside gqtok.core at the bottom of the layers and imports nothing of gqtok's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

# Fixed evaluation photos (file stems), never used for training: one or two per
# scene type, all public domain. Centre-cropped to 768x512 for evaluation. This
# is NOT the Kodak set; numbers on it are "held-out endless-sky" numbers.
HELDOUT = (
    "badlands3", "beach4", "beach6", "canyon5", "canyon8", "city3", "city7", "desert4",
    "dune2", "fields5", "fields8", "fog3", "forest2", "hills2", "lava4", "mountain4",
    "mountain7", "sea4", "sea7", "sky4", "snow4", "valley4", "valley7", "water4",
)
HELDOUT_SIZE = (512, 768)  # (H, W) of the evaluation crops


def list_images(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist (for the default set run: gqtok data fetch)")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return paths


def split_heldout(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training paths, held-out paths): held-out are the HELDOUT stems present in `paths`."""
    held = set(HELDOUT)
    return [p for p in paths if p.stem not in held], [p for p in paths if p.stem in held]


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def center_crop(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre crop [H, W, 3] to (h, w); images smaller than that are resized up first (aspect kept)."""
    h, w = size
    ih, iw = img.shape[:2]
    if ih < h or iw < w:
        s = max(h / ih, w / iw)
        img = np.asarray(Image.fromarray(img).resize((max(w, round(iw * s)), max(h, round(ih * s))), Image.BICUBIC))
        ih, iw = img.shape[:2]
    top, left = (ih - h) // 2, (iw - w) // 2
    return img[top : top + h, left : left + w]
