"""What a file becomes before tokenizing: one or more uint8 RGB views, all of one size.

    Preprocess(size=256)                      shorter side to 256, centre crop 256x256 (one view)
    Preprocess(size=256, crop="random", flip=True, seed=1)   one random 256 crop of the resized photo, maybe flipped
    Preprocess(size=256, crop="ten")          the five-crop (corners and centre) and their mirror images: ten views
    Preprocess(size=0, fit="pad")             the image as it is, fitted to multiples of f as the service's fit=pad

The random views come from a generator seeded by (seed, the file's path), so a file gets the same views whichever
shard, engine or worker runs it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from gqtok.core.layout import FIT_MODES, budget_size, fit_to_grid
from gqtok.photos import resize_rgb

CROPS = ("center", "random", "ten")


@dataclass(frozen=True)
class Preprocess:
    size: int = 256  # shorter side resized to this (bicubic, up or down), then size x size crops; 0: no resize
    crop: str = "center"  # center, random (one random crop per file) or ten (corners + centre, and their mirrors)
    flip: bool = False  # with crop=random: mirror each view with probability 1/2
    seed: int = 0  # for crop=random and flip
    fit: str = "pad"  # with size=0: pad, crop or exact to multiples of f (the service's options)
    draft: bool = True  # JPEGs decode at the smallest 1/2, 1/4 or 1/8 scale still covering the resize (see below)
    max_tokens: int = 0  # token budget: each view resized (aspect kept, never enlarged) to at most this many tokens

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if self.fit not in FIT_MODES:
            raise ValueError(f"fit must be one of {', '.join(FIT_MODES)}, got {self.fit!r}")
        if self.size < 0:
            raise ValueError(f"size must be 0 (no resize) or positive, got {self.size}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be 0 (no budget) or positive, got {self.max_tokens}")
        if self.size == 0 and (self.crop != "center" or self.flip):
            raise ValueError("crop=random/ten and flip need a size (the views are size x size crops)")

    def record(self) -> dict:
        return asdict(self)

    @property
    def views_per_file(self) -> int:
        return 10 if self.crop == "ten" else 1

    def prepare_decoding(self, im: Image.Image) -> None:
        """Before decoding a JPEG that is resized anyway: let libjpeg decode it at the smallest of 1/2, 1/4, 1/8 of
        its size whose shorter side still reaches `size` (its DCT scaling, a clean downsampling filter). On the
        1440x720 endless-sky photos at size 256 that halves the decoding and cuts the resize from 19 to 4 ms;
        the views differ from a full-size decode by about 47 dB PSNR. draft=False decodes at full size."""
        if not (self.draft and self.size and im.format == "JPEG"):
            return
        w, h = im.size
        scale = self.size / min(w, h)
        if scale < 0.5:
            im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))

    def views(self, img: np.ndarray, key: str, f: int, t: int = 1) -> list[np.ndarray]:
        """uint8 [H, W, 3] -> its views; `key` (the file's path) seeds the random ones; f: the model's downsample,
        t: its tokens per position (for the token budget)."""
        views = self._views(img, key, f)
        if not self.max_tokens:
            return views
        return [fit_to_grid(resize_rgb(v, budget_size(*v.shape[:2], f, t, self.max_tokens)), f, "pad", key)
                for v in views]

    def budget_grid(self, f: int, t: int) -> tuple[int, int]:
        """(h, w) of every view's grid when size is set."""
        s = budget_size(self.size, self.size, f, t, self.max_tokens) if self.max_tokens else (self.size, self.size)
        return -(-s[0] // f), -(-s[1] // f)

    def _views(self, img: np.ndarray, key: str, f: int) -> list[np.ndarray]:
        if self.size == 0:
            return [fit_to_grid(img, f, self.fit, key)]
        if self.size % f:
            raise ValueError(f"size {self.size} is not a multiple of the model's f={f}")
        img = resize_shorter(img, self.size)
        h, w, s = img.shape[0], img.shape[1], self.size
        if self.crop == "center":
            return [img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]]
        if self.crop == "ten":
            corners = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), ((h - s) // 2, (w - s) // 2)]
            five = [img[t:t + s, x:x + s] for t, x in corners]
            return five + [v[:, ::-1] for v in five]
        digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        view = img[top:top + s, left:left + s]
        return [view[:, ::-1] if self.flip and rng.random() < 0.5 else view]


def resize_shorter(img: np.ndarray, side: int) -> np.ndarray:
    """Resize so that the shorter side is `side` (aspect kept, bicubic); unchanged when it already is."""
    h, w = img.shape[:2]
    if min(h, w) == side:
        return img
    scale = side / min(h, w)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))  # PIL takes (W, H)
    return np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))
