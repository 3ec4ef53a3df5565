"""Gaussian Quant in torch: the module that training, evaluation and export (gq_select.onnx) use.

    gq = GaussianQuantize(num_codes=2**16, dim=16, seed=0)
    quantized, indices, aux = gq(mu, logvar)        # latent grids [B, C, H, W] -> [B, C, H, W], [B, T, H, W]
    latent = gq.get_output_from_indices(indices)     # the decoder's input for a token grid

The score is gqtok.core.select's (the same token_features/codeword_features, with xp=torch); the search runs
over fixed-shape tiles, so a token's id does not depend on the other tokens in its batch, and ties go to the
lowest index. `blocked_argmax` is that search, shared with the VQ baseline's nearest-codeword search.
"""

from __future__ import annotations

import torch

from gqtok.core import layout
from gqtok.core.codebook import make_codebook
from gqtok.core.select import CODE_CHUNK, ROW_CHUNK, codeword_features, token_features


@torch.no_grad()
def blocked_argmax(tok: torch.Tensor, tiles: list[tuple[int, torch.Tensor, torch.Tensor | None]],
                   row_chunk: int = ROW_CHUNK, alpha: float = 1.0) -> torch.Tensor:
    """argmax_k of offset[k] + alpha * tok . code[k] for every row of tok [N, D]. Returns long [N].

    tiles:     (first column, code_t [D, cols], offset [cols] or None) covering the K columns in order
    row_chunk: rows per product; the last chunk is zero-padded, so every product has the same shape
    The only large tensor alive is one [row_chunk, cols] score tile, reused. A later tile must be strictly
    better to win, and argmax returns the first maximum within a tile: ties go to the lowest index."""
    n = tok.shape[0]
    out = torch.empty(n, dtype=torch.long, device=tok.device)
    block = tok.new_zeros(row_chunk, tok.shape[1])
    scores = tok.new_empty(row_chunk * max(ct.shape[1] for _, ct, _ in tiles))
    for start in range(0, n, row_chunk):
        m = min(row_chunk, n - start)
        block.zero_()
        block[:m] = tok[start : start + m]
        best = tok.new_full((row_chunk,), float("-inf"))
        best_id = torch.zeros(row_chunk, dtype=torch.long, device=tok.device)
        for first, ct, offset in tiles:
            s = scores[: row_chunk * ct.shape[1]].view(row_chunk, -1)  # contiguous, also for a narrower last tile
            if offset is None:
                torch.mm(block, ct, out=s)
                if alpha != 1.0:
                    s.mul_(alpha)
            else:
                torch.addmm(offset, block, ct, beta=1.0, alpha=alpha, out=s)
            idx = s.argmax(dim=1)  # argmax + gather is faster than max(dim) on CPU
            val = s.gather(1, idx[:, None]).squeeze(1)
            better = val > best
            best = torch.where(better, val, best)
            best_id = torch.where(better, idx + first, best_id)
        out[start : start + m] = best_id[:m]
    return out


def column_tiles(code: torch.Tensor, cols: int = CODE_CHUNK, offset: torch.Tensor | None = None):
    """[K, D] per-column features (and an optional [K] offset) -> the tiles of blocked_argmax."""
    return [(s, code[s : s + cols].T.contiguous(), None if offset is None else offset[s : s + cols].contiguous())
            for s in range(0, code.shape[0], cols)]


class GaussianQuantize(torch.nn.Module):
    """GQ over a seeded codebook; the codebook is a buffer rebuilt from the seed, never trained or saved.

    num_codes: K = 2^bits
    dim:       token dimension d (latent channels C are a multiple of it; T = C / d tokens per position)
    seed:      codebook seed (recorded in the manifest)
    beta:      prior weight in the selection score (1 = the reference density ratio, 0 = most likely under q)
    """

    def __init__(self, num_codes: int, dim: int, seed: int = 0, beta: float = 1.0):
        super().__init__()
        self.seed, self.beta = seed, float(beta)
        codebook = torch.from_numpy(make_codebook(seed, num_codes, dim))
        self.register_buffer("codebook", codebook, persistent=False)
        self.register_buffer("features", codeword_features(codebook, xp=torch), persistent=False)

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]

    @property
    def dim(self) -> int:
        return self.codebook.shape[1]

    def select(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Token posteriors mu, logvar [..., d] -> long ids [...]."""
        d = self.dim
        flat = token_features(mu.reshape(-1, d).float(), logvar.reshape(-1, d).float(), self.beta, xp=torch)
        return blocked_argmax(flat, column_tiles(self.features)).reshape(mu.shape[:-1])

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor):
        """Latent grids [B, C, H, W] -> (quantized latent [B, C, H, W], ids [B, T, H, W], aux).

        aux holds the shift |quantized - mu| / sigma per latent element ("shift_sigmas"): GQ needs no auxiliary
        loss (the codebook is fixed), and the shift is what its theory bounds."""
        indices = self.select(layout.group(mu, self.dim), layout.group(logvar, self.dim))
        quantized = self.get_output_from_indices(indices)
        aux = {"shift_sigmas": (quantized - mu).abs() / torch.exp(0.5 * logvar)}
        return quantized, indices, aux

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T, H, W] -> quantized latent grid [B, C, H, W]."""
        return layout.ungroup(self.codebook[indices])


class SelectGraph(torch.nn.Module):
    """The fixed-shape selection step that export writes as gq_select.onnx: mu, logvar [R, d] and the codebook
    [K, d] -> int64 ids [R]. One product and one argmax (first maximum), the same score as GaussianQuantize."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = float(beta)

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        tok = token_features(mu, logvar, self.beta, xp=torch)
        return (tok @ codeword_features(codebook, xp=torch).T).argmax(dim=1)
