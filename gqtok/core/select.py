"""Gaussian Quant selection: the score, once, and its exact search (the service, priors, benchmarks).

`token_features` and `codeword_features` take `xp` (numpy or torch), so the torch module of training
(gqtok.training.gq.GaussianQuantize, which export turns into gq_select.onnx) computes the very same formula.

For a token posterior N(mu, sigma^2) in R^d, GQ picks the codeword c that
maximizes the density ratio q(c|x) / p(c)^beta:

    score(c) = sum_i (beta - 1/sigma_i^2) c_i^2 + 2 c_i mu_i / sigma_i^2   (+ terms without c)

which is one matrix product between per-token features [beta - 1/sigma^2, 2 mu / sigma^2]
and per-codeword features [c^2, c], followed by an argmax.

Memory: the full tokens x K score matrix is never built. `GaussianQuantizer.select`
takes tokens TOKEN_BLOCK at a time, a few hundred bytes each (features, bounds,
candidates), so its extra memory is a constant for any number of tokens, plus
what the quantizer keeps: the k-d tree (the codebook in tree order, float32,
and every node's box, float64: 5 MiB at K = 2^16, d = 16) and, made at the
first exhaustive search, the codeword features' transposed chunks (8 MiB). The exhaustive search takes row
chunks of `row_chunk` tokens against codeword chunks of at most `code_chunk`
columns: one 4 MiB score buffer with the defaults.

The token id (the contract's rule): the argmax over k of the score evaluated in
float64 in one fixed order, `exact_scores(exact_token_features(mu, logvar, beta),
codebook[k])`, ties to the lowest index. Its exponential is `portable_exp`, built
from IEEE-exact +, *, rint and ldexp (numpy's np.exp may take a SIMD path whose
last bit depends on the CPU), so the id depends only on the float32 mu and
logvar and the codebook: not on BLAS, threads, SIMD features, the machine or the
other tokens of the batch.

Finding it without scoring all K codewords in float64, two ways, with the same ids:
- the k-d tree (gqtok/core/kdtree.py, what GaussianQuantizer.select uses): a
  compiled branch-and-bound search in float64 returns, per token, every codeword
  whose exact score could be the best (its bounds carry a slack far above their
  rounding), about 1.5% of the codebook examined on the default model; usually
  one candidate is left, rescored exactly here (`exact_winners`).
- the exhaustive search (`select_from_features`, GaussianQuantizer.select with
  exhaustive=True, and for the rare token with more than kdtree.CAPACITY
  candidates): every codeword scored in float32 by matrix products (in any
  summation order), every codeword within twice a rigorous
  error bound of the float32 maximum (`error_bound`) rescored exactly. Why that
  finds the exact argmax k*: if |float32 score - exact score| <= B for every
  codeword, then float32(k*) >= exact(k*) - B >= exact(k_hat) - B >=
  float32(k_hat) - 2B, with k_hat the float32 argmax. The bound is Higham's for a
  dot product of n = 2d terms in any order, gamma_n = n u / (1 - n u) with
  u = 2^-24, plus the rounding of the features to float32 and the float64
  evaluation itself, times sum_j |F_j| max_k |G_kj| (F the token's features, G
  the codewords').
"""

from __future__ import annotations

import math
import threading

import numpy as np

from gqtok.core.kdtree import CodebookTree

ROW_CHUNK = 256  # tokens per matrix product
CODE_CHUNK = 4096  # codewords per matrix product
TOKEN_BLOCK = 4096  # tokens per search in GaussianQuantizer.select (its memory: a few MiB)
LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the encoder's log-variance (reference value)

# portable_exp: ln 2 split so that n * LN2_HI is exact for |n| < 2^20 (fdlibm's constants), Taylor to r^14
LN2_HI, LN2_LO, INV_LN2 = 6.93147180369123816490e-01, 1.90821492927058770002e-10, 1.44269504088896338700e00
EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(15))
U32, U64 = 2.0**-24, 2.0**-53  # unit roundoff of float32 and float64


def portable_exp(x: np.ndarray) -> np.ndarray:
    """exp of float64 x in [-700, 700] from +, *, rint and ldexp alone, each exactly rounded by IEEE 754, in a
    fixed order: the same bits on every machine. Relative error under 1e-15 (x = n ln2 + r, |r| <= ln2 / 2,
    Taylor series of e^r to r^14, Horner's rule)."""
    x = np.asarray(x, dtype=np.float64)
    n = np.rint(x * INV_LN2)
    r = (x - n * LN2_HI) - n * LN2_LO
    p = np.full_like(r, EXP_TAYLOR[-1])
    for c in EXP_TAYLOR[-2::-1]:
        p = p * r + c
    return np.ldexp(p, n.astype(np.int32))


def exact_token_features(mu: np.ndarray, logvar: np.ndarray, beta: float) -> np.ndarray:
    """float32 [N, d] posterior -> float64 [N, 2d] [beta - 1/sigma^2, 2 mu / sigma^2], the same bits everywhere
    (token_features' formula, with portable_exp)."""
    inv_var = portable_exp(-np.clip(np.asarray(logvar, np.float32).astype(np.float64), *LOGVAR_RANGE))
    return np.concatenate([beta - inv_var, (2.0 * np.asarray(mu, np.float32).astype(np.float64)) * inv_var], axis=1)


def exact_scores(features: np.ndarray, codewords: np.ndarray) -> np.ndarray:
    """The defined score of each (token features, codeword) row pair: float64 [M, 2d] x float32 [M, d] -> [M],
    sum over i = 0..d-1, left to right from 0, of a_i * (c_i * c_i) + b_i * c_i (c_i * c_i is exact in
    float64). Elementwise operations only, so no library may reorder the sum."""
    d = codewords.shape[1]
    c = np.asarray(codewords, np.float32).astype(np.float64)
    total = np.zeros(len(c))
    for i in range(d):
        total = total + (features[:, i] * (c[:, i] * c[:, i]) + features[:, d + i] * c[:, i])
    return total


def error_bound(features: np.ndarray, code_max: np.ndarray) -> np.ndarray:
    """Per token, a bound on |float32 score - exact score| over every codeword: float64 [N, 2d] features and
    max_k |G_kj| [2d] -> [N]. gamma_n for the float32 dot product in any order, 2u more for rounding F and G to
    float32 (c^2 is rounded; c is not), gamma_(n+1) in float64 for exact_scores; 1% and an absolute 1e-30 of
    slack cover the bound's own rounding and denormals."""
    n = features.shape[1]
    gamma = lambda m, u: m * u / (1.0 - m * u)  # noqa: E731
    eps = (gamma(n, U32) + 3.0 * U32 + gamma(n + 1, U64)) * 1.01
    return eps * (np.abs(features) * code_max).sum(axis=1) + 1e-30


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
    features: np.ndarray, codebook: np.ndarray, row_chunk: int = ROW_CHUNK, code_chunk: int = CODE_CHUNK,
    code_t: list[np.ndarray] | None = None, code_max: np.ndarray | None = None, stats: dict | None = None,
) -> np.ndarray:
    """The exact GQ ids (the module docstring's rule) of float64 token features [N, 2d] against a float32 codebook
    [K, d], by a chunked float32 pass over every codeword and exact rescoring of those it cannot rule out: the
    exhaustive search (GaussianQuantizer.select uses the k-d tree instead). Returns int64 [N].

    code_t, code_max: transposed_chunks(codeword_features(codebook)) and max_k |G_kj|, when the caller keeps them.
    stats: a dict to which "candidates" (codewords rescored exactly) and "rescored_chunks" ((token, chunk) pairs
    scored a second time in float32) are added."""
    n, k = features.shape[0], codebook.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if code_t is None or code_max is None:
        code = codeword_features(codebook.astype(np.float64))
        code_t, code_max = transposed_chunks(code.astype(np.float32), code_chunk), np.abs(code).max(axis=0)
    bound = error_bound(features, code_max)
    tok32 = features.astype(np.float32)
    products = score_products(None, row_chunk, min(code_chunk, k))  # numpy's; their summation order is free
    chunk_max, _ = chunk_maxima(tok32, code_t, products, row_chunk)
    threshold = floor32(chunk_max.max(axis=1) - 2.0 * bound)
    # pass 2: the (token, chunk) pairs whose maximum reaches the token's threshold (usually the winner's chunk
    # alone) are scored again, row_chunk tokens at a time, and every codeword there that reaches it is kept
    pair_rows, pair_chunks = np.nonzero(chunk_max >= threshold[:, None])
    cand_rows, cand_cols = [], []
    for ci in np.unique(pair_chunks):
        chunk_rows = pair_rows[pair_chunks == ci]
        for s in range(0, len(chunk_rows), row_chunk):
            r = chunk_rows[s : s + row_chunk]
            scores = products(tok32[r], code_t[ci])
            hit = np.flatnonzero(scores >= threshold[r][:, None])
            cand_rows.append(r[hit // scores.shape[1]]), cand_cols.append(hit % scores.shape[1] + ci * code_chunk)
    if stats is not None:
        stats["rescored_chunks"] = stats.get("rescored_chunks", 0) + len(pair_rows)
    return exact_winners(features, codebook, np.concatenate(cand_rows), np.concatenate(cand_cols), stats)


def exact_winners(features: np.ndarray, codebook: np.ndarray, rows: np.ndarray, ids: np.ndarray,
                  stats: dict | None = None) -> np.ndarray:
    """Per token row, the highest exact score among its candidate codewords (rows[i], ids[i]), ties to the lowest
    index: int64 [N] (-1 for a row without candidates). stats: "candidates" (codewords rescored) is added."""
    exact = exact_scores(features[rows], codebook[ids])
    order = np.lexsort((ids, -exact, rows))
    rows, ids = rows[order], ids[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    out = np.full(features.shape[0], -1, dtype=np.int64)
    out[rows[first]] = ids[first]
    if stats is not None:
        stats["candidates"] = stats.get("candidates", 0) + len(rows)
    return out


def score_products(matmul, rows: int, cols: int):
    """f(block [m, 2d], code_t chunk) -> float32 scores: `matmul`, or numpy's into one reused buffer."""
    if matmul is not None:
        return matmul
    buf = np.empty(rows * cols, dtype=np.float32)
    return lambda block, ct: np.matmul(block, ct, out=buf[: len(block) * ct.shape[1]].reshape(len(block), ct.shape[1]))


def chunk_maxima(tok32: np.ndarray, code_t: list[np.ndarray], products, row_chunk: int = ROW_CHUNK):
    """The float32 pass: per token and codeword chunk, the maximum score and its column -> two [N, chunks]."""
    n, rows = len(tok32), np.arange(row_chunk)
    best = np.empty((n, len(code_t)), dtype=np.float32)
    where = np.empty((n, len(code_t)), dtype=np.int64)
    for start, m, (block,) in fixed_blocks(n, row_chunk, tok32):
        for ci, ct in enumerate(code_t):
            scores = products(block, ct)
            col = scores.argmax(axis=1)
            best[start : start + m, ci], where[start : start + m, ci] = scores[rows, col][:m], col[:m]
    return best, where


def float32_argmax(features: np.ndarray, code_t: list[np.ndarray], matmul=None, row_chunk: int = ROW_CHUNK,
                   code_chunk: int = CODE_CHUNK) -> np.ndarray:
    """The exhaustive float32 argmax (what training's torch search and gq_select.onnx compute; ties to the lowest
    index of the float32 scores): the baseline the exact selection is measured against, not the contract."""
    tok32 = features.astype(np.float32)
    best, where = chunk_maxima(tok32, code_t, score_products(matmul, row_chunk, code_t[0].shape[1]), row_chunk)
    ci = best.argmax(axis=1)
    return where[np.arange(len(ci)), ci] + ci * code_chunk


def floor32(x: np.ndarray) -> np.ndarray:
    """float64 -> the largest float32 not above it: a float32 threshold that keeps everything the float64 one keeps."""
    f = x.astype(np.float32)
    return np.where(f.astype(np.float64) > x, np.nextafter(f, np.float32(-np.inf)), f)


def kl_bits(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """KL(N(mu, exp(logvar)) || N(0, I)) in bits over the last axis (a token's d dimensions): the token's rate, which
    TDC trains to sit near log2 K (training/model.py's kl_bits_per_token, in torch, is the same sum)."""
    mu, logvar = np.asarray(mu, np.float64), np.asarray(logvar, np.float64)
    return 0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar).sum(-1) / np.log(2.0)


def tree_metric_of(features: np.ndarray, dim: int) -> np.ndarray:
    """The k-d tree's metric from token features (token_features): the median of 1/sigma_i^2 - beta."""
    return np.median(-features[:, :dim], axis=0)


def tree_metric(mu: np.ndarray, logvar: np.ndarray, beta: float) -> list[float]:
    """The k-d tree's metric from posteriors [N, d] (what export stores as Manifest.gq_tree_metric)."""
    mu, logvar = (np.asarray(v, np.float32).reshape(-1, np.shape(v)[-1]) for v in (mu, logvar))
    return [round(float(v), 6) for v in tree_metric_of(token_features(mu, logvar, beta), mu.shape[1])]


class GaussianQuantizer:
    """Holds a codebook, its k-d tree and its features; selects and looks up codewords.

    codebook: float32 [K, d], e.g. from `gqtok.core.codebook.make_codebook`.
    beta:     weight of the prior term; 1 is the reference density ratio,
              0 reduces to picking the codeword most likely under q alone.
    threads:  threads of the tree search, each on its share of a call's tokens (0: one per core).

    metric:   per coordinate, the median over real tokens of 1/sigma_i^2 - beta (which coordinates the model's
              posteriors are sharp in), as export measured it (Manifest.gq_tree_metric; tree_metric); the k-d
              tree is split in it. None: the metric of the first selection's tokens (a warm-up image's may not be
              typical). It sets how fast selections are, never their ids.
    """

    def __init__(self, codebook: np.ndarray, beta: float = 1.0, threads: int = 0, metric=None):
        self.codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        self.beta, self.threads = float(beta), threads
        self.metric = None if metric is None else np.asarray(metric, np.float64)
        self.tree: CodebookTree | None = None
        self._exhaustive: tuple[list[np.ndarray], np.ndarray] | None = None
        self._lock = threading.Lock()

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]

    @property
    def dim(self) -> int:
        return self.codebook.shape[1]

    def tree_for(self, features: np.ndarray) -> CodebookTree:
        """The k-d tree, built at the first call in the metric of these token features."""
        with self._lock:
            if self.tree is None:
                metric = self.metric if self.metric is not None else tree_metric_of(features, self.dim)
                self.tree = CodebookTree(self.codebook, metric, threads=self.threads)
            return self.tree

    def exhaustive_features(self) -> tuple[list[np.ndarray], np.ndarray]:
        """(transposed float32 chunks of the codeword features, max_k |G_kj|) for select_from_features, made once."""
        with self._lock:
            if self._exhaustive is None:
                exact = codeword_features(self.codebook.astype(np.float64))
                self._exhaustive = transposed_chunks(exact.astype(np.float32)), np.abs(exact).max(axis=0)
            return self._exhaustive

    def select(self, mu: np.ndarray, logvar: np.ndarray, stats: dict | None = None,
               exhaustive: bool = False) -> np.ndarray:
        """mu, logvar: [..., d] (taken as float32) -> the exact int64 codeword ids [...].

        stats: a dict to which the search adds "scored" (codewords in the tree's leaves searched, or scored in
        float32 by the exhaustive search), "pairs" (tokens x K), "candidates" (codewords rescored exactly) and
        "fallback" (tokens the tree passed to the exhaustive search). exhaustive=True scores every codeword
        (select_from_features) instead of searching the tree: the same ids, slower."""
        mu, logvar = np.asarray(mu), np.asarray(logvar)
        if mu.shape != logvar.shape or mu.shape[-1] != self.dim:
            raise ValueError(f"mu {mu.shape} and logvar {logvar.shape} must match and end in d={self.dim}")
        if not (np.isfinite(mu).all() and np.isfinite(logvar).all()):
            raise ValueError("mu and logvar must be finite")
        flat_mu, flat_lv = mu.reshape(-1, self.dim), logvar.reshape(-1, self.dim)
        ids = np.empty(len(flat_mu), dtype=np.int64)
        for s in range(0, len(ids), TOKEN_BLOCK):  # a token's id does not depend on its block: memory is constant
            features = exact_token_features(flat_mu[s : s + TOKEN_BLOCK], flat_lv[s : s + TOKEN_BLOCK], self.beta)
            if exhaustive:
                rest = np.arange(len(features))
            else:
                rows, found, rest = self.tree_for(features).candidates(features, stats)
                ids[s : s + len(features)] = exact_winners(features, self.codebook, rows, found, stats)
            if len(rest):
                code_t, code_max = self.exhaustive_features()
                ids[s + rest] = select_from_features(features[rest], self.codebook, code_t=code_t,
                                                     code_max=code_max, stats=stats)
                if stats is not None:  # every codeword scored, in float32 (the tree counted its tokens' pairs)
                    stats["scored"] = stats.get("scored", 0) + len(rest) * self.num_codes
                    if exhaustive:
                        stats["pairs"] = stats.get("pairs", 0) + len(rest) * self.num_codes
                    else:
                        stats["fallback"] = stats.get("fallback", 0) + len(rest)
        return ids.reshape(mu.shape[:-1])

    def select_float32(self, mu: np.ndarray, logvar: np.ndarray, matmul=None) -> np.ndarray:
        """The exhaustive float32 argmax over [N, d] posteriors (float32_argmax): a baseline, not the contract."""
        return float32_argmax(exact_token_features(mu, logvar, self.beta), self.exhaustive_features()[0], matmul)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """int ids [...] -> float32 codewords [..., d]."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_codes):
            raise ValueError(f"token ids must lie in [0, {self.num_codes}), got [{ids.min()}, {ids.max()}]")
        return self.codebook[ids]
