"""Gaussian Quant in torch: the twin of `gqtok/select.py` for training, eval and export.

Same score, same fixed-shape chunking (so a token's id does not depend on the
other tokens in its batch), same tie rule (lowest index). See gqtok/select.py
for the derivation and the memory bound.
"""

from __future__ import annotations

import torch

from gqtok.core import layout
from gqtok.core.codebook import make_codebook
from gqtok.core.select import CODE_CHUNK, LOGVAR_RANGE, ROW_CHUNK


def codeword_features(codebook: torch.Tensor) -> torch.Tensor:
    return torch.cat([codebook * codebook, codebook], dim=1).contiguous()


def token_features(mu: torch.Tensor, logvar: torch.Tensor, beta: float) -> torch.Tensor:
    inv_var = torch.exp(-logvar.float().clamp(*LOGVAR_RANGE))
    return torch.cat([beta - inv_var, 2.0 * mu.float() * inv_var], dim=1)


@torch.no_grad()
def select_from_features(
    tok: torch.Tensor, code: torch.Tensor, row_chunk: int = ROW_CHUNK, code_chunk: int = CODE_CHUNK
) -> torch.Tensor:
    n, k = tok.shape[0], code.shape[0]
    out = torch.empty(n, dtype=torch.long, device=tok.device)
    block = torch.zeros(row_chunk, tok.shape[1], dtype=torch.float32, device=tok.device)
    code_t = [code[s : s + code_chunk].T.contiguous() for s in range(0, k, code_chunk)]
    for start in range(0, n, row_chunk):
        m = min(row_chunk, n - start)
        block.zero_()
        block[:m] = tok[start : start + m]
        best = torch.full((row_chunk,), float("-inf"), device=tok.device)
        best_idx = torch.zeros(row_chunk, dtype=torch.long, device=tok.device)
        for ci, ct in enumerate(code_t):
            val, idx = (block @ ct).max(dim=1)
            better = val > best
            best = torch.where(better, val, best)
            best_idx = torch.where(better, idx + ci * code_chunk, best_idx)
        out[start : start + m] = best_idx[:m]
    return out


class GaussianQuantizer(torch.nn.Module):
    """GQ over a seeded codebook; the codebook is a buffer rebuilt from the seed, never trained or saved.

    seed:      codebook seed (recorded in the manifest)
    num_codes: K = 2^bits
    dim:       token dimension d
    beta:      prior weight in the selection score (1 = reference density ratio)
    """

    def __init__(self, seed: int, num_codes: int, dim: int, beta: float = 1.0):
        super().__init__()
        self.seed, self.beta = seed, float(beta)
        codebook = torch.from_numpy(make_codebook(seed, num_codes, dim))
        self.register_buffer("codebook", codebook, persistent=False)
        self.register_buffer("features", codeword_features(codebook), persistent=False)

    def select(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """mu, logvar: [..., d] -> long ids [...]."""
        d = self.codebook.shape[1]
        flat = token_features(mu.reshape(-1, d), logvar.reshape(-1, d), self.beta)
        return select_from_features(flat, self.features).reshape(mu.shape[:-1])

    def encode_latent(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Latent grids [B, C, H, W] -> token ids [B, T, H, W]."""
        d = self.codebook.shape[1]
        return self.select(layout.group(mu, d), layout.group(logvar, d))

    def decode_latent(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T, H, W] -> quantized latent grid [B, C, H, W]."""
        return layout.ungroup(self.codebook[ids])
