"""Token priors for entropy coding: the probability of each token id, in numpy (no torch).

Three priors, all over the K ids of one model:

- uniform:   every id 1/K, so log2 K bits per token. Needs no file; the baseline.
- frequency: per-slot id counts over the training set's token grids (`prior_frequency.npz`).
- context:   a small causal model over already-decoded neighbours (`prior_context.npz`). An MLP
             reads the codewords at six neighbouring positions and predicts a diagonal Gaussian
             N(m, s^2) over the next position's latent; token k of that position gets
             log p(k) = bias[t, k] + log N(codeword_k; m_t, s_t^2) + const,
             the Gaussian discretized on the codebook, plus a learned per-id bias (it starts at the
             log-frequencies). The Gaussian term is the GQ score of gqtok/core/select.py with beta = 0, so it
             costs one [n, 2d] x [2d, K] product per batch of positions.

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
from gqtok.core.select import codeword_features, token_features

PRIOR_IDS = {"uniform": 0, "frequency": 1, "context": 2}  # the byte each bitstream header carries
PRIOR_FILES = {"frequency": "prior_frequency.npz", "context": "prior_context.npz"}
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


def context_param_shapes(channels: int, tokens_per_position: int, num_codes: int, hidden: int) -> dict[str, tuple]:
    """The context model's parameters, name -> shape: the one layout that fitting (torch) and coding (numpy)
    share, and that prior_context.npz stores. w1..w3 are [in, out] (x @ w + b)."""
    inputs = len(NEIGHBOURS) * (channels + 1)
    return {"w1": (inputs, hidden), "b1": (hidden,), "w2": (hidden, hidden), "b2": (hidden,),
            "w3": (hidden, 2 * channels), "b3": (2 * channels,), "bias": (tokens_per_position, num_codes)}


def context_logits(features, w: dict, code_t, channels: int, token_dim: int, xp=np):
    """The context model, written once for numpy (coding) and torch (fitting, xp=torch).

    features [n, F] -> logits [n, T, K]: an MLP predicts a diagonal Gaussian N(m, s^2) over the next position's
    latent, scored on every codeword (code_t [2d, K] = codeword_features(codebook).T), plus a per-id bias."""
    h = (features @ w["w1"] + w["b1"]).clip(0)
    h = (h @ w["w2"] + w["b2"]).clip(0)
    out = h @ w["w3"] + w["b3"]
    n, c, d = out.shape[0], channels, token_dim
    mean = layout.group(out[:, :c].reshape(n, c, 1, 1), d).reshape(-1, d)
    log_s = layout.group(out[:, c:].clip(*LOG_SCALE_RANGE).reshape(n, c, 1, 1), d).reshape(-1, d)
    # 0.5 * [-1/s^2, 2m/s^2] . [c^2, c] = log N(c; m, s^2) + terms without c: the GQ score with beta = 0
    gauss = 0.5 * (token_features(mean, 2.0 * log_s, beta=0.0, xp=xp) @ code_t)
    return gauss.reshape(n, -1, code_t.shape[1]) + w["bias"]


class ContextPrior:
    """The causal context model. weights: w1 [F, H], b1, w2 [H, H], b2, w3 [H, 2C], b3, bias [T, K]."""

    name = "context"

    def __init__(self, weights: dict[str, np.ndarray], codebook: np.ndarray, token_dim: int, digest: bytes):
        self.w = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
        self.codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        self.num_codes, self.token_dim = self.codebook.shape[0], token_dim
        self.channels = self.w["w3"].shape[1] // 2
        self.tokens_per_position = layout.tokens_per_position(self.channels, token_dim)
        expected = context_param_shapes(self.channels, self.tokens_per_position, self.num_codes, self.w["w1"].shape[1])
        if {k: tuple(v.shape) for k, v in self.w.items()} != expected:
            raise ValueError(f"context prior weights do not fit a model with C={self.channels}, "
                             f"T={self.tokens_per_position}, K={self.num_codes}")
        self.code_t = np.ascontiguousarray(codeword_features(self.codebook).T)  # [2d, K]
        self.digest = digest

    def latent_of(self, ids: np.ndarray) -> np.ndarray:
        return latent_of(self.codebook, ids)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """float32 [n, F] neighbour features -> float32 [n, T, K] unnormalized log-probabilities."""
        return context_logits(features, self.w, self.code_t, self.channels, self.token_dim)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """float32 [n * T, K], rows in position-major, slot-minor order (unnormalized; the coder rescales)."""
        z = self.logits(features)
        z = z.reshape(-1, z.shape[-1])
        return np.exp(z - z.max(axis=1, keepdims=True))


def latent_of(codebook: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """int [n, T] token ids of n positions -> float32 [n, C], their quantized latents (strided layout)."""
    n, t = ids.shape
    return layout.ungroup(codebook[ids].reshape(n, t, 1, 1, codebook.shape[1])).reshape(n, -1)


def neighbour_features(latent: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """latent float32 [C, h, w] (decoded positions filled in), positions -> float32 [n, len(NEIGHBOURS) * (C + 1)].

    Per neighbour: its C latent values and a 1 if it lies inside the grid (zeros and 0 outside)."""
    c, h, w = latent.shape
    parts = []
    for dy, dx in NEIGHBOURS:
        r, q = rows + dy, cols + dx
        inside = (r >= 0) & (r < h) & (q >= 0) & (q < w)
        vals = latent[:, np.clip(r, 0, h - 1), np.clip(q, 0, w - 1)].T * inside[:, None]
        parts += [vals, inside[:, None]]
    return np.concatenate(parts, axis=1).astype(np.float32)


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


def save_context(path: Path, weights: dict[str, np.ndarray], info: dict) -> None:
    """info: how it was trained (JSON), kept next to the weights."""
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
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
        if name == "frequency":
            if arrays["counts"].shape != (m.tokens_per_position, m.num_codes):
                raise ValueError(f"{file}: counts of shape {arrays['counts'].shape}, model has "
                                 f"[{m.tokens_per_position}, {m.num_codes}]")
            priors[name] = FrequencyPrior(arrays["counts"], digest)
        else:
            arrays.pop("info", None)
            priors[name] = ContextPrior(arrays, artifact.codebook, m.token_dim, digest)
    return priors


def fit_record(artifact) -> dict:
    """What training/priors.py recorded when it fitted the priors (kept in the context prior's file): settings,
    timings and held-out bits per token of every prior. Empty when the model has no fitted priors."""
    file = PRIOR_FILES["context"]
    if file not in artifact.manifest.files:
        return {}
    arrays = _load_npz(artifact.path(file).read_bytes())
    return json.loads(arrays["info"].tobytes()) if "info" in arrays else {}
