"""Finite scalar quantization (Mentzer et al., 2023): round each channel to one of a few levels.

Channel i is squashed by a tanh into a range that holds exactly levels[i]
integers, rounded (straight-through), and divided by levels[i] // 2 to land in
[-1, 1]. The codebook is the implicit grid, prod(levels) points, and the id is
the per-channel digits read as a mixed-radix number (channel 0 least
significant). There is nothing to learn and no auxiliary loss.

For an even number of levels L the integers cannot sit symmetrically around 0,
so the squashed range is shifted by half a level, [-L/2, L/2 - 1], and the
tanh's argument is shifted to keep z = 0 at the value 0:

    bound(z) = a * tanh(z + atanh(offset / a)) - offset,   a = (L - 1) / 2 (+0.1%),  offset = 0.5 if L even else 0
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import QuantizerOutput, bits_of, float32_region, straight_through, usage_stats


class FSQ(nn.Module):
    """levels: levels per channel; the default (8, 8, 8, 5, 5, 5) gives 64000 codes, about 16 bits per token."""

    def __init__(self, levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)):
        super().__init__()
        levels = tuple(int(n) for n in levels)
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ needs at least one channel and 2+ levels per channel, got {levels}")
        self.levels, self.dim = levels, len(levels)
        self.num_codes = math.prod(levels)
        self.bits_per_token = bits_of(self.num_codes)
        lv = torch.tensor(levels, dtype=torch.float64)
        # Widened by 0.1% so that L = 2 gets a finite shift (atanh(1) is inf) and the end levels are
        # reached before tanh saturates; rounding still gives exactly L integers.
        half_range = (lv - 1) / 2 * (1 + 1e-3)
        offset = (1 - lv.remainder(2)) / 2  # 0.5 for even L, 0 for odd
        radix = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], dtype=torch.long)

        def channel(t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:  # [D] -> [1, D, 1, 1]
            return t.to(dtype).view(1, -1, 1, 1)

        # Constants, derived from `levels`: not saved with the model.
        self.register_buffer("half_range", channel(half_range), persistent=False)
        self.register_buffer("offset", channel(offset), persistent=False)
        self.register_buffer("shift", channel(torch.atanh(offset / half_range)), persistent=False)
        self.register_buffer("half_width", channel(lv.div(2).floor()), persistent=False)  # L // 2: digit of 0
        self.register_buffer("num_levels", channel(lv, torch.long), persistent=False)
        self.register_buffer("radix", channel(radix, torch.long), persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """The squashed value that gets rounded to integers in [-(L // 2), (L - 1) // 2]."""
        return self.half_range * torch.tanh(z + self.shift) - self.offset

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with float32_region(z.device):
            z = z.float()
            x = self.bound(z)
            r = straight_through(torch.round(x), x)  # integers in [-(L//2), (L-1)//2]
            z_q = r / self.half_width
            digits = r.detach().long() + self.half_width.long()  # in [0, L)
            ids = (digits * self.radix).sum(1)
            loss = z.new_zeros(())
            stats = usage_stats(ids, self.num_codes)
        return QuantizerOutput(z_q=z_q, ids=ids, loss=loss, stats=stats, z_continuous=x.detach() / self.half_width)

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        digits = ids.long()[:, None] // self.radix % self.num_levels
        return (digits - self.half_width.long()).float() / self.half_width
