"""A probabilistic circuit as a lossless coder: a hidden Chow-Liu tree (HCLT) in fixed point, in numpy (no torch).

The model over D discrete variables X_1..X_D (each with V values): every X_i has a hidden state Z_i (H values);
the Z's form a tree (learned from the data's pairwise mutual information, the Chow-Liu tree), and

    p(x) = sum_z  root[z_r] * prod_{i != r} T_i[z_parent(i), z_i] * prod_i E_i[z_i, x_i].

As a circuit this is a sum node per hidden state and a product node per tree node; its marginals over any subset
of the X's are exact (a marginalized X_i contributes sum_v E_i[z, v]).

Coding needs, for each variable in turn, p(X_k = v | x_1..x_{k-1}) for every v. The coder visits the variables in
the tree's preorder (a parent before its children, one child's subtree after another). In that order the
conditional needs only the belief over the parent's hidden state given what is decoded so far:

    prior_k = belief_parent @ T_k                 P(Z_k | decoded)
    freq_k  = prior_k @ E_k                       P(X_k = v | decoded), for every v
    belief_k = prior_k * E_k[:, x_k]              after x_k
    when the subtree under a child c of p is done:  belief_p *= up_c @ T_c.T,  up_p *= up_c @ T_c.T
    (up_c: P(the subtree's values | Z_c), built as the subtree completes)

so a variable costs O(H^2 + H V) whatever the tree's depth: the "reuse the work of the previous variables" of
the PC-coding paper (Liu, Mandt and Van den Broeck, ICLR 2022), which for a tree needs no path walk at all.

Everything here is integer arithmetic, so encoder and decoder compute the same frequencies on any machine: the
parameters are stored as integers (quantize), every vector is renormalized to [2^(B-1), 2^B) by a power of two
(exact), and the products are float64 matrix products on integers whose partial sums stay below 2^53 (checked at
load), which no BLAS blocking, FMA or thread count can change. Many independent samples (the windows of a token
grid, the digits of a test set) run in lockstep, one numpy call per tree node for all of them.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

BELIEF_BITS = 20  # beliefs and upward messages renormalized to [2^19, 2^20)
PARAM_BITS = 20  # each row of the root prior, the transitions and the emissions sums to about 2^20; entries >= 1
EXACT = 2.0**53


def quantize(probabilities: np.ndarray) -> np.ndarray:
    """Rows of probabilities (any shape [..., n]) -> int64 frequencies, each row summing to about 2^PARAM_BITS and
    every entry at least 1 (so no value and no hidden state is ever impossible)."""
    p = np.asarray(probabilities, dtype=np.float64)
    p = p / p.sum(axis=-1, keepdims=True)
    return np.maximum(1, np.rint(p * 2.0**PARAM_BITS)).astype(np.int64)


def _renormalize(x: np.ndarray) -> np.ndarray:
    """Scale every row of a non-negative integer-valued float64 array [n, H] by a power of two (floor) so its
    maximum lies in [2^(B-1), 2^B). frexp and scaling by 2^k are exact, so this is the same on any machine."""
    _, exponent = np.frexp(x.max(axis=1, keepdims=True))  # max = m * 2^e, m in [0.5, 1)
    return np.floor(np.ldexp(x, BELIEF_BITS - exponent))


@dataclass
class Tree:
    """The structure: parent[i] of every variable (-1 at the root) and the preorder the coder visits them in."""

    parent: np.ndarray  # int [D]

    def __post_init__(self):
        self.parent = np.asarray(self.parent, dtype=np.int64)
        roots = np.flatnonzero(self.parent < 0)
        if len(roots) != 1:
            raise ValueError(f"a tree has one root; this one has {len(roots)}")
        self.root = int(roots[0])
        children: list[list[int]] = [[] for _ in self.parent]
        for i, p in enumerate(self.parent):
            if p >= 0:
                children[p].append(i)
        order, stack = [], [self.root]
        while stack:  # iterative preorder: children in index order
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(children[node]))
        if len(order) != len(self.parent):
            raise ValueError("parent array is not a tree (a cycle or a node unreachable from the root)")
        self.order = np.array(order, dtype=np.int64)
        # finished[j]: the nodes whose subtree ends at preorder position j, deepest first (post-order)
        last = {}
        for node in reversed(order):
            last[node] = max([last[c] for c in children[node]], default=order.index(node))
        by_end: list[list[int]] = [[] for _ in order]
        for node in reversed(order):  # reverse preorder puts children before parents, so deepest first
            by_end[last[node]].append(node)
        self.finished = by_end


class HCLT:
    """A fixed-point HCLT. parent: int [D]; root: int [H]; transition: int [D, H, H] (row = parent's state; the
    root's entry unused); emission: int [D, H, V]. All from quantize."""

    def __init__(self, parent, root, transition, emission):
        self.tree = Tree(parent)
        self.root = np.asarray(root, dtype=np.int64).astype(np.float64)
        self.transition = np.asarray(transition, dtype=np.int64).astype(np.float64)
        self.emission = np.asarray(emission, dtype=np.int64).astype(np.float64)
        d, h, v = self.emission.shape
        if self.transition.shape != (d, h, h) or self.root.shape != (h,) or len(self.tree.parent) != d:
            raise ValueError(f"HCLT shapes disagree: parent {self.tree.parent.shape}, root {self.root.shape}, "
                             f"transition {self.transition.shape}, emission {self.emission.shape}")
        if min(self.root.min(), self.transition.min(), self.emission.min()) < 1:
            raise ValueError("HCLT frequencies must all be >= 1")
        self.num_vars, self.hidden, self.num_values = d, h, v
        self.marginal = self.emission.sum(axis=2)  # [D, H]: a variable that is not there (exact marginalization)
        self.transition_t = np.ascontiguousarray(self.transition.transpose(0, 2, 1))
        worst = 2.0**BELIEF_BITS * h * max(self.transition.sum(axis=2).max(), self.emission.sum(axis=2).max())
        if max(worst, 4.0**BELIEF_BITS) >= EXACT:
            raise ValueError(f"HCLT cannot compute exactly: a sum may reach {worst:.3g} >= 2^53")

    def run(self, n: int, code, present: np.ndarray | None = None) -> None:
        """Visit the variables of n samples in preorder. code(node, freq, rows) gets the integer frequencies
        (float64 [len(rows), V], every entry >= 1) of variable `node` for the samples `rows` that have it, and
        returns their values (the encoder: the known values, after coding them; the decoder: what it decoded).
        present: bool [n, D], which variables each sample has (default all); the rest are marginalized."""
        belief, up = {}, {}
        parent = self.tree.parent
        for j, node in enumerate(self.tree.order):
            p = parent[node]
            prior = _renormalize(np.broadcast_to(self.root, (n, self.hidden)) if p < 0
                                 else belief[p] @ self.transition[node])
            rows = np.arange(n) if present is None else np.flatnonzero(present[:, node])
            factor = np.broadcast_to(self.marginal[node], (n, self.hidden)).copy()
            if len(rows):
                values = np.asarray(code(int(node), prior[rows] @ self.emission[node], rows), dtype=np.int64)
                factor[rows] = self.emission[node][:, values].T
            belief[node] = _renormalize(prior * factor)
            up[node] = _renormalize(factor)
            for done in self.tree.finished[j]:  # fold each completed subtree into its parent
                q = parent[done]
                if q >= 0:
                    message = _renormalize(up[done] @ self.transition_t[done])
                    belief[q] = _renormalize(belief[q] * message)
                    up[q] = _renormalize(up[q] * message)
                del belief[done], up[done]

    def code_lengths(self, x: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
        """Bits of every variable of samples x (int [n, D]) under the frequencies the coder uses (before the range
        coder's own rounding): float64 [n, D], 0 where a variable is absent."""
        bits = np.zeros(x.shape, dtype=np.float64)

        def measure(node, freq, rows):
            values = x[rows, node]
            bits[rows, node] = np.log2(freq.sum(axis=1)) - np.log2(freq[np.arange(len(rows)), values])
            return values

        self.run(len(x), measure, present)
        return bits

    def encode(self, x: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
        """int [n, D] -> uint32 words of constriction's range coder."""
        import constriction

        enc = constriction.stream.queue.RangeEncoder()
        categorical = constriction.stream.model.Categorical(perfect=False)
        x = np.asarray(x, dtype=np.int64)
        if x.shape[1] != self.num_vars or x.min(initial=0) < 0 or x.max(initial=0) >= self.num_values:
            raise ValueError(f"samples must be int [n, {self.num_vars}] in [0, {self.num_values})")

        def code(node, freq, rows):
            enc.encode(x[rows, node].astype(np.int32), categorical, freq)
            return x[rows, node]

        self.run(len(x), code, present)
        return enc.get_compressed()

    def decode(self, words: np.ndarray, n: int, present: np.ndarray | None = None) -> np.ndarray:
        """The inverse of encode -> int64 [n, D] (0 where a variable is absent)."""
        import constriction

        dec = constriction.stream.queue.RangeDecoder(np.asarray(words, dtype=np.uint32))
        categorical = constriction.stream.model.Categorical(perfect=False)
        x = np.zeros((n, self.num_vars), dtype=np.int64)

        def code(node, freq, rows):
            x[rows, node] = dec.decode(categorical, freq)
            return x[rows, node]

        self.run(n, code, present)
        return x

    # -- file -------------------------------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        return {"parent": self.tree.parent, "root": self.root.astype(np.int64),
                "transition": self.transition.astype(np.int64), "emission": self.emission.astype(np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "HCLT":
        missing = {"parent", "root", "transition", "emission"} - set(arrays)
        if missing:
            raise ValueError(f"circuit file lacks {', '.join(sorted(missing))}")
        return cls(arrays["parent"], arrays["root"], arrays["transition"], arrays["emission"])


def save_circuit(path, circuit: HCLT, info: dict, **extra: np.ndarray) -> None:
    """The integer parameters, anything the user of the circuit needs beside them (extra), and how it was learned
    (info, JSON). Written without zip time stamps' influence on content: np.savez of fixed arrays."""
    np.savez_compressed(path, info=np.frombuffer(json.dumps(info).encode(), dtype=np.uint8), **circuit.arrays(), **extra)


def load_circuit(data: bytes) -> tuple[HCLT, dict, dict[str, np.ndarray]]:
    """bytes of save_circuit's file -> (circuit, info, the extra arrays)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    info = json.loads(arrays.pop("info").tobytes()) if "info" in arrays else {}
    circuit = HCLT.from_arrays(arrays)
    extra = {k: v for k, v in arrays.items() if k not in circuit.arrays()}
    return circuit, info, extra
