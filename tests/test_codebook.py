"""Tests for gqtok.core.codebook: the bit-reproducible Gaussian Quant codebook."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gqtok.core import codebook as cb
from gqtok.core._sobol_table import SOBOL_PARAMS
from gqtok.core.codebook import (
    GENERATOR_NAME,
    GENERATOR_VERSION,
    MAX_DIM,
    codebook_digest,
    make_codebook,
    normal_quantile,
)

# Recorded digests of "sobol-ds-acklam" v1.  These pin the artifact contract:
# if either changes, every stored checkpoint's codebook changes, so that is a
# breaking change and needs a new GENERATOR_VERSION, not an update here.
DIGEST_SEED0_K65536_D16 = "1e19c4ee3be8af335912c639eb565f4eab72cb39f9dda6d8fa6d0ca09a10fba1"
DIGEST_SEED12345_K256_D4 = "1cdede281f3b9448c6961dc633190a89e2cd4aaf425438d7d8004a314b7f9e61"

REPO_ROOT = Path(__file__).resolve().parents[1]


def _gray_to_natural(num_points: int) -> np.ndarray:
    """Row n of a Gray-code-order Sobol generator is natural-order row n ^ (n >> 1)."""
    n = np.arange(num_points)
    return n ^ (n >> 1)


def _scipy_sobol_uint32(num_points: int, dim: int) -> np.ndarray:
    qmc = pytest.importorskip("scipy.stats.qmc")
    points = qmc.Sobol(dim, scramble=False, bits=32).random(num_points)
    return (points * 2.0**32).astype(np.uint64)  # exact: 32-bit dyadics


# ------------------------------------------------------------------ constants


def test_public_constants():
    assert GENERATOR_NAME == "sobol-ds-acklam"
    assert GENERATOR_VERSION == 1
    assert MAX_DIM == 64


def test_direction_table_matches_scipy_bundle():
    scipy_stats = pytest.importorskip("scipy.stats")
    bundle = np.load(Path(scipy_stats.__file__).parent / "_sobol_direction_numbers.npz")
    assert len(SOBOL_PARAMS) == MAX_DIM - 1
    for j, (jk_dim, degree, coeffs, m) in enumerate(SOBOL_PARAMS, start=1):
        assert jk_dim == j + 1
        assert bundle["poly"][j] == (1 << degree) | (coeffs << 1) | 1
        assert tuple(bundle["vinit"][j, :degree]) == m


# ------------------------------------------------------------------ step 1: Sobol


def test_sobol_matches_scipy_d16():
    ours = cb._sobol_uint32(2**10, 16).astype(np.uint64)
    theirs = _scipy_sobol_uint32(2**10, 16)
    # As sets (order-free) ...
    assert np.array_equal(np.unique(ours, axis=0), np.unique(theirs, axis=0))
    # ... and exactly, once scipy's Gray-code order is mapped to natural order.
    assert np.array_equal(ours[_gray_to_natural(2**10)], theirs)


def test_sobol_matches_scipy_all_64_dims():
    ours = cb._sobol_uint32(2**8, MAX_DIM).astype(np.uint64)
    theirs = _scipy_sobol_uint32(2**8, MAX_DIM)
    assert np.array_equal(np.unique(ours, axis=0), np.unique(theirs, axis=0))
    assert np.array_equal(ours[_gray_to_natural(2**8)], theirs)


def test_sobol_natural_order_definition():
    # s_j(i) = xor of V_j[b] over set bits b of i, checked by brute force for a
    # few indices, including ones above the 2**16 block size.
    directions = cb._direction_integers(8)
    sobol = cb._sobol_uint32(2**17 + 5, 8)
    for i in (0, 1, 2, 3, 12345, 2**16, 2**16 + 777, 2**17 + 4):
        expected = np.zeros(8, dtype=np.uint32)
        for b in range(32):
            if (i >> b) & 1:
                expected ^= directions[:, b]
        assert np.array_equal(sobol[i], expected), i


# ------------------------------------------------------------------ step 2: shift


def test_splitmix64_reference_vector():
    # Published SplitMix64 outputs for seed 0.
    assert cb._splitmix64(0, 3) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert list(cb._digital_shift(0, 2)) == [0xE220A839, 0x6E789E6A]


# ------------------------------------------------------------------ step 4: log, quantile


def _ulp_error(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.abs(got - ref) / np.spacing(np.abs(ref))


def test_log_matches_numpy_within_2_ulp():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            np.exp(rng.uniform(math.log(1e-300), math.log(1e300), 200_000)),
            1.0 + rng.uniform(-0.3, 0.45, 100_000),
            1.0 + rng.uniform(-1e-7, 1e-7, 100_000),
            np.array([1e-300, 1e300, 0.5, 2.0, math.sqrt(0.5), math.sqrt(2.0), np.nextafter(1.0, 2.0)]),
        ]
    )
    x = x[x != 1.0]
    assert np.max(_ulp_error(cb._log(x), np.log(x))) <= 2.0
    assert cb._log(np.array([1.0]))[0] == 0.0


def test_normal_quantile_matches_ndtri():
    special = pytest.importorskip("scipy.special")
    rng = np.random.default_rng(1)
    lower = np.exp(rng.uniform(math.log(1e-12), math.log(0.5), 200_000))
    u = np.concatenate([lower, 1.0 - lower, rng.uniform(1e-12, 1 - 1e-12, 200_000), [0.02425, 0.5 + 1e-9]])
    ref = special.ndtri(u)
    rel = np.abs(normal_quantile(u) - ref) / np.abs(ref)
    assert np.max(rel) < 2e-9


def test_normal_quantile_is_antisymmetric():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 2**32, 100_000, dtype=np.uint64)
    u = cb._uniform_open(x)  # dyadic, so 1 - u is exact
    assert np.array_equal(normal_quantile(1.0 - u), -normal_quantile(u))


def test_normal_quantile_rejects_closed_interval():
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            normal_quantile(np.array([0.3, bad]))


# ------------------------------------------------------------------ reference implementation


def _reference_value(seed: int, i: int, j: int) -> float:
    """Scalar pure-Python transcription of the module docstring's spec."""
    if j == 0:
        v = [1 << (31 - k) for k in range(32)]
    else:
        _, s, a, m = SOBOL_PARAMS[j - 1]
        v = [m[k] << (31 - k) for k in range(s)]
        for k in range(s, 32):
            vk = v[k - s] ^ (v[k - s] >> s)
            for l in range(1, s):
                vk ^= ((a >> (s - 1 - l)) & 1) * v[k - l]
            v.append(vk)
    x = 0
    for b in range(32):
        if (i >> b) & 1:
            x ^= v[b]
    state = seed
    for _ in range(j + 1):
        state = (state + 0x9E3779B97F4A7C15) % 2**64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        z ^= z >> 31
    x ^= z >> 32
    u = (x + 0.5) * 2.0**-32

    def log(t: float) -> float:
        mant, e = math.frexp(t)
        if mant < float.fromhex("0x1.6a09e667f3bcdp-1"):
            mant, e = mant * 2.0, e - 1
        f = mant - 1.0
        s_ = f / (2.0 + f)
        w = s_ * s_
        r = 1.0 / 23
        for k in range(10, 0, -1):
            r = r * w + 1.0 / (2 * k + 1)
        r = r * w
        log_m = f - s_ * (f - 2.0 * r)
        return e * float.fromhex("0x1.62e42feep-1") + (log_m + e * float.fromhex("0x1.a39ef35793c76p-33"))

    def horner(coefficients, t):
        acc = coefficients[0]
        for c in coefficients[1:]:
            acc = acc * t + c
        return acc

    t = u if u < 0.5 else 1.0 - u
    if t >= 0.02425:
        q = u - 0.5
        r = q * q
        value = horner(cb._ACKLAM_A, r) * q / (horner(cb._ACKLAM_B, r) * r + 1.0)
    else:
        q = math.sqrt(-2.0 * log(t))
        value = horner(cb._ACKLAM_C, q) / (horner(cb._ACKLAM_D, q) * q + 1.0)
        value = value if u < 0.5 else -value
    return struct.unpack("<f", struct.pack("<f", value))[0]  # round to float32


def test_matches_scalar_reference_implementation():
    seed = 987654321
    codebook = make_codebook(seed, 2**17 + 3, 5)
    rng = np.random.default_rng(3)
    rows = [0, 1, 2, 2**16, 2**17 + 2] + list(rng.integers(0, 2**17 + 3, 40))
    for i in rows:
        for j in range(5):
            assert codebook[i, j] == _reference_value(seed, int(i), j), (i, j)
    # The tail branch (|z| > 2 means u < p_low or u > 1 - p_low) in all 64 dims.
    big = make_codebook(7, 2**12, MAX_DIM)
    tails = np.argwhere(np.abs(big) > 2.0)[:50]
    for i, j in tails:
        assert big[i, j] == _reference_value(7, int(i), int(j))


# ------------------------------------------------------------------ reproducibility


def test_recorded_digests():
    assert codebook_digest(make_codebook(0, 2**16, 16)) == DIGEST_SEED0_K65536_D16
    assert codebook_digest(make_codebook(12345, 2**8, 4)) == DIGEST_SEED12345_K256_D4


def test_same_bytes_in_separate_processes():
    code = (
        "from gqtok.core.codebook import make_codebook, codebook_digest;"
        "print(codebook_digest(make_codebook(0, 2**16, 16)))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    digests = [
        subprocess.run(
            [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    ]
    assert digests[0] == digests[1] == DIGEST_SEED0_K65536_D16


def test_chunk_size_does_not_change_bytes(monkeypatch):
    expected = make_codebook(5, 1000, 7)
    monkeypatch.setattr(cb, "_CHUNK_BITS", 4)
    assert np.array_equal(make_codebook(5, 1000, 7).view(np.uint32), expected.view(np.uint32))


def test_output_layout():
    codebook = make_codebook(1, 100, 3)
    assert codebook.dtype == np.float32 and codebook.shape == (100, 3)
    assert codebook.flags["C_CONTIGUOUS"]
    assert np.all(np.isfinite(codebook))


def test_different_seeds_differ():
    a, b = make_codebook(0, 256, 8), make_codebook(1, 256, 8)
    assert codebook_digest(a) != codebook_digest(b)
    assert not np.any(np.all(a == b, axis=0))  # every column differs


def test_prefix_properties():
    full = make_codebook(3, 2**17, 6)
    half = make_codebook(3, 2**16, 6)
    assert np.array_equal(full[: 2**16], half)
    assert np.array_equal(make_codebook(3, 2**16 + 1, 6), full[: 2**16 + 1])
    assert np.array_equal(make_codebook(3, 2**16, 2), half[:, :2])


def test_single_code():
    one = make_codebook(42, 1, 4)
    assert one.shape == (1, 4)
    assert np.array_equal(one[0], make_codebook(42, 8, 4)[0])


@pytest.mark.parametrize(
    "seed, num_codes, dim",
    [
        (-1, 8, 4),
        (2**64, 8, 4),
        (1.0, 8, 4),
        ("0", 8, 4),
        (True, 8, 4),
        (0, 0, 4),
        (0, -5, 4),
        (0, 2**32 + 1, 4),
        (0, 8.0, 4),
        (0, 8, 0),
        (0, 8, MAX_DIM + 1),
        (0, 8, None),
    ],
)
def test_bad_arguments_raise(seed, num_codes, dim):
    with pytest.raises(ValueError):
        make_codebook(seed, num_codes, dim)


def test_accepts_numpy_integers_and_max_seed():
    a = make_codebook(np.uint64(2**64 - 1), np.int64(16), np.int32(3))
    assert np.array_equal(a, make_codebook(2**64 - 1, 16, 3))


def test_digest_contract():
    codebook = make_codebook(0, 16, 4)
    assert codebook_digest(codebook) == codebook_digest(codebook.astype(">f4"))
    assert codebook_digest(codebook) == codebook_digest(np.asfortranarray(codebook))
    with pytest.raises(ValueError):
        codebook_digest(codebook.astype(np.float64))
    with pytest.raises(ValueError):
        codebook_digest(codebook.reshape(-1))


# ------------------------------------------------------------------ statistics


def test_moments_and_stratification():
    seed, num_codes, dim = 0, 2**16, 16
    codebook = make_codebook(seed, num_codes, dim).astype(np.float64)
    assert np.all(np.abs(codebook.mean(axis=0)) < 0.01)
    assert np.all(np.abs(codebook.std(axis=0) - 1.0) < 0.01)

    x = cb._sobol_uint32(num_codes, dim, cb._digital_shift(seed, dim))
    u = cb._uniform_open(x)
    bins = np.floor(np.sort(u, axis=0) * num_codes).astype(np.int64)
    assert np.array_equal(bins, np.broadcast_to(np.arange(num_codes)[:, None], bins.shape))
    # The codebook is the monotone image of those uniforms, column by column.
    order = np.argsort(x, axis=0)
    assert np.all(np.diff(np.take_along_axis(codebook, order, axis=0), axis=0) > 0)
