"""Bit-reproducible Gaussian Quant codebook: K points in R^d that look like N(0, I_d).

The codebook is part of the artifact contract: a checkpoint stores only
``(generator name, version, seed, K, d)`` plus a digest, and every consumer
(training, export, the service, a client in another language) rebuilds the
same float32 bytes.  So the algorithm below is the specification, and it is
written to use only operations whose results IEEE-754 defines exactly:

* integer ops: 64-bit wrap-around add/multiply, xor, shifts;
* float64 ``+ - * /`` and ``sqrt`` (each correctly rounded, round to nearest
  even), and ``frexp`` / ``ldexp`` / multiplication by powers of two (exact);
* one final float64 -> float32 conversion (round to nearest even).

No library transcendental (log, exp, erf) is used, because those may differ by
an ulp between libm builds, CPUs (numpy picks SIMD kernels at run time) and
versions; no library RNG or QMC generator is used, because their streams are
not promised to stay fixed.  numpy evaluates each elementwise op separately
rounded (it never contracts ``a * b + c`` into an FMA), so the fixed sequence
of numpy ops here is reproducible; a port in C must likewise be compiled
without FMA contraction (e.g. ``-ffp-contract=off``) and with SSE2/IEEE
double arithmetic, not x87 extended precision.

Specification: generator "sobol-ds-acklam", version 1
=====================================================

Inputs: ``seed`` an integer in [0, 2**64), ``K`` (num_codes) an integer in
[1, 2**32], ``d`` (dim) an integer in [1, 64].  Output: a C-contiguous float32
array ``C`` of shape [K, d].  Points are ``i = 0 .. K-1``, dimensions
``j = 0 .. d-1``.  Because ``C[i, j]`` depends only on ``(seed, i, j)``,
the codebook for K is exactly the first K rows of the codebook for 2K (or
any larger K), and the first d columns of the codebook for any larger d.

1. Unscrambled 32-bit Sobol integers.  Direction numbers are Joe & Kuo's
   "new-joe-kuo-6.21201" (table in ``gqtok/_sobol_table.py``).  For dimension
   ``j = 0`` every ``m_k = 1`` (van der Corput).  For ``j >= 1`` take the
   file's line for ``d = j + 1``: degree ``s``, coefficient bits ``a``,
   initial ``m_1 .. m_s``.  The 32 direction integers are (k = 1..32)::

       V[k] = m_k << (32 - k)                                 for k <= s
       V[k] = V[k-s] ^ (V[k-s] >> s)
              ^ XOR_{l=1..s-1} ( ((a >> (s-1-l)) & 1) * V[k-l] )   for k > s

   (all unsigned 32-bit).  The Sobol integer of point i is, in NATURAL order
   (not the Gray-code order many libraries use)::

       s_j(i) = XOR over bits b = 0..31 of i that are set of V_j[b + 1]

   For K a power of two, natural and Gray-code order give the same set of
   points; scipy's ``Sobol(scramble=False, bits=32)`` point n equals
   ``s(n ^ (n >> 1))`` here.

2. Random digital shift.  Run standard SplitMix64 from ``state = seed`` (all
   arithmetic mod 2**64)::

       state += 0x9E3779B97F4A7C15
       z = state
       z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
       z = (z ^ (z >> 27)) * 0x94D049BB133111EB
       z = z ^ (z >> 31)

   Output number j (j = 0, 1, ...; the first output is j = 0) gives
   ``shift_j = z >> 32`` (its high 32 bits), and ``x_j(i) = s_j(i) ^ shift_j``.
   The shift keeps every stratification property of the Sobol net.

3. Uniform in the open interval (0, 1), exact in float64::

       u = (double(x) + 0.5) * 2**-32

   so u = (2x + 1) / 2**33 is never 0, 1 or 0.5.

4. Normal quantile ``z = Q(u)``: Acklam's rational approximation (relative
   error about 1.15e-9), no refinement step.  Coefficients are the decimal
   literals in ``_ACKLAM_A/B/C/D`` below, each parsed to the nearest double.
   With ``p_low = 0.02425`` (nearest double)::

       t = u          if u < 0.5   else 1 - u       (1 - u is exact here)
       if t >= p_low  (central region):
           q = u - 0.5;  r = q * q
           z = (((((a1*r + a2)*r + a3)*r + a4)*r + a5)*r + a6) * q
             / (((((b1*r + b2)*r + b3)*r + b4)*r + b5)*r + 1)
       else           (tail):
           q = sqrt(-2 * log(t))
           w = (((((c1*q + c2)*q + c3)*q + c4)*q + c5)*q + c6)
             / ((((d1*q + d2)*q + d3)*q + d4)*q + 1)
           z = w if u < 0.5 else -w

   Every ``+ - * /`` is one rounded double op in exactly the order written
   (Horner, left to right); ``-2 * log(t)`` is ``(-2.0) * log(t)``, and
   ``-w`` is an exact sign flip.  This is Acklam's algorithm; the only
   liberty taken is that the upper-tail test is ``1 - u < p_low`` instead of
   ``u > 1 - p_low``, which makes Q exactly antisymmetric (Q(1-u) = -Q(u)).
   ``log`` is ``_log`` below, built from exact parts:

       m, e = frexp(t)              # t = m * 2**e, m in [0.5, 1), exact
       if m < SQRT_HALF: m = 2*m; e = e - 1      # now m in [sqrt(.5), sqrt(2))
       f = m - 1                    # exact (Sterbenz)
       s = f / (2 + f)              # = (m - 1) / (m + 1), |s| <= 0.1716
       w = s * s
       R = (((L11*w + L10)*w + L9)*w + ... + L1) * w
             with L_k = fl(1 / (2k + 1)), k = 1..11 (1/3 .. 1/23)
       log m = f - s * (f - 2*R)    # = 2 * (s + s^3/3 + ... + s^23/23)
       log t = e*LN2_HI + (log m + e*LN2_LO)

   where ``SQRT_HALF = 0x1.6a09e667f3bcdp-1`` (nearest double to sqrt(0.5)),
   ``LN2_HI = 0x1.62e42feep-1`` and ``LN2_LO = 0x1.a39ef35793c76p-33``.  The
   rewrite ``2s = f - s*f`` keeps the exact ``f`` as the leading term, which
   makes the result accurate to about 1 ulp.  ln2 is split because a single
   double ln2 carries a representation error of ~2e-17 relative that
   ``e * ln2`` would multiply by |e| (up to ~1000); LN2_HI has only 32
   significant bits, so ``e * LN2_HI`` is exact for every |e| < 2**21 and only
   the tiny ``e * LN2_LO`` is rounded.  The first omitted series term is
   below 2**-65 relative, so the truncation is invisible in double.

5. ``C[i, j] = float32(z)`` (round to nearest even).  C is C-contiguous.

``codebook_digest`` is sha256 over the little-endian float32 bytes in C
order (row-major: point 0's d values, then point 1's, ...).
"""

from __future__ import annotations

import hashlib
import numbers

import numpy as np

from gqtok.core._sobol_table import SOBOL_PARAMS

GENERATOR_NAME: str = "sobol-ds-acklam"
GENERATOR_VERSION: int = 1
MAX_DIM: int = 64
MAX_CODES: int = 2**32

# Points are produced in aligned blocks of 2**_CHUNK_BITS.  Every op is
# elementwise or exact integer, so the block size never changes the bytes;
# it only bounds temporary memory (~ 2**16 * d * 8 bytes per float64 temp).
_CHUNK_BITS = 16
_SOBOL_BITS = 32

_MASK64 = (1 << 64) - 1

# Peter J. Acklam, "An algorithm for computing the inverse normal cumulative
# distribution function" (2003), coefficients exactly as published.
_ACKLAM_A = (
    -3.969683028665376e01,
    2.209460984245205e02,
    -2.759285104469687e02,
    1.383577518672690e02,
    -3.066479806614716e01,
    2.506628277459239e00,
)
_ACKLAM_B = (
    -5.447609879822406e01,
    1.615858368580409e02,
    -1.556989798598866e02,
    6.680131188771972e01,
    -1.328068155288572e01,
)
_ACKLAM_C = (
    -7.784894002430293e-03,
    -3.223964580411365e-01,
    -2.400758277161838e00,
    -2.549732539343734e00,
    4.374664141464968e00,
    2.938163982698783e00,
)
_ACKLAM_D = (
    7.784695709041462e-03,
    3.224671290700398e-01,
    2.445134137142996e00,
    3.754408661907416e00,
)
_P_LOW = 0.02425

_SQRT_HALF = float.fromhex("0x1.6a09e667f3bcdp-1")
# fdlibm's split of ln 2: HI has 32 significant bits so e * HI is exact.
_LN2_HI = float.fromhex("0x1.62e42feep-1")
_LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")
# Series coefficients 1/3, 1/5, ..., 1/23 (each division correctly rounded).
_LOG_SERIES = tuple(1.0 / (2 * k + 1) for k in range(1, 12))


# ----------------------------------------------------------------- validation


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    """Return value as a Python int if it is an integer in [lo, hi]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


# ----------------------------------------------------------- step 1: Sobol


def _direction_integers(dim: int) -> np.ndarray:
    """uint32 [dim, 32]: column b is V_j[b + 1], the integer for bit b of i."""
    table = np.zeros((dim, _SOBOL_BITS), dtype=np.uint32)
    for j in range(dim):
        if j == 0:
            s, a, m = _SOBOL_BITS, 0, (1,) * _SOBOL_BITS  # van der Corput
        else:
            _, s, a, m = SOBOL_PARAMS[j - 1]
        v = [m[k] << (_SOBOL_BITS - 1 - k) for k in range(min(s, _SOBOL_BITS))]
        for k in range(s, _SOBOL_BITS):  # 0-based form of the Joe-Kuo recurrence
            vk = v[k - s] ^ (v[k - s] >> s)
            for l in range(1, s):
                if (a >> (s - 1 - l)) & 1:
                    vk ^= v[k - l]
            v.append(vk)
        table[j] = v
    return table


def _iter_sobol_uint32(num_codes: int, dim: int, shift: np.ndarray | None = None):
    """Yield (start, uint32 [n, dim]) blocks of s_j(i) ^ shift_j in natural order.

    Uses s(start + r) = s(start) ^ s(r) for a block start aligned to
    2**_CHUNK_BITS and r < 2**_CHUNK_BITS (their bits do not overlap), so the
    in-block table is built once by doubling: s(r + 2**b) = s(r) ^ V[b].
    """
    directions = _direction_integers(dim)
    block = min(num_codes, 1 << _CHUNK_BITS)
    low = np.zeros((1, dim), dtype=np.uint32)
    for b in range(max(block - 1, 0).bit_length()):
        low = np.concatenate([low, low ^ directions[:, b]])
    low = low[:block]
    if shift is not None:
        low = low ^ shift  # xor with the shift commutes with the block xor
    for start in range(0, num_codes, block):
        high = np.zeros(dim, dtype=np.uint32)
        for b in range(_CHUNK_BITS, _SOBOL_BITS):
            if (start >> b) & 1:
                high ^= directions[:, b]
        yield start, low[: min(block, num_codes - start)] ^ high


def _sobol_uint32(num_codes: int, dim: int, shift: np.ndarray | None = None) -> np.ndarray:
    """uint32 [num_codes, dim]: natural-order Sobol integers, xor shift if given."""
    num_codes = _check_int("num_codes", num_codes, 1, MAX_CODES)
    dim = _check_int("dim", dim, 1, MAX_DIM)
    out = np.empty((num_codes, dim), dtype=np.uint32)
    for start, x in _iter_sobol_uint32(num_codes, dim, shift):
        out[start : start + len(x)] = x
    return out


# ---------------------------------------------------- step 2: digital shift


def _splitmix64(seed: int, count: int) -> list[int]:
    """The first `count` SplitMix64 outputs from state `seed` (Python ints, mod 2**64)."""
    state, outputs = seed, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        outputs.append(z ^ (z >> 31))
    return outputs


def _digital_shift(seed: int, dim: int) -> np.ndarray:
    """uint32 [dim]: high 32 bits of the first `dim` SplitMix64 outputs."""
    return np.array([z >> 32 for z in _splitmix64(seed, dim)], dtype=np.uint32)


# ---------------------------------------------------- step 3: uniforms


def _uniform_open(x: np.ndarray) -> np.ndarray:
    """float64 (x + 0.5) * 2**-32: exact, strictly inside (0, 1)."""
    return (x.astype(np.float64) + 0.5) * 2.0**-32


# ---------------------------------------------------- step 4: quantile


def _horner(coefficients: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    """((c0*x + c1)*x + ...)*x + c_last, one rounded op at a time."""
    acc = np.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        acc = acc * x + c
    return acc


def _log(x: np.ndarray) -> np.ndarray:
    """Natural log of finite x > 0 from exact parts (see module docstring).

    Unlike np.log, the result depends only on IEEE-754 basic ops, so it is
    the same on every CPU.  Accurate to about 1 ulp; x <= 0, inf and nan
    give garbage, not an error (callers validate).
    """
    x = np.asarray(x, dtype=np.float64)
    m, e = np.frexp(x)  # exact: x = m * 2**e, m in [0.5, 1)
    small = m < _SQRT_HALF
    m = np.where(small, m * 2.0, m)  # exact
    e = (e - small).astype(np.float64)  # exponents are small ints: exact
    f = m - 1.0  # exact (Sterbenz lemma), in [-0.293, 0.414)
    s = f / (2.0 + f)
    w = s * s
    r = _horner(_LOG_SERIES[::-1], w) * w  # s^2/3 + s^4/5 + ... + s^22/23
    log_m = f - s * (f - 2.0 * r)  # = 2s + 2s*r, since 2s = f - s*f
    return e * _LN2_HI + (log_m + e * _LN2_LO)


def normal_quantile(u: np.ndarray) -> np.ndarray:
    """Acklam's inverse normal CDF of float64 u in (0, 1), bit-reproducible.

    float64 in, float64 out, same shape.  Relative error vs the true quantile
    is about 1.15e-9.  Exactly antisymmetric: Q(1 - u) == -Q(u) whenever
    1 - u is exact.  Raises ValueError for u outside the open interval.
    """
    u = np.asarray(u, dtype=np.float64)
    if not np.all((u > 0.0) & (u < 1.0)):  # also catches nan
        raise ValueError("normal_quantile needs every u strictly inside (0, 1)")
    lower = u < 0.5
    tail_p = np.where(lower, u, 1.0 - u)  # 1 - u exact for u >= 0.5
    in_tail = tail_p < _P_LOW
    z = np.empty_like(u)

    central = ~in_tail
    q = u[central] - 0.5
    r = q * q
    z[central] = _horner(_ACKLAM_A, r) * q / (_horner(_ACKLAM_B, r) * r + 1.0)

    qt = np.sqrt(-2.0 * _log(tail_p[in_tail]))
    w = _horner(_ACKLAM_C, qt) / (_horner(_ACKLAM_D, qt) * qt + 1.0)
    z[in_tail] = np.where(lower[in_tail], w, -w)
    return z


# ---------------------------------------------------- public API


def make_codebook(seed: int, num_codes: int, dim: int) -> np.ndarray:
    """The "sobol-ds-acklam" v1 codebook: float32 [num_codes, dim], C-contiguous.

    Same (seed, num_codes, dim) -> same bytes on every machine.  The codebook
    for num_codes is a prefix of the one for any larger num_codes.
    Raises ValueError unless seed is an int in [0, 2**64), num_codes in
    [1, 2**32] and dim in [1, 64].
    """
    seed = _check_int("seed", seed, 0, _MASK64)
    num_codes = _check_int("num_codes", num_codes, 1, MAX_CODES)
    dim = _check_int("dim", dim, 1, MAX_DIM)
    shift = _digital_shift(seed, dim)
    codebook = np.empty((num_codes, dim), dtype=np.float32)
    for start, x in _iter_sobol_uint32(num_codes, dim, shift):
        z = normal_quantile(_uniform_open(x))
        codebook[start : start + len(x)] = z.astype(np.float32)  # round to nearest even
    return codebook


def codebook_digest(codebook: np.ndarray) -> str:
    """sha256 hex of the little-endian float32 bytes of a 2-D codebook, C order.

    The shape is not hashed; store it alongside.  Raises ValueError unless
    the input is a 2-D float32 array (any byte order).
    """
    array = np.asarray(codebook)
    if array.dtype.kind != "f" or array.dtype.itemsize != 4:
        raise ValueError(f"codebook must be float32, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"codebook must be 2-D [num_codes, dim], got shape {array.shape}")
    data = np.ascontiguousarray(array, dtype="<f4")
    return hashlib.sha256(data.tobytes()).hexdigest()
