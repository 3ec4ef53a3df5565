"""Binary spherical quantization (Zhao et al., 2024): LFQ on the unit sphere.

u = z / ||z|| over the D channels, q = sign(u) / sqrt(D), so both u and every
codeword have unit length; straight-through on u (the gradient reaches z
through the normalization). Ids as in LFQ: bit i = (channel i > 0).

The entropy loss is LFQ's with the distances measured on the sphere, between u
and the codewords c / sqrt(D). Those distances are D times smaller than LFQ's
between sqrt(D) u and the cube corners c, so the default temperature is 1 / D:
the loss is then exactly LFQ's (temperature 1) applied to sqrt(D) u, whose
channels are about +-1 like LFQ's inputs. Likewise the commitment term is the
per-token squared distance ||u - sg(q)||^2 (= LFQ's mean over elements on
sqrt(D) u), with LFQ's weight 0.025.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import QuantizerOutput, bits_of, float32_region, straight_through, to_tokens, usage_stats
from .lfq import bit_weights, check_bits, cube_corners, entropy_terms


class BSQ(nn.Module):
    """Binary spherical quantizer.

    dim:            D bits per token (16: 65536 codes)
    entropy_weight: weight of (per-token entropy - batch entropy) (0.1, as LFQ)
    commitment:     weight of ||u - sg(q)||^2 per token (0.025, as LFQ; see the module docstring)
    groups:         channel groups for the entropy (2: two sub-codebooks of 256 codewords at D = 16)
    temperature:    softmax temperature on squared distances on the sphere (None: 1 / dim, see above)
    """

    def __init__(
        self,
        dim: int = 16,
        entropy_weight: float = 0.1,
        commitment: float = 0.025,
        groups: int = 2,
        temperature: float | None = None,
    ):
        super().__init__()
        check_bits(dim, groups)
        self.dim, self.groups = int(dim), int(groups)
        self.num_codes = 2**self.dim
        self.bits_per_token = bits_of(self.num_codes)
        self.entropy_weight, self.commitment = float(entropy_weight), float(commitment)
        self.temperature = 1.0 / self.dim if temperature is None else float(temperature)
        self.scale = 1.0 / math.sqrt(self.dim)  # codeword entries are +-scale
        self.register_buffer("corners", cube_corners(self.dim // self.groups) * self.scale, persistent=False)
        self.register_buffer("weights", bit_weights(self.dim), persistent=False)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with float32_region(z.device):
            z = z.float()
            u = F.normalize(z, dim=1)
            bits = u > 0
            q = torch.where(bits, 1.0, -1.0) * self.scale
            z_q = straight_through(q, u)
            ids = (bits.long() * self.weights).sum(1)
            per_token, batch = entropy_terms(to_tokens(u), self.corners, self.temperature)
            commit = (u - q).square().sum(1).mean()
            loss = self.entropy_weight * (per_token - batch) + self.commitment * commit
            stats = usage_stats(ids, self.num_codes, commit=commit, entropy=per_token, batch_entropy=batch)
        return QuantizerOutput(z_q=z_q, ids=ids, loss=loss, stats=stats)

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        bits = (ids.long()[:, None] // self.weights) % 2 == 1
        return torch.where(bits, 1.0, -1.0) * self.scale
