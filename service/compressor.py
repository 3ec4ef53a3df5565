"""Images <-> compressed bytes for one model, in process: the tokenizer runtime plus gqtok.core.bitstream.

    compressor = ImageCompressor(load_artifact("models/default"))
    data = compressor.compress(image_u8)             # uint8 [H, W, 3] -> bytes (any H, W), best prior
    image, header = compressor.decompress(data)      # -> uint8 [H, W, 3], the original size

The image is padded to multiples of f by repeating its bottom and right edges (as /v1/tokenize's
fit=pad does); the header keeps the original size and decompress crops back to it. The service
runs the same two halves with its batchers in between (service/routers/compression.py).
"""

from __future__ import annotations

import numpy as np

from gqtok.core.bitstream import Header, TokenCompressor
from gqtok.core.layout import DEFAULT_MAX_IMAGE_PIXELS, fit_to_grid
from gqtok.service.runtime import TokenizerRuntime


class ImageCompressor:
    def __init__(self, artifact, device: str = "cpu", threads: int = 0, runtime: TokenizerRuntime | None = None):
        self.runtime = runtime or TokenizerRuntime(artifact, device=device, threads=threads)
        self.tokens = TokenCompressor(artifact)

    @property
    def priors(self) -> list[str]:
        return list(self.tokens.priors)

    def compress(self, image: np.ndarray, prior: str | None = None) -> bytes:
        """prior: uniform, frequency or context; None = the strongest the model has."""
        padded = fit_to_grid(image, self.runtime.manifest.downsample, "pad")
        ids = self.runtime.tokenize(padded[None])[0]
        return self.tokens.compress(ids, image.shape[:2], prior)

    def decompress(self, data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[np.ndarray, Header]:
        ids, header = self.tokens.decompress(data, max_pixels)
        h, w = header.image_size
        return self.runtime.detokenize(ids[None])[0, :h, :w], header
