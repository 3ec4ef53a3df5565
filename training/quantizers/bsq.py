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

from .lfq import LFQ


class BSQ(LFQ):
    """Binary spherical quantizer: LFQ's machinery applied to z / ||z|| with codewords of length 1.

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
        super().__init__(dim, entropy_weight, commitment, groups, 1.0 / dim if temperature is None else temperature)
        self.scale = 1.0 / math.sqrt(self.dim)
        self.corners.mul_(self.scale)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=1)

    def commit_loss(self, u: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (u - q).square().sum(1).mean()  # per token, not per element: see the module docstring
