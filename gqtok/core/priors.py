"""Token priors for entropy coding: the probability of each token id, in numpy (no torch).

Three priors, all over the K ids of one model:

- uniform:   every id 1/K, so log2 K bits per token. Needs no file; the baseline.
- frequency: per-slot id counts over the training set's token grids (`prior_frequency.npz`).
- context:   a small causal model over already-decoded neighbours (`prior_context.npz`). An MLP
             reads the codewords at six neighbouring positions. A token is coded in two parts: its cell
             (the codebook split into P ~ sqrt(K) cells of M = K / P neighbouring codewords), with the
             MLP's softmax over cells; then its index in the cell, where member k gets
             log p(k | cell) = bias[t, k] + log N(codeword_k; m_t, s_t^2) + const,
             a diagonal Gaussian the MLP predicts, discretized on the cell's codewords (the GQ score of
             gqtok/core/select.py with beta = 0), plus a learned per-id bias. P + M probabilities per
             token instead of K. It runs in fixed point (ContextPrior), so it gives the same bits everywhere.

- pc:        a probabilistic circuit (gqtok/core/circuit.py, a hidden Chow-Liu tree) over windows of the grid
             (`prior_pc.npz`): each token is a few base-16 digits of its rank in a stored order of the codebook,
             a window's digits are coded in the tree's order, and windows that overhang the grid's edge
             marginalize the missing tokens exactly. Integer arithmetic throughout.

Decoding order for the context prior is a wavefront: position (r, c) is step 2r + c. Every
neighbour in NEIGHBOURS lies on an earlier step, so all positions of one step are coded together
(2h + w - 2 steps per grid instead of h * w). training/priors.py fits both files.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from gqtok.core import layout

# the byte each bitstream header carries (3 is the dvae codec's hyperprior, gqtok/core/bitstream.py)
PRIOR_IDS = {"uniform": 0, "frequency": 1, "context": 2, "pc": 4}
PRIOR_FILES = {"frequency": "prior_frequency.npz", "context": "prior_context.npz", "pc": "prior_pc.npz"}
NEIGHBOURS = ((0, -1), (0, -2), (-1, -1), (-1, 0), (-1, 1), (-2, 0))  # (dy, dx): left, left 2, up-left, up, up-right, up 2
LOG_SCALE_RANGE = (-5.0, 3.0)  # clamp of the predicted log s, as in training


class UniformPrior:
    name = "uniform"
    digest = bytes(8)

    def __init__(self, num_codes: int):
        self.num_codes = num_codes


class FrequencyPrior:
    """counts: int [T, K], how often each id appeared in each token slot (plus one, so none is zero)."""

    name = "frequency"

    def __init__(self, counts: np.ndarray, digest: bytes):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.num_codes = self.counts.shape[1]
        self.digest = digest

    def probabilities(self) -> np.ndarray:
        """float64 [T, K]."""
        return self.counts / self.counts.sum(axis=1, keepdims=True)


def context_param_shapes(channels: int, tokens_per_position: int, num_codes: int, hidden: int,
                         cells: int) -> dict[str, tuple]:
    """The context model's float parameters, name -> shape: the one layout that fitting (torch) and coding
    (numpy, after fixed-point rounding) share, and that prior_context.npz stores. w1..w3 and w_cell are
    [in, out] (x @ w + b)."""
    inputs = len(NEIGHBOURS) * (channels + 1)
    return {"w1": (inputs, hidden), "b1": (hidden,), "w2": (hidden, hidden), "b2": (hidden,),
            "w3": (hidden, 2 * channels), "b3": (2 * channels,),
            "w_cell": (hidden, tokens_per_position * cells), "b_cell": (tokens_per_position * cells,),
            "bias": (tokens_per_position, num_codes)}


def cell_count(num_codes: int) -> int:
    """How many cells the context prior splits the codebook into: about sqrt(K), a power of two, so that the
    cell's pmf and the member's pmf cost about the same."""
    cells = 1 << (max(num_codes.bit_length() - 1, 0) + 1) // 2
    if num_codes % cells:
        raise ValueError(f"the context prior needs a codebook size divisible by {cells}; K = {num_codes}")
    return cells


def context_heads(features, w: dict, channels: int, token_dim: int, xp=np):
    """The float context model (fitting runs it in torch, xp=torch): [n, F] neighbour features ->
    mean [n * T, d], log s [n * T, d] of the Gaussian over each token's codeword, and the cells' logits [n * T, P]
    (nats), rows position-major, slot-minor."""
    h = (features @ w["w1"] + w["b1"]).clip(0)
    h = (h @ w["w2"] + w["b2"]).clip(0)
    out = h @ w["w3"] + w["b3"]
    mean, log_s = _tokens(out[:, :channels], token_dim), _tokens(out[:, channels:].clip(*LOG_SCALE_RANGE), token_dim)
    cell_logits = h @ w["w_cell"] + w["b_cell"]
    return mean, log_s, cell_logits.reshape(mean.shape[0], -1)


def _tokens(x, token_dim: int):
    """[n, C] per-position channels -> [n * T, d] per token (the strided layout of gqtok/core/layout.py)."""
    return layout.group(x.reshape(x.shape[0], x.shape[1], 1, 1), token_dim).reshape(-1, token_dim)


# The context prior codes in fixed point: every number it computes is an integer, so the probabilities are the
# same bits on any CPU, BLAS kernel, thread count and OS. Products run as float64 matrix products on
# integer-valued operands; load_priors checks that no partial sum can reach 2^53, below which float64 adds and
# multiplies integers exactly in any order (so BLAS blocking, FMA and threads cannot change a result).
ACT_BITS = 8  # neighbour latents, hidden activations and predicted means: round(value * 2^8)
WEIGHT_BITS = 12  # MLP weights round(w * 2^12); biases at the accumulator's scale 2^(ACT_BITS + WEIGHT_BITS)
SCORE_BITS = 26  # the Gaussian score and the per-id bias: nats * 2^26
LOGIT_BITS = 6  # logits are floored to 1/64 nat before the exp table
EXP_TABLE_BITS = 20  # exp_table[i] = round(2^20 * e^(-i / 64)), at least 1
MEAN_LIMIT = 8  # predicted means clipped to +-8 (the codebook is N(0, 1))
EXACT = 2.0**53


def context_tables() -> dict[str, np.ndarray]:
    """The two integer tables of the fixed-point prior. They are computed once, when a prior is fitted, and
    stored in its file: decoding reads them and never evaluates exp itself.

    inv_var[i]: 2^SCORE_BITS / (2 s^2) in units of the quantized latent, for log s = -5 + i / 2^ACT_BITS;
    exp[i]:     round(2^EXP_TABLE_BITS * e^(-i / 2^LOGIT_BITS)), floored at 1, for i up to 16 nats."""
    lo, hi = LOG_SCALE_RANGE
    log_s = lo + np.arange(int((hi - lo) * 2**ACT_BITS) + 1) / 2**ACT_BITS
    inv_var = np.rint(2.0 ** (SCORE_BITS - 2 * ACT_BITS - 1) * np.exp(-2.0 * log_s))
    exp = np.maximum(1.0, np.rint(2.0**EXP_TABLE_BITS * np.exp(-np.arange(16 << LOGIT_BITS) / 2**LOGIT_BITS)))
    return {"inv_var_table": inv_var.astype(np.int64), "exp_table": exp.astype(np.int64)}


def _fixed(x, bits: int) -> np.ndarray:
    """round(x * 2^bits) as float64: exact (scaling by a power of two, then round-half-even)."""
    return np.rint(np.asarray(x, dtype=np.float64) * 2.0**bits)


def _floor_shift(x: np.ndarray, bits: int) -> np.ndarray:
    """floor(x / 2^bits) of integer-valued float64: exact."""
    return np.floor(x * 2.0**-bits)


def _bound(x_max: float, w: np.ndarray, b: np.ndarray) -> float:
    """Largest |x @ w + b| (or partial sum) for |x| <= x_max."""
    return float(x_max * np.abs(w).sum(axis=0).max() + np.abs(b).max())


class ContextPrior:
    """The causal context model, in fixed point. A token is coded in two parts: its cell (one of P groups of
    the codebook, P about sqrt(K)), then its index among the cell's M = K / P members.

    - The MLP reads the quantized codewords at six decoded neighbours and gives the cells' logits and a
      diagonal Gaussian N(m, s^2) over the token's codeword.
    - A member k of the cell has logit bias[t, k] - sum_j (c_kj - m_j)^2 / (2 s_j^2): the GQ score with beta = 0.
    - Logits (floored to 1/64 nat, relative to their row's maximum) index exp_table: integer frequencies,
      which constriction's categorical model normalizes.
    Per token that is P + M frequencies instead of K. arrays: the float weights of context_param_shapes,
    cells [P, M] (a partition of the ids), inv_var_table and exp_table (context_tables)."""

    name = "context"

    def __init__(self, arrays: dict[str, np.ndarray], codebook: np.ndarray, token_dim: int, digest: bytes):
        arrays = dict(arrays)
        missing = {"cells", "inv_var_table", "exp_table"} - set(arrays)
        if missing:
            raise ValueError(f"context prior file lacks {', '.join(sorted(missing))}: it was fitted by an older "
                             "gqtok (float context prior); refit it with `gqtok priors fit`")
        self.cells = np.asarray(arrays.pop("cells"), dtype=np.int64)
        self.inv_var_table = np.asarray(arrays.pop("inv_var_table"), dtype=np.int64).astype(np.float64)
        self.exp_table = np.asarray(arrays.pop("exp_table"), dtype=np.int64).astype(np.float64)
        self.codebook = np.asarray(codebook, dtype=np.float32)
        self.num_codes, self.token_dim = self.codebook.shape[0], token_dim
        self.channels = arrays["w3"].shape[1] // 2
        self.tokens_per_position = layout.tokens_per_position(self.channels, token_dim)
        num_cells, members = self.cells.shape
        expected = context_param_shapes(self.channels, self.tokens_per_position, self.num_codes,
                                        arrays["w1"].shape[1], num_cells)
        if {k: tuple(v.shape) for k, v in arrays.items()} != expected or num_cells * members != self.num_codes:
            raise ValueError(f"context prior weights do not fit a model with C={self.channels}, "
                             f"T={self.tokens_per_position}, K={self.num_codes}")
        if not np.array_equal(np.sort(self.cells, axis=None), np.arange(self.num_codes)):
            raise ValueError("context prior cells are not a partition of the codebook's ids")
        self.cell_of, self.index_in_cell = cell_index(self.cells)

        # Fixed point: weights at 2^WEIGHT_BITS, biases at the accumulator's scale.
        acc = ACT_BITS + WEIGHT_BITS
        self.q = {k: _fixed(arrays[k], WEIGHT_BITS if k.startswith("w") else acc)
                  for k in ("w1", "b1", "w2", "b2", "w3", "b3", "w_cell", "b_cell")}
        self.code_q = _fixed(self.codebook, ACT_BITS)  # [K, d]
        self.bias_cells = _fixed(arrays["bias"], SCORE_BITS)[:, self.cells]  # [T, P, M]
        feats = np.concatenate([self.code_q**2, self.code_q], axis=1)  # [K, 2d]: [c^2, c] against [-A, 2 A m]
        self.member_features = np.ascontiguousarray(feats[self.cells])  # [P, M, 2d]
        self.digest = digest
        self._check_exact()

    def _check_exact(self) -> None:
        """Every partial sum stays below 2^53 for any input, so every product is exact (see above)."""
        q, one = self.q, 2.0**ACT_BITS
        x = max(float(np.abs(self.code_q).max()), one)
        b1 = _bound(x, q["w1"], q["b1"])
        h1 = b1 / 2**WEIGHT_BITS
        b2 = _bound(h1, q["w2"], q["b2"])
        h2 = b2 / 2**WEIGHT_BITS
        b3, bc = _bound(h2, q["w3"], q["b3"]), _bound(h2, q["w_cell"], q["b_cell"])
        mean = MEAN_LIMIT * one
        score = self.token_dim * self.inv_var_table.max() * (x * x + 2 * mean * x) + np.abs(self.bias_cells).max()
        worst = max(b1, b2, b3, bc, score)
        if worst >= EXACT:
            raise ValueError(f"context prior cannot compute exactly: a sum may reach {worst:.3g} >= 2^53 "
                             "(weights too large for its fixed-point format)")

    def latent_of(self, ids: np.ndarray) -> np.ndarray:
        """int [n, T] token ids of n positions -> float64 [n, C], their quantized latents (integers)."""
        return latent_of(self.code_q, ids)

    def features(self, latent_q: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """neighbour_features of quantized latents [C, h, w], at the fixed-point scale heads reads."""
        return neighbour_features(latent_q, rows, cols, one=2.0**ACT_BITS)

    def heads(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Integer neighbour features [n, F] (features) ->
        (cell frequencies [n * T, P], the Gaussian's coefficients [n * T, 2d] for member_frequencies)."""
        q, shift = self.q, WEIGHT_BITS
        h = np.maximum(_floor_shift(features @ q["w1"] + q["b1"], shift), 0)
        h = np.maximum(_floor_shift(h @ q["w2"] + q["b2"], shift), 0)
        out = _floor_shift(h @ q["w3"] + q["b3"], shift)  # at 2^ACT_BITS
        c, lo, hi = self.channels, *LOG_SCALE_RANGE
        mean = _tokens(out[:, :c].clip(-MEAN_LIMIT * 2**ACT_BITS, MEAN_LIMIT * 2**ACT_BITS), self.token_dim)
        step = _tokens(out[:, c:].clip(lo * 2**ACT_BITS, hi * 2**ACT_BITS), self.token_dim) - lo * 2**ACT_BITS
        inv_var = self.inv_var_table[step.astype(np.int64)]  # A = 2^SCORE_BITS / (2 s^2) per quantized unit
        coef = np.concatenate([-inv_var, 2.0 * inv_var * mean], axis=1)
        cell_logits = _floor_shift(h @ q["w_cell"] + q["b_cell"], ACT_BITS + WEIGHT_BITS - LOGIT_BITS)
        return self._frequencies(cell_logits.reshape(coef.shape[0], -1)), coef

    def member_frequencies(self, coef: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """The members' frequencies [n * T, M] of the given cell of each token (rows as heads gives them)."""
        slots = np.arange(len(cells)) % self.tokens_per_position
        score = np.matmul(self.member_features[cells], coef[:, :, None])[:, :, 0]
        return self._frequencies(_floor_shift(self.bias_cells[slots, cells] + score, SCORE_BITS - LOGIT_BITS))

    def _frequencies(self, logits: np.ndarray) -> np.ndarray:
        """Integer logits (1/64 nat) -> integer frequencies (float64), each row's largest 2^EXP_TABLE_BITS."""
        gap = (logits.max(axis=1, keepdims=True) - logits).clip(max=len(self.exp_table) - 1)
        return self.exp_table[gap.astype(np.int64)]

    def code_lengths(self, ids: np.ndarray) -> np.ndarray:
        """Bits of every token of one grid (int [T, h, w]) under the frequencies the coder uses (before
        constriction's own 24-bit rounding), all positions at once: float64 [h * w * T]."""
        t, h, w = ids.shape
        rows, cols = np.indices((h, w)).reshape(2, -1)
        target = ids[:, rows, cols].T.reshape(-1)
        latent_q = self.latent_of(target.reshape(-1, t)).T.reshape(-1, h, w)
        cell_freq, coef = self.heads(self.features(latent_q, rows, cols))
        cells, index = self.cell_of[target], self.index_in_cell[target]
        member_freq = self.member_frequencies(coef, cells)
        n = np.arange(len(target))
        return (np.log2(cell_freq.sum(1)) - np.log2(cell_freq[n, cells])
                + np.log2(member_freq.sum(1)) - np.log2(member_freq[n, index]))


class CircuitPrior:
    """The pc prior: one HCLT over the windows of wh x ww grid positions, the same circuit for every window.

    A token is too many categories for one variable, so it is split into base-16 digits of its rank in an order
    of the codebook stored with the circuit (`order`; training/priors.py uses the codewords' sign patterns, so a
    digit says the signs of four coordinates). Variables are position-major, then slot, then digit (most
    significant first)."""

    name = "pc"
    base = 16

    def __init__(self, circuit, order: np.ndarray, window: tuple[int, int], tokens_per_position: int, digest: bytes):
        self.circuit, self.window, self.digest = circuit, tuple(int(v) for v in window), digest
        self.order = np.asarray(order, dtype=np.int64).reshape(-1)
        self.rank = np.empty_like(self.order)
        self.rank[self.order] = np.arange(len(self.order))
        self.digits = max(1, int(np.ceil(np.log2(len(self.order)) / np.log2(self.base))))
        self.tokens_per_position = tokens_per_position
        wh, ww = self.window
        if circuit.num_vars != self.digits * tokens_per_position * wh * ww or circuit.num_values != self.base:
            raise ValueError(f"pc prior: a circuit over {circuit.num_vars} variables of {circuit.num_values} values "
                             f"does not fit windows of {wh}x{ww} positions, T={tokens_per_position}, "
                             f"{self.digits} base-{self.base} digits per token")

    def _grid_shape(self, h: int, w: int) -> tuple[int, int]:
        return -(-h // self.window[0]), -(-w // self.window[1])

    def to_variables(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int [T, h, w] -> (variables int [n, D] of the n windows, row-major; present bool [n, D])."""
        t, h, w = ids.shape
        (wh, ww), (nh, nw) = self.window, self._grid_shape(h, w)
        padded = np.zeros((t, nh * wh, nw * ww), dtype=np.int64)
        padded[:, :h, :w] = self.rank[ids]
        present = np.zeros(padded.shape + (self.digits,), dtype=bool)
        present[:, :h, :w] = True
        powers = self.base ** np.arange(self.digits - 1, -1, -1)
        digits = padded[..., None] // powers % self.base  # [T, H, W, digits]

        def windows(a):  # [T, nh*wh, nw*ww, digits] -> [nh*nw, wh*ww*T*digits]
            return a.reshape(t, nh, wh, nw, ww, -1).transpose(1, 3, 2, 4, 0, 5).reshape(nh * nw, -1)

        return windows(digits), windows(present)

    def from_variables(self, x: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
        """The inverse of to_variables: int [n, D] -> int64 [T, h, w]."""
        t, h, w = grid
        (wh, ww), (nh, nw) = self.window, self._grid_shape(h, w)
        digits = x.reshape(nh, nw, wh, ww, t, -1).transpose(4, 0, 2, 1, 3, 5).reshape(t, nh * wh, nw * ww, -1)
        rank = digits @ (self.base ** np.arange(self.digits - 1, -1, -1))
        return self.order[rank.clip(0, len(self.order) - 1)][:, :h, :w]

    def code_lengths(self, ids: np.ndarray) -> np.ndarray:
        """Bits of every token of one grid (int [T, h, w]) under the coder's frequencies, in window order."""
        x, present = self.to_variables(ids)
        bits = self.circuit.code_lengths(x, present).reshape(len(x), -1, self.digits).sum(axis=2)
        return bits[present[:, :: self.digits]]

    def encode(self, ids: np.ndarray) -> np.ndarray:
        x, present = self.to_variables(ids)
        return self.circuit.encode(x, present)

    def decode(self, words: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
        _, present = self.to_variables(np.zeros(grid, dtype=np.int64))
        return self.from_variables(self.circuit.decode(words, len(present), present), grid)


def circuit_prior(data: bytes, tokens_per_position: int, num_codes: int, digest: bytes) -> CircuitPrior:
    """bytes of prior_pc.npz (training/priors.py writes it) -> the pc prior."""
    from gqtok.core.circuit import load_circuit

    circuit, _, extra = load_circuit(data)
    if "order" not in extra or "window" not in extra or not np.array_equal(np.sort(extra["order"]), np.arange(num_codes)):
        raise ValueError(f"{PRIOR_FILES['pc']}: needs an order of the model's {num_codes} ids and a window")
    return CircuitPrior(circuit, extra["order"], tuple(extra["window"]), tokens_per_position, digest)


def cell_index(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int [P, M] cells (a partition of the K ids) -> (cell of each id, its index in the cell), int64 [K] each."""
    cell_of, index_in_cell = np.empty(cells.size, dtype=np.int64), np.empty(cells.size, dtype=np.int64)
    cell_of[cells] = np.arange(cells.shape[0])[:, None]
    index_in_cell[cells] = np.arange(cells.shape[1])[None, :]
    return cell_of, index_in_cell


def latent_of(codebook: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """int [n, T] token ids of n positions -> [n, C], their codewords' latents (strided layout), in the
    codebook's dtype."""
    n, t = ids.shape
    return layout.ungroup(codebook[ids].reshape(n, t, 1, 1, codebook.shape[1])).reshape(n, -1)


def neighbour_features(latent: np.ndarray, rows: np.ndarray, cols: np.ndarray, one: float = 1.0) -> np.ndarray:
    """latent [C, h, w] (decoded positions filled in), positions -> [n, len(NEIGHBOURS) * (C + 1)], latent's dtype.

    Per neighbour: its C latent values and `one` if it lies inside the grid (zeros and 0 outside). Fitting passes
    float latents and one = 1; the fixed-point coder quantized latents and one = 2^ACT_BITS."""
    c, h, w = latent.shape
    parts = []
    for dy, dx in NEIGHBOURS:
        r, q = rows + dy, cols + dx
        inside = (r >= 0) & (r < h) & (q >= 0) & (q < w)
        vals = latent[:, np.clip(r, 0, h - 1), np.clip(q, 0, w - 1)].T * inside[:, None]
        parts += [vals, one * inside[:, None]]
    return np.concatenate(parts, axis=1).astype(latent.dtype)


def wavefront(h: int, w: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The decoding steps of an h x w grid: (rows, cols) of the positions with 2r + c == step, in row order."""
    rows, cols = np.indices((h, w)).reshape(2, -1)
    step = 2 * rows + cols
    order = np.argsort(step, kind="stable")
    bounds = np.searchsorted(step[order], np.arange(step.max() + 2))
    return [(rows[order[a:b]], cols[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]  # w = 1 skips odd steps


# -- files ------------------------------------------------------------------------------------------------------
def save_frequency(path: Path, counts: np.ndarray) -> None:
    np.savez_compressed(path, counts=np.asarray(counts, dtype=np.int64))


def save_context(path: Path, weights: dict[str, np.ndarray], cells: np.ndarray, info: dict) -> None:
    """The float weights, the cells and the integer tables (context_tables); info: how it was trained (JSON)."""
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    arrays |= {"cells": np.asarray(cells, dtype=np.int64)} | context_tables()
    np.savez_compressed(path, info=np.frombuffer(json.dumps(info).encode(), dtype=np.uint8), **arrays)


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_priors(artifact) -> dict:
    """name -> prior for every prior the artifact's manifest lists (uniform always). Files are digest-checked
    by load_artifact; each prior's `digest` (8 bytes of its sha256) goes into the bitstream header."""
    m = artifact.manifest
    priors = {"uniform": UniformPrior(m.num_codes)}
    for name, file in PRIOR_FILES.items():
        if file not in m.files:
            continue
        data = artifact.path(file).read_bytes()
        digest = hashlib.sha256(data).digest()[:8]
        arrays = _load_npz(data)
        if name == "pc":
            priors[name] = circuit_prior(data, m.tokens_per_position, m.num_codes, digest)
        elif name == "frequency":
            if arrays["counts"].shape != (m.tokens_per_position, m.num_codes):
                raise ValueError(f"{file}: counts of shape {arrays['counts'].shape}, model has "
                                 f"[{m.tokens_per_position}, {m.num_codes}]")
            priors[name] = FrequencyPrior(arrays["counts"], digest)
        else:
            arrays.pop("info", None)
            priors[name] = ContextPrior(arrays, artifact.codebook, m.token_dim, digest)
    return priors


def fit_record(artifact) -> dict:
    """What training/priors.py recorded when it fitted the priors (kept in the context prior's file, and the pc
    prior's own record in its file): settings, timings and held-out bits per token of every prior. Empty when the
    model has no fitted priors."""
    record = {}
    for name in ("context", "pc"):
        file = PRIOR_FILES[name]
        if file not in artifact.manifest.files:
            continue
        arrays = _load_npz(artifact.path(file).read_bytes())
        info = json.loads(arrays["info"].tobytes()) if "info" in arrays else {}
        if name == "context":
            record = info
        else:
            record = record | {"pc": info, "heldout_bits_per_token": record.get("heldout_bits_per_token", {})
                               | info.get("heldout_bits_per_token", {})}
    return record
