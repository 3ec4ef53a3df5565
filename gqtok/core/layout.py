"""Token layout: how the C latent channels at one position group into tokens.

gqtok uses the *strided* grouping of the reference code: with T = C // d
tokens per position, token k holds channels (k, k + T, k + 2T, ..., k + (d-1)T),
in that order. Channel c therefore lands in token c % T at slot c // T.

Shapes used everywhere (numpy or torch; both work unchanged):
  latent grid:  [B, C, H, W]       (what the encoder emits and the decoder eats)
  token vectors:[B, T, H, W, d]    (what GQ selection compares with codewords)
  token ids:    [B, T, H, W]       (what the service returns)
"""

from __future__ import annotations

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
