"""Baseline quantizers that Gaussian Quant is compared against: VQ, FSQ, LFQ and BSQ.

One small file per quantizer. All share one interface:

    q = build_quantizer("fsq")          # or "vq", "lfq", "bsq", with keyword settings
    out = q(z)                          # z: [B, D, h, w], one token per spatial position
    out.z_q, out.ids, out.loss, out.stats
    q.decode_ids(out.ids)               # == out.z_q (values)

Every module has `dim` (D), `num_codes` and `bits_per_token` (log2 num_codes).
They work in float32 whatever the input dtype or autocast, so token ids do not
depend on the mixed-precision setting, and ties go to the lowest id.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # [B, D, h, w] quantized latent, straight-through (gradient reaches z as identity)
    ids: torch.Tensor  # [B, h, w] long token ids in [0, num_codes)
    loss: torch.Tensor  # scalar auxiliary loss (codebook/commitment/entropy), already weighted
    stats: dict[str, float] = field(default_factory=dict)  # small scalars for logging
    # [B, D, h, w] what was rounded, on z_q's scale (the straight-through's x): decoded, it tells the network's
    # loss apart from the rounding's
    z_continuous: torch.Tensor | None = None


@contextmanager
def float32_region(device: torch.device):
    """Turn autocast off: under bf16 autocast a matmul would otherwise run (and pick ids) in bf16."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def straight_through(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Values of q, gradient of x (identity).

    Written as q + (x - x) rather than x + (q - x) because x - x is exactly 0 in
    floating point, so the result equals q bit for bit and decode_ids can match it.
    """
    return q.detach() + (x - x.detach())


def to_tokens(z: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] -> [B*h*w, D]."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def from_tokens(t: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """[B*h*w, D] -> [B, D, h, w]."""
    return t.reshape(b, h, w, -1).permute(0, 3, 1, 2)


@torch.no_grad()
def usage_stats(ids: torch.Tensor, num_codes: int, **extra: torch.Tensor) -> dict[str, float]:
    """usage (fraction of codes hit by this batch), perplexity (exp entropy of the id histogram), extras.

    All values go to the host in one transfer, so logging costs one sync per step, not one per scalar.
    """
    counts = torch.bincount(ids.reshape(-1), minlength=num_codes).float()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
    names = ["usage", "perplexity", *extra]
    values = [(counts > 0).float().mean(), entropy.exp(), *(v.detach().float() for v in extra.values())]
    return dict(zip(names, torch.stack(values).tolist()))


def bits_of(num_codes: int) -> float:
    return math.log2(num_codes)


# Imported after the shared pieces above, which the quantizer files use.
from .bsq import BSQ  # noqa: E402
from .fsq import FSQ  # noqa: E402
from .lfq import LFQ  # noqa: E402
from .vq import VectorQuantizer  # noqa: E402

QUANTIZERS: dict[str, type] = {"vq": VectorQuantizer, "fsq": FSQ, "lfq": LFQ, "bsq": BSQ}


def build_quantizer(name: str, **kwargs) -> torch.nn.Module:
    """The quantizer called `name`, built with `kwargs` (see each class for its settings)."""
    try:
        cls = QUANTIZERS[name]
    except KeyError:
        raise ValueError(f"unknown quantizer {name!r}; choose one of {sorted(QUANTIZERS)}") from None
    return cls(**kwargs)


__all__ = ["BSQ", "FSQ", "LFQ", "QUANTIZERS", "QuantizerOutput", "VectorQuantizer", "build_quantizer"]
