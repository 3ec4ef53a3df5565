"""Images <-> compressed bytes for one model, in process: a GQ tokenizer with gqtok.core.bitstream's priors
(ImageCompressor, one rate), or the discretized-VAE codec with gqtok.core.latents (CodecCompressor, a quality).

    compressor = load_compressor("default")          # or "codec": either kind, by its manifest
    data = compressor.compress(image_u8)             # uint8 [H, W, 3] -> bytes (any H, W); codec: quality=1..6
    image, header = compressor.decompress(data)      # -> uint8 [H, W, 3], the original size

The image is padded to multiples of f by repeating its bottom and right edges (as /v1/tokenize's
fit=pad does); the header keeps the original size and decompress crops back to it. The service
runs the same two halves with its batchers in between (service/routers/compression.py).
"""

from __future__ import annotations

import numpy as np

from gqtok.core.artifact import DECODER, ENCODER, HYPER_ANALYSIS, load_artifact
from gqtok.core.bitstream import Header, TokenCompressor
from gqtok.core.latents import LatentCompressor
from gqtok.core.layout import DEFAULT_MAX_IMAGE_PIXELS, fit_to_grid
from gqtok.core.models import find_model
from gqtok.service.runtime import TokenizerRuntime, open_sessions, to_uint8


def load_compressor(model: str | None = None, *, device: str = "auto", threads: int = 0):
    """The compressor of a model (a directory or a name on the model search path; None: the default model):
    ImageCompressor for a tokenizer, CodecCompressor for a codec."""
    return compressor_for(load_artifact(find_model(model)), device=device, threads=threads)


def compressor_for(artifact, device: str = "cpu", threads: int = 0):
    """The compressor of a loaded artifact, by its manifest's kind."""
    kind = CodecCompressor if artifact.manifest.kind == "codec" else ImageCompressor
    return kind(artifact, device=device, threads=threads)


class ImageCompressor:
    def __init__(self, artifact, device: str = "cpu", threads: int = 0, runtime: TokenizerRuntime | None = None):
        self.runtime = runtime or TokenizerRuntime(artifact, device=device, threads=threads)
        self.tokens = TokenCompressor(artifact)

    @property
    def priors(self) -> list[str]:
        return list(self.tokens.priors)

    def compress(self, image: np.ndarray, prior: str | None = None, quality: int | None = None) -> bytes:
        """prior: uniform, frequency or context; None = the strongest the model has. quality: codecs only."""
        if quality is not None:
            raise ValueError(f"model {self.runtime.manifest.model_id} is a GQ tokenizer: it compresses at one rate "
                             "(16 bits per token before entropy coding); a quality is chosen with a codec model "
                             "(kind codec, e.g. the bundled 'codec')")
        padded = fit_to_grid(image, self.runtime.manifest.downsample, "pad")
        ids = self.runtime.tokenize(padded[None])[0]
        return self.tokens.compress(ids, image.shape[:2], prior)

    def decompress(self, data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[np.ndarray, Header]:
        ids, header = self.tokens.decompress(data, max_pixels)
        h, w = header.image_size
        return self.runtime.detokenize(ids[None])[0, :h, :w], header


class CodecCompressor:
    """The discretized-VAE codec in process: encoder.onnx -> y = mu * gain(quality) -> hyper_analysis.onnx ->
    rounded side information z -> the portable latent coder (gqtok.core.latents); back through decoder.onnx.
    The encoder side runs in float32 (where it rounds decides the stream); what a stream decodes to is computed
    exactly up to the decoder network."""

    def __init__(self, artifact, device: str = "cpu", threads: int = 0):
        self.latents = LatentCompressor(artifact)
        self.manifest = artifact.manifest
        (self.encoder, self.hyper_analysis, self.decoder), self.providers = open_sessions(
            artifact, [ENCODER, HYPER_ANALYSIS, DECODER], device, threads)

    def quality(self, quality: int | None) -> int:
        return self.latents.quality(quality)

    def compress(self, image: np.ndarray, prior: str | None = None, quality: int | None = None) -> bytes:
        """quality: 1 (lowest rate) .. the model's qualities; None = the model's default."""
        if prior not in (None, "hyperprior"):
            raise ValueError(f"model {self.manifest.model_id} is a codec: its latents are coded with its "
                             f"hyperprior, not the {prior!r} prior of GQ tokens")
        q = self.latents.quality(quality)
        y, z = self.encode(image, q)
        return self.latents.compress(y, z, image.shape[:2], q)

    def encode(self, image: np.ndarray, quality: int) -> tuple[np.ndarray, np.ndarray]:
        """The networks' half of compress: uint8 [H, W, 3] -> (latents y float32 [C, h, w], side information z
        int64 [Cz, hz, wz]) at this quality (the image padded to multiples of f first)."""
        padded = fit_to_grid(image, self.manifest.downsample, "pad")
        mu = self.encoder.run(["mu"], {"image": np.ascontiguousarray(padded[None], dtype=np.uint8)})[0]
        y = self.latents.scaled(mu, quality)
        z = np.rint(self.hyper_analysis.run(None, {"latent": y})[0][0]).astype(np.int64)
        return y[0], z

    def decompress(self, data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[np.ndarray, Header]:
        latent, header = self.latents.decompress(data, max_pixels)
        h, w = header.image_size
        return self.decode(latent)[:h, :w], header

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """The decoder's input float32 [C, h, w] -> uint8 [f h, f w, 3]."""
        return to_uint8(self.decoder.run(None, {"latent": latent[None]})[0])[0]
