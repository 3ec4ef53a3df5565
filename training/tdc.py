"""Target divergence constraint (TDC): keep every token's KL near log2 K bits.

The KL loss is  lam * mean_over_images( sum_over_tokens( w_tok * KL_tok ) )  with
w_tok = lam_max above the band [T - 0.5, T + 0.5], 1 inside, lam_min below it
(the weights carry no gradient). After each optimizer step the three scalars
move by a factor `rate`:
  lam      up if mean KL_tok > T, else down (never below lam_floor, default 0)
  lam_max  up if max KL_tok > T + band, else down, clamped to [1, 1e3]
  lam_min  down if min KL_tok < T - band, else up, clamped to [1e-3, 1]

Fixes over the reference: the scalars are buffers, so they are saved in the
checkpoint and survive --resume; the statistics that drive them are
all-reduced across data-parallel ranks (sum for the mean, max, min), so every
rank takes the same step; lam_max comes down again once the max is in band;
and the update runs only when the caller calls it (once per generator step).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class TDC(torch.nn.Module):
    def __init__(
        self,
        target_bits: float,  # T = log2 K, bits per token
        band: float = 0.5,  # half-width of the tolerated band, bits
        rate: float = 1.01,  # multiplicative step of the three scalars per update
        lam_init: float = 1e-4,  # starting KL weight; it adapts, so only the first steps care
        lam_floor: float = 0.0,  # lam never goes below this (0: the reference rule, no floor)
        lam_max_range: tuple[float, float] = (1.0, 1e3),
        lam_min_range: tuple[float, float] = (1e-3, 1.0),
    ):
        super().__init__()
        self.target, self.band, self.rate = float(target_bits), float(band), float(rate)
        self.lam_max_range, self.lam_min_range, self.lam_floor = lam_max_range, lam_min_range, float(lam_floor)
        self.register_buffer("lam", torch.tensor(float(lam_init), dtype=torch.float64))
        self.register_buffer("lam_max", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("lam_min", torch.tensor(1.0, dtype=torch.float64))

    def loss(self, kl_tok: torch.Tensor) -> torch.Tensor:
        """kl_tok: [B, ...] KL bits per token. Returns the weighted KL loss (a scalar)."""
        with torch.no_grad():
            w = torch.ones_like(kl_tok)
            w = torch.where(kl_tok > self.target + self.band, self.lam_max.to(w.dtype), w)
            w = torch.where(kl_tok < self.target - self.band, self.lam_min.to(w.dtype), w)
        per_image = (w * kl_tok).flatten(1).sum(1)
        return self.lam.to(kl_tok.dtype) * per_image.mean()

    @staticmethod
    @torch.no_grad()
    def statistics(kl_tok: torch.Tensor) -> dict[str, float]:
        """Mean, max and min KL per token, agreed across ranks when torch.distributed is initialized."""
        kl = kl_tok.detach().double()
        total = torch.stack([kl.sum(), torch.tensor(float(kl.numel()), dtype=torch.float64, device=kl.device)])
        hi, lo = kl.max().clone(), kl.min().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return {"mean": (total[0] / total[1]).item(), "max": hi.item(), "min": lo.item()}

    @torch.no_grad()
    def update(self, stats: dict[str, float]) -> None:
        """One adaptation step from `statistics(...)` of the current batch."""
        r, t, b = self.rate, self.target, self.band
        self.lam.mul_(r if stats["mean"] > t else 1.0 / r).clamp_(min=self.lam_floor)
        self.lam_max.mul_(r if stats["max"] > t + b else 1.0 / r).clamp_(*self.lam_max_range)
        self.lam_min.mul_(1.0 / r if stats["min"] < t - b else r).clamp_(*self.lam_min_range)

    def scalars(self) -> dict[str, float]:
        return {"lam": self.lam.item(), "lam_max": self.lam_max.item(), "lam_min": self.lam_min.item()}
