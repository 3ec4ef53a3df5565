"""Entropy coding of the discretized-VAE codec's integer latents, the same on every machine.

The codec (training/codec.py) sends two things: side information z (integers, under a factorized discretized
Gaussian per channel) and the latents y, each element an integer symbol k under a discretized Gaussian whose mean
and scale the hyperprior's synthesis h_s computes from z. Decoding must compute exactly the encoder's means and
scales: a scale one rounding apart picks another CDF table and the rest of the stream decodes into noise. So:

- h_s runs in integer arithmetic (IntegerSynthesis): activations are integers in units of 2^-ACT_BITS, weights
  integers in units of 2^-WEIGHT_BITS, each convolution a float64 matrix product of integer-valued operands (exact
  in any order, blocking or FMA while every partial sum stays below 2^53, which is checked from the operands'
  magnitudes before each product), then floored back to activation units. ReLU and nearest upsampling are exact.
- A scale is an index into a table of NUM_SCALES log-spaced scales, chosen by comparing the integer log-scale with
  integer thresholds (no exp, no float comparison); each index has an integer frequency table fixed when the
  tables are built (export), stored with the model, never recomputed at decode.
- The mean is the integer mean in units of 2^-ACT_BITS; the encoder codes k = round(y - mean) and the decoder
  rebuilds y_hat = k + mean exactly.

Symbols outside a table's range are coded as its escape symbol followed by the value in 16 raw bits (a uniform
over [-32768, 32767]). Frequencies sum to 2^16; constriction's range coder codes with them (its version is pinned).
"""

from __future__ import annotations

import hashlib
import io
import math
import zlib
from dataclasses import dataclass

import numpy as np

from gqtok.core.bitstream import MAX_GRID_SIDE, BitstreamError, Header, check_maker, grid_fits, open_stream
from gqtok.core.layout import DEFAULT_MAX_IMAGE_PIXELS

ACT_BITS = 8  # activations of the integer synthesis: integers in units of 2^-8
WEIGHT_BITS = 12  # its weights: integers in units of 2^-12
EXACT_BELOW = 2.0**53  # float64 adds and multiplies integers exactly below this
FREQ_BITS = 16  # every frequency table sums to 2^16
TAIL_SCALES = 7.0  # a table covers |k| <= ceil(7 sigma) + 1; beyond that, the escape
ESCAPE_RANGE = 2**15  # escaped values lie in [-32768, 32767]


class LatentCodingError(ValueError):
    """Latents that cannot be coded (or a stream that cannot be decoded) with these tables and synthesis."""


# -- the integer synthesis ---------------------------------------------------------------------------------------
@dataclass
class IntegerSynthesis:
    """h_s in integers: layers ("conv", W [Cout, Cin, k, k] int64, b [Cout] int64) | ("relu",) | ("up",)."""
    layers: list[tuple]

    @classmethod
    def from_float(cls, layers: list[tuple]) -> "IntegerSynthesis":
        """From float layers ("conv", W, b) | ("relu",) | ("up",): weights rounded to 2^-WEIGHT_BITS, biases to
        2^-(ACT_BITS + WEIGHT_BITS), the units of a product before it is floored back."""
        out = []
        for layer in layers:
            if layer[0] == "conv":
                w, b = (np.asarray(v, np.float64) for v in layer[1:])
                out.append(("conv", np.round(w * 2**WEIGHT_BITS).astype(np.int64),
                            np.round(b * 2 ** (ACT_BITS + WEIGHT_BITS)).astype(np.int64)))
            elif layer[0] in ("relu", "up"):
                out.append((layer[0],))
            else:
                raise ValueError(f"unknown layer {layer[0]!r}")
        return cls(out)

    def __call__(self, z: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
        """Integer z [Cz, h, w] -> int64 [C_out, H, W] in units of 2^-ACT_BITS, cropped to out_hw."""
        x = np.asarray(z, np.int64) << ACT_BITS
        for layer in self.layers:
            if layer[0] == "relu":
                x = np.maximum(x, 0)
            elif layer[0] == "up":
                x = x.repeat(2, axis=1).repeat(2, axis=2)
            else:
                x = _conv(x, layer[1], layer[2])
        return x[:, : out_hw[0], : out_hw[1]]

    def arrays(self, prefix: str = "synthesis") -> dict[str, np.ndarray]:
        """The layers as named arrays (for an npz file); `from_arrays` reads them back."""
        kinds = np.array([layer[0] for layer in self.layers])
        out = {f"{prefix}_kinds": kinds}
        for i, layer in enumerate(self.layers):
            if layer[0] == "conv":
                out[f"{prefix}_{i}_w"], out[f"{prefix}_{i}_b"] = layer[1], layer[2]
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "synthesis") -> "IntegerSynthesis":
        layers = []
        for i, kind in enumerate(str(k) for k in arrays[f"{prefix}_kinds"]):
            layers.append((kind, np.asarray(arrays[f"{prefix}_{i}_w"], np.int64),
                           np.asarray(arrays[f"{prefix}_{i}_b"], np.int64)) if kind == "conv" else (kind,))
        return cls(layers)


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A 'same' convolution of integer activations by integer weights, exact, floored back to activation units."""
    cout, cin, k, _ = w.shape
    c, h, wd = x.shape
    if c != cin:
        raise LatentCodingError(f"a layer takes {cin} channels, got {c}")
    bound = float(np.abs(x).max(initial=0)) * float(np.abs(w).reshape(cout, -1).sum(1).max(initial=0)) \
        + float(np.abs(b).max(initial=0))
    if bound >= EXACT_BELOW:
        raise LatentCodingError(f"the synthesis' partial sums could reach {bound:.3g}, past 2^53 where float64 "
                                "stops being exact: these side latents are out of the range the model was made for")
    p = k // 2
    padded = np.pad(x, ((0, 0), (p, p), (p, p)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(1, 2))  # [Cin, H, W, k, k]
    cols = windows.transpose(1, 2, 0, 3, 4).reshape(h * wd, cin * k * k).astype(np.float64)
    acc = cols @ w.reshape(cout, -1).T.astype(np.float64)  # exact: integer-valued, every partial sum < 2^53
    acc = acc.astype(np.int64) + b[None, :]
    return np.floor_divide(acc, 1 << WEIGHT_BITS).T.reshape(cout, h, wd)


# -- frequency tables --------------------------------------------------------------------------------------------
def scale_levels(num: int, low: float, high: float) -> np.ndarray:
    """`num` log-spaced scales from low to high."""
    return np.exp(np.linspace(math.log(low), math.log(high), num))


def scale_thresholds(levels: np.ndarray) -> np.ndarray:
    """Integer log-scale thresholds (units of 2^-ACT_BITS) between neighbouring levels: index = the number of
    thresholds at or below a log-scale (np.searchsorted(..., side="right")), the nearest level in log space."""
    mids = (np.log(levels[1:]) + np.log(levels[:-1])) / 2
    return np.ceil(mids * 2**ACT_BITS).astype(np.int64)


def gaussian_frequencies(scale: float) -> np.ndarray:
    """Integer frequencies (sum 2^FREQ_BITS, each >= 1) of a zero-mean Gaussian of `scale` discretized to the
    integers in [-R, R], R = ceil(TAIL_SCALES * scale) + 1, and a last entry: the escape (everything beyond)."""
    r = math.ceil(TAIL_SCALES * scale) + 1
    k = np.arange(-r, r + 1, dtype=np.float64)
    cdf = lambda t: 0.5 * (1 + np.vectorize(math.erf)(t / (scale * math.sqrt(2))))  # noqa: E731
    mass = np.append(cdf(k + 0.5) - cdf(k - 0.5), 2 * (1 - cdf(np.array([r + 0.5])))[0])
    total = 2**FREQ_BITS
    freq = np.floor(mass * (total - len(mass))).astype(np.int64) + 1
    freq[r] += total - freq.sum()  # the rounding's remainder to k = 0, the likeliest symbol (symmetry kept)
    return freq


@dataclass
class FrequencyTables:
    """One table per scale level: `freq[i]` for scale `levels[i]`, its symbols k in [-radius[i], radius[i]]."""
    levels: np.ndarray
    freqs: list[np.ndarray]

    @classmethod
    def build(cls, levels: np.ndarray) -> "FrequencyTables":
        return cls(np.asarray(levels, np.float64), [gaussian_frequencies(float(s)) for s in levels])

    def radius(self, i: int) -> int:
        return (len(self.freqs[i]) - 2) // 2

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        lengths = np.array([len(f) for f in self.freqs])
        return {f"{prefix}_levels": self.levels, f"{prefix}_lengths": lengths,
                f"{prefix}_freqs": np.concatenate(self.freqs)}

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> "FrequencyTables":
        ends = np.cumsum(arrays[f"{prefix}_lengths"])
        flat = np.asarray(arrays[f"{prefix}_freqs"], np.int64)
        return cls(np.asarray(arrays[f"{prefix}_levels"]), [flat[e - n:e] for e, n in
                                                             zip(ends, arrays[f"{prefix}_lengths"])])


# -- the coder ---------------------------------------------------------------------------------------------------
def _constriction():
    import constriction  # here: the rest of the contract needs only numpy

    return constriction.stream.queue, constriction.stream.model


def _encode_group(enc, model, symbols: np.ndarray, freq: np.ndarray) -> None:
    """Symbols under one table (k in [-R, R], the escape past it), then the escaped values in raw 16 bits."""
    r = (len(freq) - 2) // 2
    escaped = np.abs(symbols) > r
    if escaped.any() and np.abs(symbols[escaped]).max() >= ESCAPE_RANGE:
        raise LatentCodingError(f"a latent of {int(np.abs(symbols).max())} is past the coder's +-{ESCAPE_RANGE}")
    index = np.where(escaped, 2 * r + 1, symbols + r).astype(np.int32)
    enc.encode(index, model.Categorical(freq.astype(np.float64), perfect=False))
    if escaped.any():
        enc.encode((symbols[escaped] + ESCAPE_RANGE).astype(np.int32), model.Uniform(2 * ESCAPE_RANGE))


def _decode_group(dec, model, count: int, freq: np.ndarray) -> np.ndarray:
    r = (len(freq) - 2) // 2
    index = dec.decode(model.Categorical(freq.astype(np.float64), perfect=False), count).astype(np.int64)
    symbols = index - r
    escaped = index == 2 * r + 1
    if escaped.any():
        symbols[escaped] = dec.decode(model.Uniform(2 * ESCAPE_RANGE), int(escaped.sum())).astype(np.int64) \
            - ESCAPE_RANGE
    return symbols


@dataclass
class LatentCoder:
    """Codes (z, y) of the discretized-VAE codec: z per channel under `z_tables` (one table per channel), y under
    the table of each element's scale index from the integer synthesis."""
    synthesis: IntegerSynthesis
    y_tables: FrequencyTables
    z_tables: FrequencyTables  # levels[c]: z channel c's scale

    def __post_init__(self):
        self.thresholds = scale_thresholds(self.y_tables.levels)

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything the coder is, as named integer and float64 arrays (latent_coder.npz); `from_arrays` reads it."""
        return self.synthesis.arrays() | self.y_tables.arrays("y") | self.z_tables.arrays("z")

    @classmethod
    def from_arrays(cls, arrays) -> "LatentCoder":
        return cls(IntegerSynthesis.from_arrays(arrays), FrequencyTables.from_arrays(arrays, "y"),
                   FrequencyTables.from_arrays(arrays, "z"))

    def entropy_parameters(self, z: np.ndarray, y_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(mean in units of 2^-ACT_BITS, scale index) of every y element, from the integer z."""
        mean, log_scale = np.split(self.synthesis(z, y_hw), 2, axis=0)
        return mean, np.searchsorted(self.thresholds, log_scale, side="right")

    def symbols(self, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(y's integer symbols, y_hat) for the encoder's float y [C, h, w]: k = round(y - mean), y_hat = k + mean
        (what the decoder rebuilds, exactly)."""
        mean, _ = self.entropy_parameters(z, y.shape[1:])
        m = mean.astype(np.float64) / 2**ACT_BITS
        k = np.round(np.asarray(y, np.float64) - m).astype(np.int64)
        return k, k + m

    def side_bits(self, z: np.ndarray) -> float:
        """The information content of z under its tables (bits; escapes at their 16 raw bits): the side
        information's share of a stream, for reports."""
        bits = 0.0
        for c, freq in enumerate(self.z_tables.freqs):
            r = (len(freq) - 2) // 2
            symbols = np.asarray(z[c], np.int64).reshape(-1)
            escaped = np.abs(symbols) > r
            index = np.where(escaped, 2 * r + 1, symbols + r)
            bits += float(np.sum(FREQ_BITS - np.log2(freq[index]))) + 16.0 * int(escaped.sum())
        return bits

    def encode(self, z: np.ndarray, k: np.ndarray) -> np.ndarray:
        """z [Cz, hz, wz] and y's symbols k [C, h, w] (integers) -> uint32 words."""
        queue, model = _constriction()
        enc = queue.RangeEncoder()
        z = np.asarray(z, np.int64)
        for c in range(z.shape[0]):
            _encode_group(enc, model, z[c].reshape(-1), self.z_tables.freqs[c])
        _, index = self.entropy_parameters(z, k.shape[1:])
        flat_k, flat_i = np.asarray(k, np.int64).reshape(-1), index.reshape(-1)
        for level in np.unique(flat_i):  # ascending: the decoder walks the same order
            _encode_group(enc, model, flat_k[flat_i == level], self.y_tables.freqs[level])
        return enc.get_compressed()

    def decode(self, words: np.ndarray, z_shape: tuple[int, int, int],
               y_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint32 words -> (z, y's symbols k, y_hat as float64 [C, h, w]), y_hat = k + mean exactly as the
        encoder's."""
        queue, model = _constriction()
        dec = queue.RangeDecoder(np.asarray(words, np.uint32))
        cz, hz, wz = z_shape
        z = np.stack([_decode_group(dec, model, hz * wz, self.z_tables.freqs[c]).reshape(hz, wz) for c in range(cz)])
        mean, index = self.entropy_parameters(z, y_shape[1:])
        flat_i = index.reshape(-1)
        k = np.zeros(flat_i.shape, np.int64)
        for level in np.unique(flat_i):
            where = flat_i == level
            k[where] = _decode_group(dec, model, int(where.sum()), self.y_tables.freqs[level])
        k = k.reshape(y_shape)
        return z, k, k + mean.astype(np.float64) / 2**ACT_BITS


# -- the compressed stream ---------------------------------------------------------------------------------------
def symbols_crc(k: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(k, dtype="<i4").tobytes())


class LatentCompressor:
    """Streams of one codec model (gqtok.core.bitstream's format, codec "dvae"): its coder and per-quality gains
    from latent_coder.npz, checked against the header on the way back.

        lc = LatentCompressor(load_artifact("models/codec"))
        y = lc.scaled(mu, quality)                                   # the encoder's mean -> the latents to code
        data = lc.compress(y, z, image_size, quality)                # z: the side information, rounded
        latent, header = lc.decompress(data)                         # the decoder's input, float32 [C, h, w]
    """

    def __init__(self, artifact):
        from gqtok.core.artifact import LATENT_CODER, require_kind

        require_kind(artifact, "codec", "coding latents")
        self.manifest = m = artifact.manifest
        data = artifact.path(LATENT_CODER).read_bytes()  # digest-checked by load_artifact
        self.coder_digest = hashlib.sha256(data).digest()[:8]
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            self.coder = LatentCoder.from_arrays(arrays)
            # float64 [qualities, C]: y = mu * gain going in, latent = y_hat * inv_gain coming back (a product,
            # never an exp or a division at decode: the same float32 on every machine)
            self.gain, self.inv_gain = arrays["gain"], arrays["inv_gain"]
        if self.gain.shape != (m.codec.qualities, m.latent_channels) or self.inv_gain.shape != self.gain.shape:
            raise ValueError(f"{LATENT_CODER}: gains of shape {self.gain.shape}, model has "
                             f"[{m.codec.qualities}, {m.latent_channels}]")
        self.model_digest = bytes.fromhex(m.model_digest)[:8]

    def quality(self, quality: int | None) -> int:
        """The quality to code at (None: the model's default); ValueError outside 1 .. qualities."""
        spec = self.manifest.codec
        q = spec.default_quality if quality is None else quality
        if not isinstance(q, (int, np.integer)) or not 1 <= q <= spec.qualities:
            raise ValueError(f"quality must be an integer from 1 (lowest rate) to {spec.qualities} for model "
                             f"{self.manifest.model_id}, got {quality!r}")
        return int(q)

    def scaled(self, mu: np.ndarray, quality: int) -> np.ndarray:
        """The encoder's means [..., C, h, w] -> the latents y at this quality (float32)."""
        return (np.asarray(mu, np.float64) * self.gain[quality - 1][:, None, None]).astype(np.float32)

    def side_shape(self, hw: tuple[int, int]) -> tuple[int, int, int]:
        """z's shape for latents of spatial size hw: two stride-2 convolutions, each rounding up."""
        d = self.manifest.codec.hyper_downsample
        return (self.manifest.codec.hyper_channels, -(-hw[0] // d), -(-hw[1] // d))

    def compress(self, y: np.ndarray, z: np.ndarray, image_size: tuple[int, int], quality: int) -> bytes:
        m = self.manifest
        quality = self.quality(quality)
        y, z = np.asarray(y), np.asarray(z)
        if y.ndim != 3 or y.shape[0] != m.latent_channels or max(y.shape[1:]) > MAX_GRID_SIDE:
            raise ValueError(f"latents must be [{m.latent_channels}, h, w] with h, w <= {MAX_GRID_SIDE}; "
                             f"got {list(y.shape)}")
        if z.shape != self.side_shape(y.shape[1:]):
            raise ValueError(f"side information of shape {list(z.shape)}, latents {list(y.shape)} need "
                             f"{list(self.side_shape(y.shape[1:]))}")
        if not grid_fits(image_size, y.shape[1:], m.downsample):
            raise ValueError(f"image size {image_size[0]}x{image_size[1]} is not what a {y.shape[1]}x{y.shape[2]} "
                             f"grid at f={m.downsample} covers")
        if not np.isfinite(y).all():
            raise ValueError("the latents hold NaN or infinity")
        k, _ = self.coder.symbols(y, z)
        payload = self.coder.encode(z, k).astype("<u4").tobytes()
        header = Header(m.model_id, "hyperprior", b"\0" * 8, self.coder_digest,
                        (int(image_size[0]), int(image_size[1])), tuple(y.shape), 0, symbols_crc(k), len(payload),
                        zlib.crc32(payload), self.model_digest, codec="dvae", quality=quality)
        return header.pack() + payload

    def check(self, header: Header) -> None:
        """Refuse a header this codec cannot decode, naming the mismatch."""
        m = self.manifest
        check_maker(header, "dvae", m, self.model_digest)
        if header.prior_digest != self.coder_digest:
            raise BitstreamError(f"stream's latent coder ({header.prior_digest.hex()}) is not this model's "
                                 f"({self.coder_digest.hex()})")
        c, h, w = header.grid
        if (c != m.latent_channels or not 1 <= header.quality <= m.codec.qualities
                or not grid_fits(header.image_size, (h, w), m.downsample)):
            raise BitstreamError(f"header sizes (latents {list(header.grid)}, quality {header.quality}, image "
                                 f"{header.image_size[0]}x{header.image_size[1]}) do not fit model {m.model_id}")

    def decompress(self, data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[np.ndarray, Header]:
        """bytes -> (the decoder's input float32 [C, h, w], header); BitstreamError on anything wrong. A header
        naming more than max_pixels image pixels is refused before anything is allocated."""
        header, payload = open_stream(data, max_pixels)
        self.check(header)
        try:
            _, k, y_hat = self.coder.decode(np.frombuffer(payload, "<u4"), self.side_shape(header.grid[1:]),
                                            header.grid)
        except Exception as e:  # the coder ran out of words, met an impossible state, or the synthesis' range
            raise BitstreamError(f"payload does not decode with the latent coder: {e}") from None
        if symbols_crc(k) != header.token_crc:
            raise BitstreamError("decoded latents fail their checksum: the coder computed differently here than "
                                 "where the stream was made")
        latent = (y_hat * self.inv_gain[header.quality - 1][:, None, None]).astype(np.float32)
        return latent, header
