"""Gaussian Quant selection: the score, once, and its numpy/onnxruntime search (the service, priors, benchmarks).

`token_features` and `codeword_features` take `xp` (numpy or torch), so the torch module of training
(gqtok.training.gq.GaussianQuantize, which export turns into gq_select.onnx) computes the very same formula.

For a token posterior N(mu, sigma^2) in R^d, GQ picks the codeword c that
maximizes the density ratio q(c|x) / p(c)^beta:

    score(c) = sum_i (beta - 1/sigma_i^2) c_i^2 + 2 c_i mu_i / sigma_i^2   (+ terms without c)

which is one matrix product between per-token features [beta - 1/sigma^2, 2 mu / sigma^2]
and per-codeword features [c^2, c], followed by an argmax.

Memory: the full tokens x K score matrix is never built. Tokens go through in
row chunks of exactly `row_chunk` rows (the last one zero-padded) against
codeword chunks of at most `code_chunk` columns, keeping a running max. Peak
extra memory is about 4 * row_chunk * (code_chunk + 4d + 2) bytes, 4.2 MiB with
the defaults, for any number of tokens, plus the [K, 2d] codeword features (and
their transposed chunks) that `GaussianQuantizer` computes once.

Batch independence: every matrix product has the same shape whatever the
number of tokens, so BLAS takes the same code path and summation order for a
token whether it is alone or among thousands; its result does not depend on
its neighbours. Ties go to the lowest codeword index.
"""

from __future__ import annotations

import numpy as np

ROW_CHUNK = 256  # tokens per matrix product (fixed: see "Batch independence")
CODE_CHUNK = 4096  # codewords per matrix product
LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the encoder's log-variance (reference value)


def codeword_features(codebook, xp=np):
    """[K, d] codebook -> [K, 2d] features [c^2, c]. xp: numpy (the default) or torch."""
    if codebook.ndim != 2:
        raise ValueError(f"codebook must be [K, d], got shape {tuple(codebook.shape)}")
    return xp.concatenate([codebook * codebook, codebook], axis=1)


def token_features(mu, logvar, beta: float, xp=np):
    """[N, d] posterior -> [N, 2d] features [beta - 1/sigma^2, 2 mu / sigma^2]. xp: numpy or torch.

    With float32 inputs the result is float32 in both libraries."""
    inv_var = xp.exp(-logvar.clip(*LOGVAR_RANGE))
    return xp.concatenate([beta - inv_var, 2.0 * mu * inv_var], axis=1)


def fixed_blocks(n: int, rows: int, *arrays: np.ndarray):
    """Yield (start, m, blocks): each array's rows [start, start + m) copied into a zero-padded [rows, ...] block.

    Every block has the same shape, so whatever computes on it takes the same code path for a row whether it
    is alone or among thousands (the batch independence of the module docstring). The blocks are reused."""
    blocks = [np.zeros((rows, *a.shape[1:]), dtype=a.dtype) for a in arrays]
    for start in range(0, n, rows):
        m = min(rows, n - start)
        for block, a in zip(blocks, arrays):
            block[:m] = a[start : start + m]
            block[m:] = 0
        yield start, m, blocks


def transposed_chunks(code: np.ndarray, code_chunk: int = CODE_CHUNK) -> list[np.ndarray]:
    """[K, 2d] codeword features -> contiguous [2d, <= code_chunk] blocks, the right operands of the products."""
    return [np.ascontiguousarray(code[s : s + code_chunk].T) for s in range(0, code.shape[0], code_chunk)]


def select_from_features(
    tok: np.ndarray, code: np.ndarray, row_chunk: int = ROW_CHUNK, code_chunk: int = CODE_CHUNK, matmul=None,
    code_t: list[np.ndarray] | None = None,
) -> np.ndarray:
    """argmax_k tok @ code[k] for every row of tok, chunked. Returns int64 [N].

    matmul: optional f(block [row_chunk, 2d], code_t [2d, <= code_chunk]) -> scores, e.g. onnxruntime's
    MatMul (service/runtime.py); by default numpy's, into a reused buffer.
    code_t: transposed_chunks(code, code_chunk), when the caller keeps them between calls."""
    n, k = tok.shape[0], code.shape[0]
    out = np.empty(n, dtype=np.int64)
    code_t = code_t if code_t is not None else transposed_chunks(code, code_chunk)
    rows = np.arange(row_chunk)
    # One score buffer reused for every product, so two score matrices never coexist.
    buf = np.empty(row_chunk * min(code_chunk, k), dtype=np.float32)
    for start, m, (block,) in fixed_blocks(n, row_chunk, tok):
        best = np.full(row_chunk, -np.inf, dtype=np.float32)
        best_idx = np.zeros(row_chunk, dtype=np.int64)
        for ci, ct in enumerate(code_t):
            if matmul is None:
                scores = np.matmul(block, ct, out=buf[: row_chunk * ct.shape[1]].reshape(row_chunk, ct.shape[1]))
            else:
                scores = matmul(block, ct)
            idx = scores.argmax(axis=1)
            val = scores[rows, idx]
            better = val > best  # strict: earlier chunks win ties -> lowest index
            best = np.where(better, val, best)
            best_idx = np.where(better, idx + ci * code_chunk, best_idx)
        out[start : start + m] = best_idx[:m]
    return out


def kl_bits(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """KL(N(mu, exp(logvar)) || N(0, I)) in bits over the last axis (a token's d dimensions): the token's rate, which
    TDC trains to sit near log2 K (training/model.py's kl_bits_per_token, in torch, is the same sum)."""
    mu, logvar = np.asarray(mu, np.float64), np.asarray(logvar, np.float64)
    return 0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar).sum(-1) / np.log(2.0)


class GaussianQuantizer:
    """Holds a codebook and its features; selects and looks up codewords.

    codebook: float32 [K, d], e.g. from `gqtok.core.codebook.make_codebook`.
    beta:     weight of the prior term; 1 is the reference density ratio,
              0 reduces to picking the codeword most likely under q alone.
    """

    def __init__(self, codebook: np.ndarray, beta: float = 1.0):
        self.codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        self.beta = float(beta)
        self.features = np.ascontiguousarray(codeword_features(self.codebook))
        self.features_t = transposed_chunks(self.features)  # kept: 8 MiB at K = 2^16, d = 16

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]

    @property
    def dim(self) -> int:
        return self.codebook.shape[1]

    def select(self, mu: np.ndarray, logvar: np.ndarray, matmul=None) -> np.ndarray:
        """mu, logvar: [..., d] -> int64 codeword ids [...]. matmul: see select_from_features."""
        mu = np.asarray(mu)
        if mu.shape != np.shape(logvar) or mu.shape[-1] != self.dim:
            raise ValueError(f"mu {mu.shape} and logvar {np.shape(logvar)} must match and end in d={self.dim}")
        flat = token_features(np.asarray(mu, np.float32).reshape(-1, self.dim),
                              np.asarray(logvar, np.float32).reshape(-1, self.dim), self.beta)
        return select_from_features(flat, self.features, matmul=matmul, code_t=self.features_t).reshape(mu.shape[:-1])

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """int ids [...] -> float32 codewords [..., d]."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_codes):
            raise ValueError(f"token ids must lie in [0, {self.num_codes}), got [{ids.min()}, {ids.max()}]")
        return self.codebook[ids]
