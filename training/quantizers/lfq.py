"""Lookup-free quantization (MAGVIT-v2, Yu et al., 2023): each channel becomes one bit.

q = sign(z) in {-1, +1}^D (z > 0 -> +1, so 0 -> -1), straight-through; the id
is the bits as an integer, bit i = (channel i > 0). The implicit codebook is
the 2^D corners of the cube.

Auxiliary loss, as in MAGVIT-v2: make each token's soft assignment confident
(low per-token entropy) while the batch as a whole spreads over the codebook
(high entropy of the batch-averaged assignment), plus a small commitment term.
The soft assignment is a softmax over -||z - c||^2 / temperature to the corners
c. A 2^16-way softmax per token would be too big, so the D channels are split
into `groups` equal groups, each with its own sub-codebook of 2^(D / groups)
corners, and the entropies of the groups are summed (exact for the per-token
term, an upper bound for the batch term, which ignores dependence between
groups).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import QuantizerOutput, bits_of, float32_region, straight_through, to_tokens, usage_stats


def cube_corners(bits: int) -> torch.Tensor:
    """[2^bits, bits] in {-1, +1}; row j has +1 in column i where bit i of j is set (same order as the ids)."""
    j = torch.arange(2**bits)[:, None]
    return ((j >> torch.arange(bits)) & 1).float() * 2 - 1


def bit_weights(dim: int) -> torch.Tensor:
    """[1, D, 1, 1] powers of two: id = sum_i bit_i * 2^i."""
    return (2 ** torch.arange(dim, dtype=torch.long)).view(1, -1, 1, 1)


def entropy_terms(x: torch.Tensor, corners: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-token entropy, entropy of the batch-mean assignment), in nats, summed over groups.

    x: [N, D] tokens; corners: [C, D / groups] code vectors of one group's sub-codebook.
    -||x_g - c||^2 = 2 x_g.c - ||x_g||^2 - ||c||^2, and the two squared norms are the same
    for every corner of a token (the corners share one length), so the softmax only needs 2 x_g.c.
    """
    per_token = x.new_zeros(())
    batch = x.new_zeros(())
    for xg in x.split(corners.shape[1], dim=1):
        logits = (2.0 / temperature) * (xg @ corners.T)
        logp = F.log_softmax(logits, dim=1)
        p = logp.exp()
        per_token = per_token - (p * logp).sum(1).mean()
        avg = p.mean(0)
        batch = batch - (avg * avg.clamp(min=1e-30).log()).sum()
    return per_token, batch


class LFQ(nn.Module):
    """MAGVIT-v2 lookup-free quantizer.

    dim:            D bits per token (16: 65536 codes)
    entropy_weight: weight of (per-token entropy - batch entropy) (0.1, the reference setting)
    commitment:     weight of ||z - sg(q)||^2, mean over elements (0.025, the reference setting)
    groups:         channel groups for the entropy (2: two sub-codebooks of 256 corners at D = 16)
    temperature:    softmax temperature on squared distances to the corners (1)
    """

    def __init__(
        self,
        dim: int = 16,
        entropy_weight: float = 0.1,
        commitment: float = 0.025,
        groups: int = 2,
        temperature: float = 1.0,
    ):
        super().__init__()
        check_bits(dim, groups)
        self.dim, self.groups = int(dim), int(groups)
        self.num_codes = 2**self.dim
        self.bits_per_token = bits_of(self.num_codes)
        self.entropy_weight, self.commitment = float(entropy_weight), float(commitment)
        self.temperature = float(temperature)
        self.scale = 1.0  # codeword entries are +-scale (BSQ shrinks them onto the unit sphere)
        self.register_buffer("corners", cube_corners(self.dim // self.groups), persistent=False)
        self.register_buffer("weights", bit_weights(self.dim), persistent=False)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """What gets quantized: z itself (BSQ: z on the unit sphere)."""
        return z

    def commit_loss(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(x, q)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with float32_region(z.device):
            x = self.project(z.float())
            bits = x > 0
            q = torch.where(bits, 1.0, -1.0) * self.scale
            z_q = straight_through(q, x)
            ids = (bits.long() * self.weights).sum(1)
            per_token, batch = entropy_terms(to_tokens(x), self.corners, self.temperature)
            commit = self.commit_loss(x, q)
            loss = self.entropy_weight * (per_token - batch) + self.commitment * commit
            stats = usage_stats(ids, self.num_codes, commit=commit, entropy=per_token, batch_entropy=batch)
        return QuantizerOutput(z_q=z_q, ids=ids, loss=loss, stats=stats, z_continuous=x.detach())

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        bits = (ids.long()[:, None] // self.weights) % 2 == 1
        return torch.where(bits, 1.0, -1.0) * self.scale


def check_bits(dim: int, groups: int) -> None:
    if dim < 1 or groups < 1 or dim % groups:
        raise ValueError(f"dim ({dim}) must be a positive multiple of groups ({groups})")
    if dim > 62:
        raise ValueError(f"dim ({dim}) must be at most 62: ids are int64")
    if dim // groups > 16:
        raise ValueError(f"dim / groups ({dim // groups}) must be at most 16: each group's corners are enumerated")
