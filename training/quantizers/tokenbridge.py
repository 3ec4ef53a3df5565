"""TokenBridge-style post-training quantization of a Gaussian VAE's latents.

Each latent channel is its own token: the posterior mean is cut into `levels`
equal-probability bins of the prior N(0, 1) and replaced by the bin's
conditional mean under that prior. No training, no codebook search; the rate
is C * log2(levels) bits per position. (TokenBridge quantizes the latents of a
plain continuous VAE this way, channel by channel.)

levels: bins per channel (a power of 2, so each channel costs log2(levels) bits)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gqtok.core.codebook import normal_quantile


class GaussianScalarQuantizer(torch.nn.Module):
    def __init__(self, levels: int = 64):
        super().__init__()
        if levels < 2 or levels & (levels - 1):
            raise ValueError(f"levels must be a power of 2 >= 2, got {levels}")
        self.levels = levels
        edges = normal_quantile(np.arange(1, levels) / levels)  # inner bin edges, Phi^-1(k / L)
        full = np.concatenate([[-np.inf], edges, [np.inf]])
        pdf = np.exp(-0.5 * full**2) / math.sqrt(2 * math.pi)  # phi(+-inf) = 0
        centers = levels * (pdf[:-1] - pdf[1:])  # E[z | bin] = (phi(a) - phi(b)) / (1 / L)
        self.register_buffer("edges", torch.tensor(edges, dtype=torch.float32), persistent=False)
        self.register_buffer("centers", torch.tensor(centers, dtype=torch.float32), persistent=False)

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.levels)

    def encode(self, mu: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> long bin ids [B, C, h, w] (one token per channel)."""
        return torch.bucketize(mu.float().contiguous(), self.edges)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.centers[ids]
