"""The tokenizer in process, for researchers who do not want HTTP: the server's runtime behind four calls.

    from gqtok import Tokenizer

    tok = Tokenizer.load("models/default")       # a model directory or a name on the model search path
    ids = tok.encode(images)                      # int64 [B, T, H/f, W/f], the ids the server answers
    images = tok.decode(ids)                      # uint8 [B, H, W, 3] (output="pil" or "torch" also)
    mu, sigma = tok.encode_posterior(images)      # float32 [B, T, H/f, W/f, d] each: GQ's per-token posterior
    bits = tok.kl_bits(mu, sigma)                 # [B, T, H/f, W/f]: each token's KL to N(0, I) in bits

Images: one image or a list (a 4-D array or tensor is a batch) of PIL images, uint8 or float [0, 1] arrays or
torch tensors, HxWx3, HxW or 3xHxW; converted as the server converts them (gqtok.photos.as_rgb: EXIF, bit depth,
alpha) and fitted to multiples of f as `fit` says (pad, crop, exact; docs/api.md). Images of several sizes are
encoded one size at a time and come back as a list. Tokens do not depend on the batch an image is in, so these
ids equal the server's for the same image and options (tests/test_tokenizer.py).
"""

from __future__ import annotations

import numpy as np

from gqtok.core import layout
from gqtok.core.artifact import load_artifact
from gqtok.core.models import find_model
from gqtok.core.select import kl_bits
from gqtok.photos import as_rgb, resize_rgb, to_torch
from gqtok.service.runtime import TokenizerRuntime


def _as_images(images) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    return list(images) if getattr(images, "ndim", 0) == 4 else [images]


class Tokenizer:
    def __init__(self, runtime: TokenizerRuntime):
        self.runtime, self.manifest = runtime, runtime.manifest

    @classmethod
    def load(cls, model: str = "default", *, device: str = "auto", threads: int = 0,
             selector: str = "exact") -> Tokenizer:
        """device: auto (CUDA when onnxruntime-gpu sees a GPU), cpu or cuda; threads: onnxruntime's intra-op
        threads (0: one per core); selector: where GQ selection runs (service/runtime.py)."""
        return cls(TokenizerRuntime(load_artifact(find_model(model)), device=device, threads=threads,
                                    selector=selector))

    @property
    def downsample(self) -> int:
        return self.manifest.downsample

    def prepare(self, images, fit: str = "pad", alpha: str = "composite",
                max_tokens: int | None = None) -> list[np.ndarray]:
        """Images -> uint8 [H, W, 3] arrays, each H and W a multiple of f (fit: pad, crop or exact). max_tokens: a
        token budget, each image first resized (aspect kept, never enlarged) to fit it (budget_size says to what)."""
        items = _as_images(images)
        if not items:
            raise ValueError("no images")
        arrays = [as_rgb(im, alpha, f"image {i}") for i, im in enumerate(items)]
        if max_tokens is not None:
            arrays = [resize_rgb(a, self.budget_size(a.shape[:2], max_tokens)) for a in arrays]
        return [layout.fit_to_grid(a, self.downsample, fit, f"image {i}") for i, a in enumerate(arrays)]

    def budget_size(self, size: tuple[int, int], max_tokens: int) -> tuple[int, int]:
        """The (H, W) an image of `size` is resized to under a budget of max_tokens tokens (as the server does)."""
        return layout.budget_size(*size, self.downsample, self.manifest.tokens_per_position, max_tokens)

    def _by_size(self, arrays: list[np.ndarray], fn):
        """fn over each group of same-sized arrays; one batch back when all share a size, else a list in order."""
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape, []).append(i)
        if len(groups) == 1:
            return fn(np.stack(arrays))
        out: list = [None] * len(arrays)
        for idx in groups.values():
            for i, row in zip(idx, fn(np.stack([arrays[i] for i in idx]))):
                out[i] = row
        return out

    def encode(self, images, *, fit: str = "pad", alpha: str = "composite", max_tokens: int | None = None):
        """Images -> token ids int64 [B, T, h, w] (a list of [T, h, w] when sizes differ). max_tokens: a token
        budget (prepare)."""
        return self._by_size(self.prepare(images, fit, alpha, max_tokens), self.runtime.tokenize)

    def encode_posterior(self, images, *, fit: str = "pad", alpha: str = "composite",
                         max_tokens: int | None = None):
        """Images -> (mu, sigma), float32 [B, T, h, w, d] each: the posterior of every token, whose GQ token is
        the codeword most likely under it (lists when sizes differ)."""
        d = self.manifest.token_dim

        def posterior(batch):
            mu, logvar = self.runtime.encode(batch)
            return np.stack([layout.group(mu, d), np.exp(0.5 * layout.group(logvar, d))], axis=1)

        both = self._by_size(self.prepare(images, fit, alpha, max_tokens), posterior)
        if isinstance(both, list):
            return [b[0] for b in both], [b[1] for b in both]
        return both[:, 0], both[:, 1]

    @staticmethod
    def kl_bits(mu, sigma) -> np.ndarray:
        """Each token's KL(N(mu, sigma^2) || N(0, I)) in bits (gqtok.core.select.kl_bits): [B, T, h, w]."""
        return kl_bits(mu, 2 * np.log(np.asarray(sigma, np.float64)))

    def decode(self, ids, *, output: str = "numpy"):
        """Token ids [B, T, h, w] or [T, h, w] (numpy, torch or lists) -> uint8 [B, H, W, 3] ("numpy"), a list of
        RGB PIL images ("pil") or float32 [B, 3, H, W] in [0, 1] ("torch")."""
        if type(ids).__module__.startswith("torch"):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids)
        if ids.ndim == 3:
            ids = ids[None]
        if ids.ndim != 4 or ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers [batch, t, h, w] or [t, h, w]; got {ids.dtype} {ids.shape}")
        if ids.shape[1] != self.manifest.tokens_per_position:
            raise ValueError(f"this model has {self.manifest.tokens_per_position} tokens per position; the ids have "
                             f"{ids.shape[1]}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.manifest.num_codes):
            raise ValueError(f"token ids must be in [0, {self.manifest.num_codes})")
        images = self.runtime.detokenize(ids.astype(np.int64))
        if output == "numpy":
            return images
        if output == "pil":
            from PIL import Image

            return [Image.fromarray(a) for a in images]
        if output == "torch":
            return to_torch(images)
        raise ValueError(f"output must be numpy, pil or torch, got {output!r}")
