"""Images <-> compressed bytes for one model, in process: the tokenizer runtime plus gqtok.core.bitstream.

    codec = ImageCodec(load_artifact("models/default"))
    data = codec.compress(image_u8)                     # uint8 [H, W, 3] -> bytes (any H, W), best prior
    image = codec.decompress(data)                      # -> uint8 [H, W, 3], the original size

The image is padded to multiples of f by repeating its bottom and right edges (as /v1/tokenize's
fit=pad does); the header keeps the original size and decompress crops back to it. The service
runs the same two halves with its batchers in between (service/routers/compression.py).
"""

from __future__ import annotations

import numpy as np

from gqtok.core.bitstream import Codec, Header
from gqtok.core.layout import fit_to_grid
from gqtok.service.runtime import TokenizerRuntime


class ImageCodec:
    def __init__(self, artifact, device: str = "cpu", threads: int = 0, runtime: TokenizerRuntime | None = None):
        self.runtime = runtime or TokenizerRuntime(artifact, device=device, threads=threads)
        self.codec = Codec(artifact)

    @property
    def priors(self) -> list[str]:
        return list(self.codec.priors)

    def compress(self, image: np.ndarray, prior: str | None = None) -> bytes:
        """prior: uniform, frequency or context; None = the strongest the model has."""
        padded = fit_to_grid(image, self.runtime.manifest.downsample, "pad")
        ids = self.runtime.tokenize(padded[None])[0]
        return self.codec.encode(ids, image.shape[:2], prior)

    def decompress(self, data: bytes) -> tuple[np.ndarray, Header]:
        ids, header = self.codec.decode(data)
        h, w = header.image_size
        return self.runtime.detokenize(ids[None])[0, :h, :w], header
