"""The codebook's k-d tree: where the exact GQ selection (gqtok/core/select.py) looks for each token's codeword.

    tree = CodebookTree(codebook, weights)          # weights: how sharp the tokens typically are, per coordinate
    rows, ids, overflow = tree.candidates(features)  # the codewords that can win, per token (select.py rescores)

The deficit. With token features (a, b) (select.token_features) the score of codeword c is sum_i f_i(c_i),
f_i(x) = a_i x^2 + b_i x. Let U_i be the largest f_i over the codebook's range of coordinate i
(`coordinate_maxima`); then the deficit D(c) = sum_i (U_i - f_i(c_i)) is a sum of non-negative terms, and the
codeword with the highest score has the lowest deficit. Over a box of codewords each term is at least its
minimum over the box's interval (at the clamped peak -b_i / 2a_i, or an end), so the sum of those minima
bounds the deficit of every codeword inside: a node whose bound exceeds the best deficit found so far holds
no winner.

The tree. Balanced (each node's codewords split at the median), its leaves LEAF_SIZE codewords or fewer, every
node's box tight around its codewords. Each node splits the coordinate along which its codewords spread most,
the spread weighted by sqrt(weights): a token's deficit grows with 1/sigma_i^2 along coordinate i, so
coordinates the tokens are sharp in are split many times and coordinates they are flat in (sigma near 1:
posterior near the prior) hardly at all. On the default model (one coordinate at sigma ~0.03, seven more at
0.1-0.5, eight near 1) the search computes the deficit of about 1.6% of the codebook. The weights change only
the speed, never the ids.

The search (`_search`, compiled by numba): per token, depth first, the child with the lower bound first, a node
pruned when its bound exceeds the best deficit found plus `slack`. A box's bound sums the least deficit of the
coordinates in which the token's score is concave (a_i < 0) and takes 0 for the others (a smaller, still valid
bound, one evaluation per coordinate). A leaf's deficits are summed over the token's sharpest coordinates
first, and the leaf is left as soon as all of them exceed the best. Everything is float64, in any summation
order (numba may vectorize the sums): the rounding stays below 1e-13 of the token's magnitude
M = sum_i (|a_i| X_i^2 + |b_i| X_i + |U_i|) (X_i the largest |c_i|), and slack is SLACK * M, SLACK = 1e-12, so
every codeword whose exact score could reach the best one's is returned and select.py's exact rescoring
decides. Usually one candidate per token; when more than CAPACITY codewords lie within slack of the best
(duplicates, or near-duplicates under a clamped sigma) the token is reported in `overflow` and select.py
scores it against every codeword instead.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np

LEAF_SIZE = 32  # codewords per leaf (16 and 64 were slower on the default model)
CAPACITY = 16  # candidates kept per token; more within slack: the token goes to the exhaustive search
SLACK = 1e-12  # of the token's magnitude: far above the float64 rounding of bounds and deficits (< 1e-13)
TOKENS_PER_THREAD = 128  # fewer tokens than this per thread: not worth a thread's start

log = logging.getLogger("gqtok.kdtree")


def coordinate_maxima(features: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Per token and coordinate, the maximum U_i of a x^2 + b x over the codebook's range [low, high] of x: [N, d]."""
    d = features.shape[1] // 2
    a, b = features[:, :d], features[:, d:]
    with np.errstate(divide="ignore", invalid="ignore"):
        peak = np.clip(np.where(a < 0, -b / (2 * a), low), low, high)
    ends = np.maximum(a * low * low + b * low, a * high * high + b * high)
    return np.where(a < 0, np.maximum(a * peak * peak + b * peak, ends), ends)


def default_threads(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """One per core this process may use: the cores it may run on, capped by a container's CPU quota (cgroup v2
    cpu.max "QUOTA PERIOD", rounded up), so that a container limited to 2 CPUs on a 64-core host starts 2
    threads per pool, not 64."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


@functools.cache  # one pool per size for the process: more models (more trees) add no threads
def thread_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="gq-search")


class CodebookTree:
    """A balanced k-d tree over a float32 [K, d] codebook, split in the metric of `weights` (d numbers, typically
    the median of 1/sigma^2 - beta over some tokens: see GaussianQuantizer; negative ones count as 0).

    threads: the searches of one call run on this many threads, each on its share of the tokens (0: one per
    core). The ids do not depend on it."""

    def __init__(self, codebook: np.ndarray, weights: np.ndarray, leaf_size: int = LEAF_SIZE, threads: int = 0):
        k, d = codebook.shape
        self.num_codes = k
        self.threads = threads or default_threads()
        depth = max(0, math.ceil(math.log2(k / leaf_size)))
        leaves = 1 << depth
        scale = np.sqrt(np.maximum(np.asarray(weights, np.float64), 0.0) + 1e-12)
        order = np.arange(k)
        edges = np.array([0, k])  # the current level's nodes hold order[edges[j]:edges[j + 1]]
        for _ in range(depth):
            mids = (edges[:-1] + edges[1:]) // 2
            for start, stop in zip(edges[:-1], edges[1:]):
                points = codebook[order[start:stop]]
                s = np.argmax((points.max(axis=0) - points.min(axis=0)) * scale)
                order[start:stop] = order[start:stop][np.argsort(points[:, s], kind="stable")]
            edges = np.insert(edges, np.arange(1, len(edges)), mids)
        self.ids = order  # tree position -> codeword id; leaf j holds positions [leaf_start[j], leaf_start[j + 1])
        self.leaf_start = edges
        # every node's tight box, heap order (root 1, children 2n and 2n + 1, leaves from `leaves` on; [0] unused)
        self.box_low, self.box_high = np.zeros((2 * leaves, d)), np.zeros((2 * leaves, d))
        width = int(np.diff(edges).max())
        self.leaves = np.zeros((leaves, d, width), dtype=np.float32)  # leaf j's codewords, a coordinate a row
        for j in range(leaves):
            points = codebook[order[edges[j] : edges[j + 1]]]
            self.box_low[leaves + j], self.box_high[leaves + j] = points.min(axis=0), points.max(axis=0)
            self.leaves[j, :, : len(points)] = points.T
        for node in range(leaves - 1, 0, -1):
            self.box_low[node] = np.minimum(self.box_low[2 * node], self.box_low[2 * node + 1])
            self.box_high[node] = np.maximum(self.box_high[2 * node], self.box_high[2 * node + 1])
        self.low, self.high = self.box_low[1].copy(), self.box_high[1].copy()
        self.largest = np.maximum(np.abs(self.low), np.abs(self.high))

    def candidates(self, features: np.ndarray, stats: dict | None = None):
        """float64 token features [N, 2d] -> (rows, ids, overflow): for each token row, the ids of the codewords
        that can have its highest exact score (rows and ids flat, int64), and the rows that had more than
        CAPACITY of them (their ids are not given: score them against every codeword). stats: a dict to which
        "scored" (codewords in the leaves searched) and "pairs" (tokens x K) are added."""
        n, d = features.shape[0], features.shape[1] // 2
        umax = coordinate_maxima(features, self.low, self.high)
        a, b = features[:, :d], features[:, d:]
        slack = SLACK * (np.abs(a) * self.largest**2 + np.abs(b) * self.largest + np.abs(umax)).sum(axis=1) + 1e-300
        found = np.zeros((n, CAPACITY), dtype=np.int64)
        count = np.zeros(n, dtype=np.int64)
        scored = np.zeros(n, dtype=np.int64)

        def search(part: slice):
            _search(features[part], umax[part], slack[part], self.box_low, self.box_high, self.leaf_start,
                    self.leaves, found[part], count[part], scored[part])

        parts = min(self.threads, n // TOKENS_PER_THREAD)
        if parts > 1:
            edges = np.linspace(0, n, parts + 1).astype(int)
            list(thread_pool(self.threads).map(search, [slice(s, e) for s, e in zip(edges[:-1], edges[1:])]))
        else:
            search(slice(0, n))
        overflow = np.flatnonzero(count < 0)
        kept = np.maximum(count, 0)
        rows = np.repeat(np.arange(n), kept)
        ids = self.ids[found[np.arange(CAPACITY)[None, :] < kept[:, None]]]
        if stats is not None:
            stats["scored"] = stats.get("scored", 0) + int(scored.sum())
            stats["pairs"] = stats.get("pairs", 0) + n * self.num_codes
        return rows, ids, overflow


def _box_bound(a, b, u, peak, low, high):
    """sum_i of u_i - (a_i x^2 + b_i x) at x = peak_i clamped to [low_i, high_i]: with (a, b, u) zero where the
    score is not concave, a lower bound of the deficit of every codeword in the box."""
    total = 0.0
    for i in range(len(a)):
        x = min(max(peak[i], low[i]), high[i])
        total += u[i] - (a[i] * x * x + b[i] * x)
    return total


def _search(features, umax, slack, box_low, box_high, leaf_start, leaves, found, count, scored):
    """For each token: its candidates' tree positions in found[t, :count[t]] (count -1: more than CAPACITY),
    and the number of codewords in the leaves it searched in scored[t]. See the module docstring."""
    n, d = features.shape[0], features.shape[1] // 2
    num_leaves, width = leaves.shape[0], leaves.shape[2]
    depth = int(np.log2(num_leaves))
    stack_node = np.empty(depth + 1, dtype=np.int64)  # pending farther children: at most one per depth
    stack_bound = np.empty(depth + 1)
    order = np.empty(d, dtype=np.int64)
    peak, bound_a, bound_b, bound_u = np.empty(d), np.empty(d), np.empty(d), np.empty(d)
    deficit = np.empty(width)
    kept_pos = np.empty(2 * CAPACITY, dtype=np.int64)
    kept_deficit = np.empty(2 * CAPACITY)
    for t in range(n):
        a, b, u, tol = features[t, :d], features[t, d:], umax[t], slack[t]
        for i in range(d):
            concave = a[i] < 0
            peak[i] = -b[i] / (2 * a[i]) if concave else 0.0
            bound_a[i], bound_b[i], bound_u[i] = (a[i], b[i], u[i]) if concave else (0.0, 0.0, 0.0)
            order[i] = i
        for i in range(1, d):  # the token's coordinates, sharpest (most negative a) first
            j, m = order[i], i - 1
            while m >= 0 and a[order[m]] > a[j]:
                order[m + 1] = order[m]
                m -= 1
            order[m + 1] = j
        best, kept, evaluated = np.inf, 0, 0
        stack_node[0], stack_bound[0], top = 1, 0.0, 1
        while top > 0:
            top -= 1
            node = stack_node[top]
            if stack_bound[top] > best + tol:
                continue
            while node < num_leaves:  # down to a leaf, the child with the lower bound first, the other pushed
                left = _box_bound(bound_a, bound_b, bound_u, peak, box_low[2 * node], box_high[2 * node])
                right = _box_bound(bound_a, bound_b, bound_u, peak, box_low[2 * node + 1], box_high[2 * node + 1])
                near, near_bound, far, far_bound = 2 * node, left, 2 * node + 1, right
                if right < left:
                    near, near_bound, far, far_bound = far, far_bound, near, near_bound
                if far_bound <= best + tol:
                    stack_node[top], stack_bound[top] = far, far_bound
                    top += 1
                node = near if near_bound <= best + tol else -1
                if node < 0:
                    break
            if node < 0:
                continue
            leaf = node - num_leaves
            size = leaf_start[leaf + 1] - leaf_start[leaf]
            evaluated += size
            for j in range(width):
                deficit[j] = 0.0 if j < size else np.inf  # the padding never becomes a candidate
            for m in range(d):  # sharpest coordinates first; leave when every deficit is past the best
                i = order[m]
                ai, bi, ui = a[i], b[i], u[i]
                for j in range(width):
                    x = np.float64(leaves[leaf, i, j])
                    deficit[j] += ui - (ai * x * x + bi * x)
                if m % 4 == 3 and m < d - 1 and deficit.min() > best + tol:
                    break
            for j in range(size):
                if deficit[j] > best + tol:
                    continue
                best = min(best, deficit[j])
                if kept == 2 * CAPACITY:  # full: drop what the lower best has excluded
                    q = 0
                    for r in range(kept):
                        if kept_deficit[r] <= best + tol:
                            kept_pos[q], kept_deficit[q] = kept_pos[r], kept_deficit[r]
                            q += 1
                    kept = q
                if kept == 2 * CAPACITY:
                    kept = -1
                    break
                kept_pos[kept], kept_deficit[kept] = leaf_start[leaf] + j, deficit[j]
                kept += 1
            if kept < 0:
                break
        q = 0
        for r in range(max(kept, 0)):
            if kept_deficit[r] <= best + tol:
                if q < CAPACITY:
                    found[t, q] = kept_pos[r]
                q += 1
        count[t] = q if 0 <= kept and q <= CAPACITY else -1
        scored[t] = evaluated


def _compile(function, **options):
    """numba.njit, float sums in any order (reassoc, contract: the slack covers them), cached on disk where numba
    finds a writable place: next to this file, NUMBA_CACHE_DIR or the user's cache, else (a read-only install
    and home, as in the images) numba-cache in the temporary folder (tempfile.gettempdir(): TMPDIR or /tmp).
    Where none is writable, each process compiles it in memory (about 2 s at its first selection)."""
    options = dict(nogil=True, error_model="numpy", fastmath={"reassoc", "contract"}, **options)
    try:
        return numba.njit(cache=True, **options)(function)
    except RuntimeError:  # no locator could write: numba's user-wide one looks at config.CACHE_DIR when asked
        pass
    if not numba.config.CACHE_DIR:
        numba.config.CACHE_DIR = os.path.join(tempfile.gettempdir(), "numba-cache")
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError:
            pass
    log.info("no writable numba cache: the GQ search compiles in memory in each process")
    return numba.njit(**options)(function)


_box_bound = _compile(_box_bound, inline="always")
_search = _compile(_search)
