"""Token layout: how the C latent channels at one position group into tokens.

gqtok uses the *strided* grouping of the reference code: with T = C // d
tokens per position, token k holds channels (k, k + T, k + 2T, ..., k + (d-1)T),
in that order. Channel c therefore lands in token c % T at slot c // T.

Shapes used everywhere (numpy or torch; both work unchanged):
  latent grid:  [B, C, H, W]       (what the encoder emits and the decoder eats)
  token vectors:[B, T, H, W, d]    (what GQ selection compares with codewords)
  token ids:    [B, T, H, W]       (what the service returns)
  sequences:    [B, H * W * T]     (what an autoregressive model reads: raster order, T innermost)

The pad rule (`fit_to_grid`) is part of the contract too: compressed files record the original size and
decoders crop back to it, so every producer must pad the same way.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

LAYOUT_NAME = "strided"


def tokens_per_position(latent_channels: int, token_dim: int) -> int:
    """T = C / d; C must be a multiple of d."""
    if token_dim < 1 or latent_channels < 1 or latent_channels % token_dim:
        raise ValueError(
            f"latent channels ({latent_channels}) must be a positive multiple of the token dimension ({token_dim})"
        )
    return latent_channels // token_dim


def _permute(x, axes):
    # torch tensors spell it permute, numpy arrays transpose; the semantics match.
    return x.permute(*axes) if hasattr(x, "permute") else x.transpose(axes)


def group(latent, token_dim: int):
    """[B, C, H, W] -> [B, T, H, W, d] (strided grouping)."""
    b, c, h, w = latent.shape
    t = tokens_per_position(c, token_dim)
    # channel c = slot * T + k  ->  axis 1 is the slot, axis 2 the token
    return _permute(latent.reshape(b, token_dim, t, h, w), (0, 2, 3, 4, 1))


def ungroup(tokens):
    """[B, T, H, W, d] -> [B, C, H, W]; the exact inverse of `group`."""
    b, t, h, w, d = tokens.shape
    return _permute(tokens, (0, 4, 1, 2, 3)).reshape(b, d * t, h, w)


# -- sequence order ---------------------------------------------------------------------------------------------
SEQUENCE_ORDER = "raster, tokens of a position innermost"


def grids_to_sequences(grids: np.ndarray) -> np.ndarray:
    """[N, T, h, w] token grids -> [N, h * w * T] sequences in the canonical order (raster, T innermost)."""
    n = grids.shape[0]
    return np.ascontiguousarray(np.transpose(grids, (0, 2, 3, 1)).reshape(n, -1))


def sequences_to_grids(seqs: np.ndarray, tokens_per_position: int, grid: tuple[int, int]) -> np.ndarray:
    """The inverse of grids_to_sequences: [N, h * w * T] -> [N, T, h, w]."""
    n = seqs.shape[0]
    return np.ascontiguousarray(np.transpose(seqs.reshape(n, grid[0], grid[1], tokens_per_position), (0, 3, 1, 2)))


# -- fitting an image to the grid -------------------------------------------------------------------------------
FIT_MODES = ("pad", "crop", "exact")
# Pixels per image that the server (--max-image-pixels), the CLI (--max-pixels) and the bitstream decoder accept
# by default: the working memory of a request grows with its pixels (docs/service.md, memory)
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024


def padded_size(h: int, w: int, f: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of f: what fit 'pad' makes and what a grid of h/f x w/f tokens decodes to."""
    return math.ceil(h / f) * f, math.ceil(w / f) * f


def budget_size(h: int, w: int, f: int, tokens_per_position: int, max_tokens: int) -> tuple[int, int]:
    """The size (H', W') an h x w image is resized to so that its padded grid has at most max_tokens tokens: the
    largest scale s <= 1 (aspect kept; never enlarged) with ceil(floor(s h) / f) * ceil(floor(s w) / f) * T <=
    max_tokens, found exactly (in fractions) by trying every grid height. ValueError when not one position fits."""
    positions = max_tokens // tokens_per_position
    if positions < 1:
        raise ValueError(f"max_tokens={max_tokens} is less than one position's {tokens_per_position} tokens")
    gh, gw = math.ceil(h / f), math.ceil(w / f)
    if gh * gw <= positions:
        return h, w
    # with r rows and c columns of cells, floor(s h) <= r f and floor(s w) <= c f hold for every s below
    # min((r f + 1) / h, (c f + 1) / w): the sides just under it are ceil(s h) - 1 and ceil(s w) - 1
    best = max(min(Fraction(r * f + 1, h), Fraction(min(positions // r, gw) * f + 1, w))
               for r in range(1, min(gh, positions) + 1))
    return max(1, math.ceil(h * best) - 1), max(1, math.ceil(w * best) - 1)


def fit_to_grid(img: np.ndarray, f: int, mode: str = "pad", name: str = "image") -> np.ndarray:
    """Make H and W of [H, W, 3] multiples of f without resampling. ValueError naming the image when it cannot.

    pad:   replicate the bottom row and right column up to the next multiple (the original size is kept by
           callers, and decoders crop back to it);
    crop:  centre crop down to the previous multiple;
    exact: refuse any other size."""
    h, w = img.shape[:2]
    if mode == "exact":
        if h % f or w % f:
            raise ValueError(f"{name} is {h}x{w} (HxW); fit=exact needs multiples of {f}")
        return img
    if mode == "crop":
        ch, cw = h // f * f, w // f * f
        if ch == 0 or cw == 0:
            raise ValueError(f"{name} is {h}x{w}, smaller than one {f}x{f} cell; use fit=pad")
        top, left = (h - ch) // 2, (w - cw) // 2
        return img[top : top + ch, left : left + cw]
    if mode == "pad":
        ph, pw = padded_size(h, w, f)
        if (ph, pw) == (h, w):
            return img
        return np.pad(img, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    raise ValueError(f"fit must be one of {', '.join(FIT_MODES)}, got {mode!r}")
