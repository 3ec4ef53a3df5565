"""A small autoregressive transformer over token grids (raster order), with a KV cache for sampling.

    model = ARTransformer(GeneratorConfig(vocab_size=65536, grid=(16, 16)), codebook=codebook)
    logits = model(ids)                                    # teacher forcing: ids [B, L] -> logits [B, L, K]
    ids = model.generate(4, temperature=1.0, top_k=100)    # [4, L] token ids, L = T * h * w

Sequence layout: a grid [T, h, w] is read in raster order, position by position, the T tokens of a
position innermost (the tokenizer's strided layout keeps those T tokens as one latent vector).
Token 0 is predicted from a learned start embedding; every later token from all the tokens before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GeneratorConfig:
    vocab_size: int = 65536  # K of the tokenizer
    grid: tuple[int, int] = (16, 16)  # (h, w) token grid it generates: 128x128 pixels at f = 8
    tokens_per_position: int = 1  # T of the tokenizer
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    codebook_init: bool = True  # start token embeddings as a random projection of the GQ codewords

    @property
    def seq_len(self) -> int:
        return self.tokens_per_position * self.grid[0] * self.grid[1]


class SelfAttention(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x [B, t, C]; cache: keys and values of the earlier positions [B, nh, s, hs]. Returns (y, new cache)."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        # With a cache, the t new queries sit at the end: causal within them, all of the past visible.
        if cache is None or t > 1:
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
        else:
            mask = None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c)), (k, v)


class Block(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x, cache=None):
        a, cache = self.attn(self.ln1(x), cache)
        x = x + a
        return x + self.mlp(self.ln2(x)), cache


class ARTransformer(nn.Module):
    def __init__(self, cfg: GeneratorConfig, codebook: np.ndarray | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.start = nn.Parameter(torch.zeros(1, 1, cfg.n_embd))  # stands in front of token 0
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.n_embd))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.start, std=0.02)
        if cfg.codebook_init and codebook is not None:
            # Codewords close in latent space start close in embedding space.
            cb = torch.as_tensor(codebook, dtype=torch.float32)
            if cb.shape[0] != cfg.vocab_size:
                raise ValueError(f"codebook has {cb.shape[0]} codewords, vocab_size is {cfg.vocab_size}")
            proj = torch.randn(cb.shape[1], cfg.n_embd, generator=torch.Generator().manual_seed(0))
            emb = cb @ proj
            with torch.no_grad():
                self.tok_emb.weight.copy_(emb * (0.02 / emb.std()))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: ids [B, L] (L <= seq_len) -> logits [B, L, K]; logits[:, i] predicts ids[:, i] from
        ids[:, :i] (the inputs are the start embedding, then ids[:, :-1])."""
        b, t = ids.shape
        x = torch.cat([self.start.expand(b, 1, -1), self.tok_emb(ids[:, :-1])], dim=1) + self.pos_emb[:, :t]
        for block in self.blocks:
            x, _ = block(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, n: int, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, use_cache: bool = True) -> torch.Tensor:
        """Sample n sequences [n, seq_len]. use_cache=False recomputes every prefix (for the speed comparison);
        the same seed gives the same tokens either way up to float rounding in the logits."""
        gen = torch.Generator().manual_seed(seed)
        out = torch.zeros(n, 0, dtype=torch.long)
        caches = [None] * len(self.blocks)
        for i in range(self.cfg.seq_len):
            if use_cache:
                # step i feeds the token sampled at i - 1 (the start embedding at i = 0) and reads position i
                if i == 0:
                    x = self.start.expand(n, 1, -1) + self.pos_emb[:, :1]
                else:
                    x = self.tok_emb(out[:, -1:]) + self.pos_emb[:, i : i + 1]
                for j, block in enumerate(self.blocks):
                    x, caches[j] = block(x, caches[j])
                logits = self.head(self.ln_f(x))[:, -1]
            else:  # the whole prefix again, every step (the head only at the last position, as with the cache)
                x = torch.cat([self.start.expand(n, 1, -1), self.tok_emb(out)], dim=1) + self.pos_emb[:, : i + 1]
                for block in self.blocks:
                    x, _ = block(x)
                logits = self.head(self.ln_f(x[:, -1:]))[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            out = torch.cat([out, nxt[:, None]], dim=1)
        return out


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                gen: torch.Generator) -> torch.Tensor:
    """[B, K] logits -> [B] ids. temperature 0 is greedy; top_k keeps the k likeliest; top_p the smallest set
    whose probability reaches p (nucleus)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep up to and including the one that crosses p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)[:, 0]
