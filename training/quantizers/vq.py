"""Vector quantization with a learned codebook, trained the VQGAN way.

Nearest codeword by squared distance; the reconstruction gradient skips the
rounding (straight-through), and two auxiliary losses train the codebook and
keep the encoder close to it:

    loss = ||sg(z) - e||^2 + commitment * ||z - sg(e)||^2      (means over elements)

The codebook starts as uniform(-1/K, 1/K), the init of the VQGAN (taming)
reference: every codeword starts near the origin and only the ones that win
some token ever move. At large K that leaves many codewords unused, the known
weakness of this baseline. Practitioners' remedies, each off by default so that
the baseline is the reference one:

- `dead_code_restart`: codewords unused for a while are re-seeded with encoder
  outputs of the current batch;
- `ema_decay`: the codebook is not trained by gradient but follows the running
  mean of the tokens assigned to each codeword (online k-means, as in VQ-VAE-2);
  the codebook loss term then goes and only the commitment term stays;
- `normalize`: tokens and codewords are l2-normalized before the lookup (cosine
  distance), as in ViT-VQGAN and LlamaGen, whose codes are also low-dimensional
  (8 channels: set the model's latent_channels). On the sphere the small uniform
  init becomes random directions, so no codeword starts far from the data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gqtok.training.gq import blocked_argmax, column_tiles

from . import QuantizerOutput, bits_of, float32_region, from_tokens, straight_through, to_tokens, usage_stats


def nearest_codes(tokens: torch.Tensor, codebook: torch.Tensor, chunk_tokens: int, chunk_codes: int) -> torch.Tensor:
    """argmin_k ||t - e_k||^2 for each row of tokens [N, D], by GQ's tiled search (training/gq.py).

    ||t||^2 is the same for every k, so the nearest codeword maximizes 2 t.e_k - ||e_k||^2: one addmm per
    fixed-shape tile, ties to the lowest id, and a token's id does not depend on its batch."""
    sq = (codebook * codebook).sum(1)
    return blocked_argmax(tokens, column_tiles(codebook, chunk_codes, offset=-sq), chunk_tokens, alpha=2.0)


class VectorQuantizer(nn.Module):
    """VQ-VAE / VQGAN quantizer.

    num_codes:         K codewords (2**16 = 16 bits per token, the reference setting)
    dim:               D, channels of z and of each codeword
    commitment:        weight of ||z - sg(e)||^2 (0.25, the VQ-VAE / VQGAN value)
    dead_code_restart: re-seed codewords unused for `dead_code_steps` training steps
                       with random encoder outputs of the current batch (off: reference VQGAN)
    dead_code_steps:   how many consecutive training steps without a hit make a codeword dead
    ema_decay:         None: codebook trained by the codebook loss (reference); a float such as 0.99: codebook
                       is the EMA of its assigned tokens (a buffer, not a parameter)
    normalize:         look up l2-normalized tokens among l2-normalized codewords; z_q is the unit codeword
    chunk_tokens:      tokens per distance tile (256)
    chunk_codes:       codes per distance tile (None: 4096 on CPU, where cache-sized tiles run about twice
                       as fast, 65536 elsewhere, for fewer kernel launches); the tile, at most
                       256 x 65536 float32 = 64 MiB by default, bounds the search's memory
    """

    def __init__(
        self,
        num_codes: int = 2**16,
        dim: int = 16,
        commitment: float = 0.25,
        dead_code_restart: bool = False,
        dead_code_steps: int = 100,
        ema_decay: float | None = None,
        normalize: bool = False,
        chunk_tokens: int = 256,
        chunk_codes: int | None = None,
    ):
        super().__init__()
        self.num_codes, self.dim = int(num_codes), int(dim)
        self.bits_per_token = bits_of(self.num_codes)
        self.commitment = float(commitment)
        self.dead_code_restart, self.dead_code_steps = bool(dead_code_restart), int(dead_code_steps)
        self.chunk_tokens, self.chunk_codes = int(chunk_tokens), chunk_codes
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        self.normalize = bool(normalize)
        bound = 1.0 / self.num_codes
        codebook = torch.empty(self.num_codes, self.dim).uniform_(-bound, bound)
        if self.ema_decay is None:
            self.codebook = nn.Parameter(codebook)
        else:
            # The EMA state: how many tokens each codeword has drawn lately and their sum; codebook = sum / count.
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_count", torch.ones(self.num_codes))
            self.register_buffer("ema_sum", codebook.clone())
        if self.dead_code_restart:
            # Consecutive training steps each codeword went unused; saved with the model so a resumed
            # run keeps counting (the buffer exists only when the option is on).
            self.register_buffer("unused_steps", torch.zeros(self.num_codes, dtype=torch.long))

    @torch.no_grad()
    def _restart_dead(self, tokens: torch.Tensor) -> None:
        """Replace dead codewords by random tokens of this batch (before the search, so they compete at once).

        Written with torch.where over the whole codebook so that it never syncs with the host.
        Simple on purpose: the optimizer's moments of a restarted row are kept, and under
        data parallelism each process picks its own tokens (the codebooks would drift apart
        unless the caller broadcasts them).
        """
        dead = self.unused_steps >= self.dead_code_steps
        self._reseed(dead, tokens)
        self.unused_steps.masked_fill_(dead, 0)

    @torch.no_grad()
    def _reseed(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Codewords where `rows` (bool [K]) is set become random tokens of this batch (their EMA state too)."""
        pick = tokens[torch.randint(tokens.shape[0], (self.num_codes,), device=tokens.device)]
        self.codebook.copy_(torch.where(rows[:, None], pick, self.codebook))
        if self.ema_decay is not None:
            self.ema_sum.copy_(torch.where(rows[:, None], pick, self.ema_sum))
            self.ema_count.masked_fill_(rows, 1.0)

    @torch.no_grad()
    def _ema_update(self, tokens: torch.Tensor, ids: torch.Tensor) -> None:
        """One step of online k-means: each codeword moves toward the mean of the tokens it won.

        Count and sum decay together, so a codeword that wins nothing stays where it is. Under data
        parallelism the counts and sums would need an all-reduce first (not done: one process here)."""
        d = self.ema_decay
        counts = torch.bincount(ids, minlength=self.num_codes).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, ids, tokens)
        self.ema_count.mul_(d).add_(counts, alpha=1 - d)
        self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
        # A codeword idle for thousands of steps has count and sum near underflow: it keeps its place.
        alive = self.ema_count > 1e-6
        self.codebook.copy_(torch.where(alive[:, None], self.ema_sum / self.ema_count.clamp(min=1e-6)[:, None],
                                        self.codebook))

    def _codewords(self) -> torch.Tensor:
        """The codewords as the search and the decoder see them (unit length with `normalize`)."""
        codebook = self.codebook.float()
        return F.normalize(codebook, dim=1) if self.normalize else codebook

    @torch.no_grad()
    def _count_usage(self, ids: torch.Tensor) -> None:
        hit = torch.bincount(ids, minlength=self.num_codes) > 0
        self.unused_steps.add_(1).masked_fill_(hit, 0)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with float32_region(z.device):
            z = z.float()
            b, _, h, w = z.shape
            if self.normalize:
                z = F.normalize(z, dim=1)
            tokens = to_tokens(z)
            restart = self.dead_code_restart and self.training
            if restart:
                self._restart_dead(tokens.detach())
            cols = self.chunk_codes or (4096 if z.device.type == "cpu" else 65536)
            ids = nearest_codes(tokens.detach(), self._codewords().detach(), self.chunk_tokens, cols)
            if restart:
                self._count_usage(ids)
            if self.ema_decay is not None and self.training:
                self._ema_update(tokens.detach(), ids)
            e = from_tokens(F.embedding(ids, self._codewords()), b, h, w)
            codebook_loss = F.mse_loss(e, z.detach())
            commit_loss = F.mse_loss(z, e.detach())
            # with the EMA the codebook is a buffer that the update above moves: its loss is only logged
            loss = self.commitment * commit_loss + (codebook_loss if self.ema_decay is None else 0.0)
            z_q = straight_through(e, z)
            ids = ids.reshape(b, h, w)
            stats = usage_stats(ids, self.num_codes, codebook=codebook_loss, commit=commit_loss)
        return QuantizerOutput(z_q=z_q, ids=ids, loss=loss, stats=stats, z_continuous=z.detach())

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        b, h, w = ids.shape
        return from_tokens(F.embedding(ids.reshape(-1).long(), self._codewords()), b, h, w)
