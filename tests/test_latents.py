"""gqtok/core/latents.py: the discretized-VAE codec's latents coded the same on every machine."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from gqtok.core.latents import (ACT_BITS, FREQ_BITS, FrequencyTables, IntegerSynthesis, LatentCoder,
                                LatentCodingError, scale_levels)


def float_synthesis(layers, z: np.ndarray) -> np.ndarray:
    """The same h_s in float64: the reference the integer one approximates."""
    x = z.astype(np.float64)
    for layer in layers:
        if layer[0] == "relu":
            x = np.maximum(x, 0)
        elif layer[0] == "up":
            x = x.repeat(2, axis=1).repeat(2, axis=2)
        else:
            w, b = layer[1], layer[2]
            k = w.shape[-1]
            padded = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2)))
            win = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(1, 2))
            x = np.einsum("chwij,ocij->ohw", win, w) + b[:, None, None]
    return x


def random_layers(rng, cz=4, width=8, c=6):
    def conv(cin, cout):
        return ("conv", rng.normal(0, 0.3 / math.sqrt(cin), (cout, cin, 3, 3)), rng.normal(0, 0.1, cout))
    return [("up",), conv(cz, width), ("relu",), ("up",), conv(width, width), ("relu",), conv(width, 2 * c)]


@pytest.fixture(scope="module")
def coder() -> tuple[LatentCoder, list]:
    rng = np.random.default_rng(0)
    layers = random_layers(rng)
    tables = FrequencyTables.build(scale_levels(32, 0.11, 64.0))
    z_tables = FrequencyTables.build(np.array([0.5, 1.0, 2.0, 4.0]))
    return LatentCoder(IntegerSynthesis.from_float(layers), tables, z_tables), layers


def test_integer_synthesis_follows_the_float_one(coder):
    latent_coder, layers = coder
    z = np.random.default_rng(1).integers(-6, 7, (4, 3, 5))
    exact = latent_coder.synthesis(z, (12, 20)).astype(np.float64) / 2**ACT_BITS
    assert exact.shape == (12, 12, 20)
    assert np.abs(exact - float_synthesis(layers, z)[:, :12, :20]).max() < 0.05


def test_tables_are_integer_distributions_with_an_escape():
    tables = FrequencyTables.build(scale_levels(16, 0.11, 64.0))
    for i, f in enumerate(tables.freqs):
        r = tables.radius(i)
        assert f.sum() == 2**FREQ_BITS and f.min() >= 1 and len(f) == 2 * r + 2
        assert np.array_equal(f[:r], f[r + 1:2 * r + 1][::-1]) and f[r] == f.max()  # symmetric, peaked at 0
    again = FrequencyTables.from_arrays(tables.arrays("y"), "y")
    assert all(np.array_equal(a, b) for a, b in zip(again.freqs, tables.freqs))


def test_round_trip_is_exact_and_near_the_ideal_rate(coder):
    latent_coder, _ = coder
    rng = np.random.default_rng(2)
    z = rng.integers(-3, 4, (4, 4, 6))
    mean, index = latent_coder.entropy_parameters(z, (16, 24))
    scales = latent_coder.y_tables.levels[index]
    y = mean / 2**ACT_BITS + rng.normal(0, 1, mean.shape) * scales  # latents as the prior expects them
    k, y_hat = latent_coder.symbols(y, z)
    y[0, 0, 0] = y_hat[0, 0, 0] = 5000.25  # far past every table: the escape
    k[0, 0, 0] = round(5000.25 - mean[0, 0, 0] / 2**ACT_BITS)
    y_hat[0, 0, 0] = k[0, 0, 0] + mean[0, 0, 0] / 2**ACT_BITS
    words = latent_coder.encode(z, k)
    z_back, _, y_back = latent_coder.decode(words, z.shape, k.shape)
    assert np.array_equal(z_back, z) and np.array_equal(y_back, y_hat)
    ideal = sum(-math.log2(latent_coder.y_tables.freqs[i][kk + latent_coder.y_tables.radius(i)] / 2**FREQ_BITS)
                for i, kk in zip(index.reshape(-1)[1:], k.reshape(-1)[1:]))
    assert 32 * len(words) < 1.1 * ideal + 16 + 64 * 4 * 24 + 200  # the y bits, z's and the escape aside


def test_side_latents_past_the_exact_range_are_refused(coder):
    latent_coder, _ = coder
    with pytest.raises(LatentCodingError, match="2\\^53"):
        latent_coder.entropy_parameters(np.full((4, 2, 2), 2**40), (8, 8))


SCRIPT = """
import hashlib, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_latents import build
coder = build()
data = np.load(sys.argv[1])
words = coder.encode(data["z"], data["k"])
z, _, y_hat = coder.decode(data["words"], data["z"].shape, data["k"].shape)
print(hashlib.sha256(words.tobytes()).hexdigest(), hashlib.sha256(y_hat.tobytes()).hexdigest())
"""


def build() -> LatentCoder:
    """A coder of realistic width (64 channels, as the codec's hyperprior), rebuilt the same in a subprocess."""
    rng = np.random.default_rng(7)
    return LatentCoder(IntegerSynthesis.from_float(random_layers(rng, cz=32, width=64, c=16)),
                       FrequencyTables.build(scale_levels(64, 0.11, 64.0)),
                       FrequencyTables.build(np.full(32, 1.5)))


def test_same_words_and_latents_under_every_blas_kernel_thread_count_and_simd_setting(tmp_path):
    from pathlib import Path

    from conftest import run_under_each_env

    coder = build()
    rng = np.random.default_rng(3)
    z = rng.integers(-4, 5, (32, 6, 8))
    mean, index = coder.entropy_parameters(z, (24, 32))
    y = mean / 2**ACT_BITS + rng.normal(0, 1, mean.shape) * coder.y_tables.levels[index]
    k, y_hat = coder.symbols(y, z)
    words = coder.encode(z, k)
    np.savez(tmp_path / "latents.npz", z=z, k=k, words=words)
    script = tmp_path / "latents_hashes.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    want = [hashlib.sha256(words.tobytes()).hexdigest(), hashlib.sha256(y_hat.tobytes()).hexdigest()]
    outputs = run_under_each_env(script, tmp_path / "latents.npz")
    assert all(out == want for out in outputs), (want, outputs)
