"""Gaussian Quant selection: the score, once, and its numpy/onnxruntime search (the service, priors, benchmarks).

`token_features` and `codeword_features` take `xp` (numpy or torch), so the torch module of training
(gqtok.training.gq.GaussianQuantize, which export turns into gq_select.onnx) computes the very same formula.

For a token posterior N(mu, sigma^2) in R^d, GQ picks the codeword c that
maximizes the density ratio q(c|x) / p(c)^beta:

    score(c) = sum_i (beta - 1/sigma_i^2) c_i^2 + 2 c_i mu_i / sigma_i^2   (+ terms without c)

which is one matrix product between per-token features [beta - 1/sigma^2, 2 mu / sigma^2]
and per-codeword features [c^2, c], followed by an argmax.

Memory: the full tokens x K score matrix is never built. Tokens go through in
row chunks of `row_chunk` rows against codeword chunks of at most `code_chunk`
columns: one 4 MiB score buffer with the defaults. Per token a few hundred bytes
(features, bounds, chunk maxima, candidates), and `GaussianQuantizer.select`
takes tokens TOKEN_BLOCK at a time, so its extra memory is a constant (under
16 MiB) for any number of tokens, plus the [K, 2d] codeword features (and their
transposed chunks) that `GaussianQuantizer` computes once.

The token id (the contract's rule): the argmax over k of the score evaluated in
float64 in one fixed order, `exact_scores(exact_token_features(mu, logvar, beta),
codebook[k])`, ties to the lowest index. Its exponential is `portable_exp`, built
from IEEE-exact +, *, rint and ldexp (numpy's np.exp may take a SIMD path whose
last bit depends on the CPU), so the id depends only on the float32 mu and
logvar and the codebook: not on BLAS, threads, SIMD features, the machine or the
other tokens of the batch. Computing that for all K codewords in float64 would be
slow, so `select_from_features` scores in float32 by matrix products (numpy's or
onnxruntime's, in any summation order), keeps every codeword within twice a
rigorous error bound of the float32 maximum (`error_bound`), and rescores only
those exactly. Why that finds the exact argmax k*: if |float32 score - exact
score| <= B for every codeword, then float32(k*) >= exact(k*) - B >=
exact(k_hat) - B >= float32(k_hat) - 2B, with k_hat the float32 argmax. The bound
is Higham's for a dot product of n = 2d terms in any order, gamma_n = n u / (1 - n u)
with u = 2^-24, plus the rounding of the features to float32 and the float64
evaluation itself, times sum_j |F_j| max_k |G_kj| (F the token's features, G the
codewords'). Usually one candidate is left; a few where codewords nearly tie.

The float32 pass need not score every codeword: `window_chunk_maxima` scores, per
token, a run of the codewords sorted by the coordinate the tokens weigh most,
which provably holds the winner (the bound is in its docstring). On the default
model's posteriors that is about a fifth of the codebook; the ids are the same
as with every codeword scored (tested).
"""

from __future__ import annotations

import math

import numpy as np

ROW_CHUNK = 256  # tokens per matrix product
CODE_CHUNK = 4096  # codewords per matrix product
TOKEN_BLOCK = 4096  # tokens per select_from_features call in GaussianQuantizer.select (its memory: a few MiB)
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
    matmul=None, code_t: list[np.ndarray] | None = None, code_max: np.ndarray | None = None,
    stats: dict | None = None, window: "SortedCodebook | None" = None,
) -> np.ndarray:
    """The exact GQ ids (the module docstring's rule) of float64 token features [N, 2d] against a float32 codebook
    [K, d], by a chunked float32 pass and exact rescoring of the codewords it cannot rule out. Returns int64 [N].

    matmul: optional f(block [row_chunk, 2d], code_t [2d, <= code_chunk]) -> float32 scores, e.g. onnxruntime's
    MatMul (service/runtime.py); by default numpy's, into a reused buffer. Its summation order is free.
    code_t, code_max: transposed_chunks(codeword_features(codebook)) and max_k |G_kj|, when the caller keeps them.
    stats: a dict to which "candidates" (codewords rescored exactly) and "rescored_chunks" ((token, chunk) pairs
    scored a second time in float32) are added, and with a window "scored", "pairs" and "widened".
    window: a SortedCodebook of this codebook: pass 1 scores, per token, only a window of the codewords sorted by
    one coordinate that provably holds the winner (window_chunk_maxima), instead of all K. Same ids."""
    n, k = features.shape[0], codebook.shape[0]
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    if code_t is None or code_max is None:
        code = codeword_features(codebook.astype(np.float64))
        code_t, code_max = transposed_chunks(code.astype(np.float32), code_chunk), np.abs(code).max(axis=0)
    bound = error_bound(features, code_max)
    tok32 = features.astype(np.float32)
    products = score_products(matmul, row_chunk, min(code_chunk, k))
    perm = None
    if window is not None:  # columns are positions in the sorted order; perm maps them to codeword ids
        code_t, perm = window.code_t, window.perm
        # numpy's products here, whatever `matmul` is: the windows make many small products, for which
        # onnxruntime's per-call cost outweighs its speed (0.53 against 0.71 of the float32 argmax's time at
        # 4,096 tokens of the default model, 0.90 against 0.98 at 1,024; numpy on one BLAS thread)
        numpy_products = products if matmul is None else score_products(None, row_chunk, min(code_chunk, k))
        chunk_max = window_chunk_maxima(features, tok32, bound, window, numpy_products, row_chunk, code_chunk, stats)
    else:
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
    r, c = np.concatenate(cand_rows), np.concatenate(cand_cols)
    c = perm[c] if perm is not None else c
    # exact rescoring; per token the highest exact score wins, ties to the lowest index
    exact = exact_scores(features[r], codebook[c])
    order = np.lexsort((c, -exact, r))
    r, c = r[order], c[order]
    first = np.ones(len(r), dtype=bool)
    first[1:] = r[1:] != r[:-1]
    out[r[first]] = c[first]
    if stats is not None:
        stats["candidates"] = stats.get("candidates", 0) + len(r)
        stats["rescored_chunks"] = stats.get("rescored_chunks", 0) + len(pair_rows)
    return out


WINDOW_START = 0.02  # the probe: this share of the codebook either side of each token's peak
WINDOW_GROUP = 32  # tokens per product on their windows (fewer: tighter unions, more and smaller products)
WINDOW_MIN_WEIGHT = 2.0  # window only when the median token weighs its sharpest coordinate at least this much


class SortedCodebook:
    """The codewords sorted by coordinate `dim`, their features in that order as transposed chunks: for the
    window search, in which each token's possible winners are a contiguous run of columns."""

    def __init__(self, codebook: np.ndarray, features32: np.ndarray, dim: int, code_chunk: int = CODE_CHUNK):
        self.dim = dim
        self.perm = np.argsort(codebook[:, dim], kind="stable")
        self.values = codebook[self.perm, dim].astype(np.float64)  # ascending
        self.code_t = transposed_chunks(features32[self.perm], code_chunk)
        self.low, self.high = codebook.min(axis=0).astype(np.float64), codebook.max(axis=0).astype(np.float64)


def coordinate_maxima(features: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Per token and coordinate, the maximum of a x^2 + b x over the codebook's range [low, high] of x: [N, d]."""
    d = features.shape[1] // 2
    a, b = features[:, :d], features[:, d:]
    with np.errstate(divide="ignore", invalid="ignore"):
        peak = np.clip(np.where(a < 0, -b / (2 * a), low), low, high)
    ends = np.maximum(a * low * low + b * low, a * high * high + b * high)
    return np.where(a < 0, np.maximum(a * peak * peak + b * peak, ends), ends)


def window_chunk_maxima(features, tok32, bound, window: SortedCodebook, products, row_chunk, code_chunk, stats):
    """Pass 1 of select_from_features on a window of the sorted codewords per token: [N, chunks] float32 chunk
    maxima, -inf where a chunk holds no codeword that can win.

    Why the window holds the winner. With S(c) = sum_i f_i(c_i), f_i(x) = a_i x^2 + b_i x, and U_i the maximum
    of f_i over the codebook's range, every codeword has S(c) <= f_j(c_j) + sum_(i != j) U_i. A codeword can
    only win if S(c) >= L, a lower bound of the best exact score: here the best float32 score found so far
    minus the error bound. So f_j(c_j) >= L - sum_(i != j) U_i, which for a_j < 0 puts c_j within
    sqrt((f_j(peak) - T) / -a_j) of the peak -b_j / 2a_j: a contiguous run of the sorted codewords. Groups of
    WINDOW_GROUP tokens sorted by peak are scored on a probe window around their peaks (its best score gives L);
    a token whose provable window reaches past its probe is scored on the rest, in groups of similar width.
    Tokens for which f_j is convex (a_j >= 0) have no window and are scored on every column. Slack (1e-9 of the
    magnitudes, and four error bounds) keeps rounding on the safe side; it costs columns, never correctness."""
    n, k, j = len(tok32), len(window.values), window.dim
    d = features.shape[1] // 2
    chunk_max = np.full((n, len(window.code_t)), -np.inf, dtype=np.float32)
    a, b = features[:, j], features[:, d + j]
    concave = a < 0
    with np.errstate(divide="ignore", invalid="ignore"):
        peak = np.where(concave, -b / (2 * a), 0.0)
    pos = np.searchsorted(window.values, peak)
    columns = 0

    def scan(rows, lo, hi):  # chunk maxima of `rows` over sorted columns [lo, hi)
        nonlocal columns
        block = tok32[rows]
        for ci in range(lo // code_chunk, -(-hi // code_chunk)):
            start, stop = max(lo, ci * code_chunk), min(hi, (ci + 1) * code_chunk)
            part = window.code_t[ci][:, start - ci * code_chunk : stop - ci * code_chunk]
            scores = products(block, np.ascontiguousarray(part))
            chunk_max[rows, ci] = np.maximum(chunk_max[rows, ci], scores.max(axis=1))
            columns += len(rows) * (stop - start)

    half = max(1, int(WINDOW_START * k))
    covered = np.zeros((n, 2), dtype=np.int64)
    peaked = np.flatnonzero(concave)
    peaked = peaked[np.argsort(pos[peaked], kind="stable")]
    for g in range(0, len(peaked), WINDOW_GROUP):  # the probe, in small groups of neighbouring peaks
        rows = peaked[g : g + WINDOW_GROUP]
        lo, hi = max(0, int(pos[rows].min()) - half), min(k, int(pos[rows].max()) + half)
        scan(rows, lo, hi)
        covered[rows] = lo, hi
    flat = np.flatnonzero(~concave)  # f_j convex: no window, every column
    for g in range(0, len(flat), row_chunk):
        scan(flat[g : g + row_chunk], 0, k)
        covered[flat[g : g + row_chunk]] = 0, k
    # the provable windows, from the best score found
    best = chunk_max.max(axis=1).astype(np.float64) - bound
    maxima = coordinate_maxima(features, window.low, window.high)
    rest = maxima.sum(axis=1) - maxima[:, j]
    magnitude = np.abs(maxima).sum(axis=1) + np.abs(best) + np.abs(features).sum(axis=1) * np.maximum(
        window.high**2, np.abs(window.low) ** 2).max()
    floor = best - rest - 1e-9 * magnitude - 4 * bound
    with np.errstate(divide="ignore", invalid="ignore"):
        top = np.where(concave, -b * b / (4 * a), 0.0)  # f_j at its peak
        radius = np.where(concave, np.sqrt(np.maximum(0.0, (top - floor) / -a)), np.inf) * (1 + 1e-9) + 1e-12
    need_lo = np.searchsorted(window.values, peak - radius, side="left")
    need_hi = np.searchsorted(window.values, peak + radius, side="right")
    # pass 1 proper: each group of tokens (sorted by peak) on the union of its provable windows, less what its
    # probe covered
    short = np.flatnonzero(concave & ((need_lo < covered[:, 0]) | (need_hi > covered[:, 1])))
    # groups of similar width (octaves), then position: a group's union is not much wider than its windows
    width = np.floor(np.log2(need_hi[short] - need_lo[short] + 1.0))
    short = short[np.lexsort((pos[short], width))]
    for g in range(0, len(short), WINDOW_GROUP):
        rows = short[g : g + WINDOW_GROUP]
        lo, hi = int(need_lo[rows].min()), int(need_hi[rows].max())
        probe_lo, probe_hi = int(covered[rows, 0].max()), int(covered[rows, 1].min())
        if probe_lo >= probe_hi or probe_lo <= lo or probe_hi >= hi:
            scan(rows, lo, hi)
        else:
            scan(rows, lo, probe_lo)
            scan(rows, probe_hi, hi)
    if stats is not None:
        stats["scored"] = stats.get("scored", 0) + columns  # (token, codeword) scores in pass 1
        stats["pairs"] = stats.get("pairs", 0) + n * k  # of all there are
        stats["widened"] = stats.get("widened", 0) + len(short)  # tokens whose window passed their probe
    return chunk_max


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


class GaussianQuantizer:
    """Holds a codebook and its features; selects and looks up codewords.

    codebook: float32 [K, d], e.g. from `gqtok.core.codebook.make_codebook`.
    beta:     weight of the prior term; 1 is the reference density ratio,
              0 reduces to picking the codeword most likely under q alone.
    """

    def __init__(self, codebook: np.ndarray, beta: float = 1.0):
        self.codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        self.beta = float(beta)
        exact = codeword_features(self.codebook.astype(np.float64))
        self.features = np.ascontiguousarray(exact.astype(np.float32))
        self.features_t = transposed_chunks(self.features)  # kept: 8 MiB at K = 2^16, d = 16
        self.features_max = np.abs(exact).max(axis=0)  # max_k |G_kj|, for error_bound
        self.sorted: dict[int, SortedCodebook] = {}  # by coordinate, made when first chosen (8 MiB each)

    def window_for(self, features: np.ndarray) -> SortedCodebook | None:
        """The sorted codebook for the coordinate these tokens weigh most (median of -a_i = 1/sigma_i^2 - beta),
        or None when even that one is too flat for a window to prune."""
        weight = np.median(-features[:, : self.dim], axis=0)
        j = int(np.argmax(weight))
        if weight[j] < WINDOW_MIN_WEIGHT:
            return None
        if j not in self.sorted:
            self.sorted[j] = SortedCodebook(self.codebook, self.features, j)
        return self.sorted[j]

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]

    @property
    def dim(self) -> int:
        return self.codebook.shape[1]

    def select(self, mu: np.ndarray, logvar: np.ndarray, matmul=None, stats: dict | None = None,
               window: bool = True) -> np.ndarray:
        """mu, logvar: [..., d] (taken as float32) -> the exact int64 codeword ids [...]. matmul, stats: see
        select_from_features; window=False scores every codeword in pass 1 (the same ids, slower)."""
        mu, logvar = np.asarray(mu), np.asarray(logvar)
        if mu.shape != logvar.shape or mu.shape[-1] != self.dim:
            raise ValueError(f"mu {mu.shape} and logvar {logvar.shape} must match and end in d={self.dim}")
        if not (np.isfinite(mu).all() and np.isfinite(logvar).all()):
            raise ValueError("mu and logvar must be finite")
        flat_mu, flat_lv = mu.reshape(-1, self.dim), logvar.reshape(-1, self.dim)
        ids = np.empty(len(flat_mu), dtype=np.int64)
        for s in range(0, len(ids), TOKEN_BLOCK):  # a token's id does not depend on its block: memory is constant
            features = exact_token_features(flat_mu[s : s + TOKEN_BLOCK], flat_lv[s : s + TOKEN_BLOCK], self.beta)
            ids[s : s + TOKEN_BLOCK] = select_from_features(
                features, self.codebook, matmul=matmul, code_t=self.features_t, code_max=self.features_max,
                stats=stats, window=self.window_for(features) if window else None)
        return ids.reshape(mu.shape[:-1])

    def select_float32(self, mu: np.ndarray, logvar: np.ndarray, matmul=None) -> np.ndarray:
        """The exhaustive float32 argmax over [N, d] posteriors (float32_argmax): a baseline, not the contract."""
        return float32_argmax(exact_token_features(mu, logvar, self.beta), self.features_t, matmul)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """int ids [...] -> float32 codewords [..., d]."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_codes):
            raise ValueError(f"token ids must lie in [0, {self.num_codes}), got [{ids.min()}, {ids.max()}]")
        return self.codebook[ids]
