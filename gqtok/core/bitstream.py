"""The compressed-image format: a self-describing header, then the token grid entropy-coded by constriction.

    compressor = TokenCompressor(load_artifact("models/default"))
    data = compressor.compress(ids, image_size=(H, W))   # int [T, h, w] -> bytes, with the model's best prior
    ids, header = compressor.decompress(data)             # checks the header against the model

Header (little-endian; version 4):

    magic "GQTK" | format version u8 | prior id u8 | model id length u8 | model id (ASCII)
    | codec u8 (0 gq: GQ tokens; 1 dvae: the discretized-VAE codec's latents) | quality u8 (dvae; 0 for gq)
    | codebook sha256[:8] (zeros for dvae) | prior file sha256[:8] (zeros for uniform; dvae: latent_coder.npz)
    | model digest[:8] (Manifest.model_digest) | image H u32 | image W u32
    | grid T u16 | h u16 | w u16 (dvae: the latents' C, h, w) | K u32 (dvae: 0)
    | crc32 of the tokens (uint32 LE; dvae: the latents' int32 symbols) u32 | payload length u32
    | crc32 of the payload u32 | crc32 of the header so far u32
    then the payload: constriction range-coder words (uint32 LE).

The header pins what decoding needs to agree on (model, its networks, codebook, prior file, sizes), so a stream
made by another model or prior is refused by name, not decoded into noise; the model digest tells apart two
exports that share an id and a codebook. The payload checksum
catches corruption before decoding; the token checksum is the last guard.

Every prior computes its probabilities exactly (uniform and frequency from integer counts, context in
fixed point), so a stream decodes the same on any machine. Version 4 added the codec and its quality (the
dvae codec's streams, gqtok/core/latents.py); version 3 streams are GQ token streams and still decode. Version 3 added the model digest; version 2 streams
still decode, checked against what they carry (id, codebook, prior). Version 2 changed only the context prior
(version 1's ran in float32 and did not decode portably); version 1 streams of the uniform and frequency
priors are coded exactly as in version 2 and still decode. The coder's word stream is constriction's range coder,
whose version the package pins (a new release is taken with a new format version).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from gqtok.core.priors import PRIOR_IDS, CircuitPrior, ContextPrior, FrequencyPrior, UniformPrior, load_priors, wavefront
from gqtok.core.layout import DEFAULT_MAX_IMAGE_PIXELS

MAGIC = b"GQTK"
FORMAT_VERSION = 4
# older format versions this gqtok decodes, and for which priors (all of them GQ token streams)
OLD_VERSIONS_READ = {1: ("uniform", "frequency"), 2: ("uniform", "frequency", "context"),
                     3: ("uniform", "frequency", "context")}
# after the model id: (from version 4) codec and quality, digests (codebook, prior, and from version 3 the
# model), sizes, K, checksums, payload length
_FIXED = {4: struct.Struct("<BB8s8s8sIIHHHIIII"), 3: struct.Struct("<8s8s8sIIHHHIIII"),
          2: struct.Struct("<8s8sIIHHHIIII"), 1: struct.Struct("<8s8sIIHHHIIII")}
CODEC_IDS = {"gq": 0, "dvae": 1}
# the entropy model byte: the token priors, and the dvae codec's hyperprior (its only one)
STREAM_PRIORS = {**PRIOR_IDS, "hyperprior": 3}
CODEC_PRIORS = {"gq": tuple(PRIOR_IDS), "dvae": ("hyperprior",)}
MAX_GRID_SIDE = 2**16 - 1


class BitstreamError(ValueError):
    """A compressed stream that cannot be decoded: not ours, corrupted, truncated, or made by another model."""


@dataclass(frozen=True)
class Header:
    model_id: str
    prior: str
    codebook_digest: bytes  # 8 bytes
    prior_digest: bytes  # 8 bytes
    image_size: tuple[int, int]  # (H, W) of the original image
    grid: tuple[int, int, int]  # (T, h, w)
    num_codes: int
    token_crc: int
    payload_length: int
    payload_crc: int
    model_digest: bytes = b""  # 8 bytes from version 3; empty in older streams
    version: int = FORMAT_VERSION
    codec: str = "gq"  # from version 4; older streams are all gq
    quality: int = 0  # the dvae codec's quality (1 = lowest rate); 0 for gq

    def pack(self) -> bytes:
        mid = self.model_id.encode("ascii")
        digests = (self.codebook_digest, self.prior_digest) + ((self.model_digest,) if self.version >= 3 else ())
        codec = (CODEC_IDS[self.codec], self.quality) if self.version >= 4 else ()
        head = MAGIC + bytes([self.version, STREAM_PRIORS[self.prior], len(mid)]) + mid + _FIXED[self.version].pack(
            *codec, *digests, *self.image_size, *self.grid, self.num_codes, self.token_crc, self.payload_length,
            self.payload_crc)
        return head + struct.pack("<I", zlib.crc32(head))

    @classmethod
    def unpack(cls, data: bytes) -> tuple["Header", bytes]:
        """bytes -> (header, payload); BitstreamError for anything that is not an intact gqtok stream."""
        if len(data) < 7 or data[:4] != MAGIC:
            raise BitstreamError("not a gqtok compressed image (no GQTK magic)")
        version, prior_id, id_len = data[4], data[5], data[6]
        if version != FORMAT_VERSION and version not in OLD_VERSIONS_READ:
            raise BitstreamError(f"format version {version}; this gqtok reads version {FORMAT_VERSION}")
        names = {v: k for k, v in STREAM_PRIORS.items()}
        if prior_id not in names:
            raise BitstreamError(f"unknown prior id {prior_id}")
        if version in OLD_VERSIONS_READ and names[prior_id] not in OLD_VERSIONS_READ[version]:
            if names[prior_id] not in PRIOR_IDS:
                raise BitstreamError(f"format version {version} has no {names[prior_id]} prior: the stream is corrupted")
            raise BitstreamError(f"format version {version} stream with the {names[prior_id]} prior: that prior "
                                 f"computed in float there and does not decode portably; this gqtok reads version "
                                 f"{version} only for the {' and '.join(OLD_VERSIONS_READ[version])} priors "
                                 "(decode it with the gqtok and machine that wrote it)")
        fixed = _FIXED[version]
        end = 7 + id_len + fixed.size
        if len(data) < end + 4:
            raise BitstreamError(f"truncated header: {len(data)} bytes, the header alone needs {end + 4}")
        (crc,) = struct.unpack_from("<I", data, end)
        if crc != zlib.crc32(data[:end]):
            raise BitstreamError("header checksum mismatch: the stream is corrupted")
        model_id = data[7 : 7 + id_len].decode("ascii", errors="replace")
        fields = fixed.unpack_from(data, 7 + id_len)
        codec, quality = ({v: k for k, v in CODEC_IDS.items()}.get(fields[0]), fields[1]) if version >= 4 else ("gq", 0)
        if codec is None:
            raise BitstreamError(f"unknown codec id {fields[0]}: a newer gqtok wrote this stream")
        if names[prior_id] not in CODEC_PRIORS[codec]:
            raise BitstreamError(f"a {codec} stream cannot use the {names[prior_id]} prior: the stream is corrupted")
        fields = fields[2:] if version >= 4 else fields
        cb, pd, md = fields[:3] if version >= 3 else (*fields[:2], b"")
        hh, ww, t, h, w, k, tcrc, plen, pcrc = fields[3:] if version >= 3 else fields[2:]
        header = cls(model_id, names[prior_id], cb, pd, (hh, ww), (t, h, w), k, tcrc, plen, pcrc, md, version,
                     codec, quality)
        payload = data[end + 4 :]
        if len(payload) != plen:
            raise BitstreamError(f"payload is {len(payload)} bytes, the header says {plen}: "
                                 + ("truncated" if len(payload) < plen else "trailing bytes"))
        if zlib.crc32(payload) != pcrc:
            raise BitstreamError("payload checksum mismatch: the stream is corrupted")
        return header, payload

    @property
    def total_bytes(self) -> int:
        return 7 + len(self.model_id) + _FIXED[self.version].size + 4 + self.payload_length


def read_header(data: bytes) -> Header:
    return Header.unpack(data)[0]


def open_stream(data: bytes, max_pixels: int) -> tuple[Header, bytes]:
    """(header, payload) of an intact stream that decodes to at most max_pixels pixels, refused before anything is
    allocated otherwise."""
    header, payload = Header.unpack(data)
    hh, ww = header.image_size
    if hh * ww > max_pixels:
        raise BitstreamError(f"stream decodes to {hh}x{ww} = {hh * ww} pixels; the limit is {max_pixels} "
                             "(raise max_pixels to decode it)")
    if header.payload_length % 4:
        raise BitstreamError("payload length is not a whole number of 32-bit words")
    return header, payload


def check_maker(header: Header, codec: str, manifest, model_digest: bytes) -> None:
    """Refuse, by name, a stream made by another codec, another model, or another export of this model (its
    networks' digest, from format 3)."""
    m = manifest
    if header.codec != codec:
        made = {"gq": f"holds GQ tokens of model {header.model_id!r}",
                "dvae": f"was made by the dvae codec of model {header.model_id!r}"}[header.codec]
        this = {"gq": "a GQ tokenizer", "dvae": "a dvae codec"}[codec]
        raise BitstreamError(f"stream {made}; model {m.model_id} is {this}: decode it with the model that made it")
    if header.model_id != m.model_id:
        raise BitstreamError(f"stream was made by model {header.model_id!r}, this is {m.model_id!r}")
    if header.version >= 3 and header.model_digest != model_digest:
        raise BitstreamError(f"stream was made by another export of model {m.model_id!r}: its networks' digest is "
                             f"{header.model_digest.hex()}, this model's is {model_digest.hex()} "
                             f"(version {m.model_version}); decode it with the model that made it")


def grid_fits(image_size, grid_hw, f: int) -> bool:
    """Is (h, w) the grid that padding an image of image_size up to multiples of f gives?"""
    return all((g - 1) * f < s <= g * f for s, g in zip(image_size, grid_hw))


def token_crc(ids: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(ids, dtype="<u4").tobytes())


# -- entropy coding ----------------------------------------------------------------------------------------------
def _coders():
    import constriction  # imported here: the rest of the contract needs only numpy

    return constriction.stream.queue, constriction.stream.model


def entropy_code(ids: np.ndarray, prior) -> np.ndarray:
    """int [T, h, w] -> uint32 words of a range coder, in the order entropy_decode reads them."""
    queue, model = _coders()
    enc = queue.RangeEncoder()
    ids = np.asarray(ids)
    if isinstance(prior, UniformPrior):
        enc.encode(ids.reshape(-1).astype(np.int32), model.Uniform(prior.num_codes))
    elif isinstance(prior, FrequencyPrior):
        probs = prior.probabilities()
        for t in range(ids.shape[0]):
            enc.encode(ids[t].reshape(-1).astype(np.int32), model.Categorical(probs[t], perfect=False))
    elif isinstance(prior, ContextPrior):
        categorical = model.Categorical(perfect=False)

        def code(cell_freq, symbols):  # symbols: the step's ids, coded in the order the decoder reads them
            cells = prior.cell_of[symbols]
            enc.encode(cells.astype(np.int32), categorical, cell_freq)

            def code_members(member_freq):
                enc.encode(prior.index_in_cell[symbols].astype(np.int32), categorical, member_freq)
                return symbols

            return cells, code_members

        _run_context(prior, ids.shape, ids, code)
    elif isinstance(prior, CircuitPrior):
        return prior.encode(ids)
    else:
        raise TypeError(f"not a prior: {prior!r}")
    return enc.get_compressed()


def entropy_decode(words: np.ndarray, prior, grid: tuple[int, int, int]) -> np.ndarray:
    """The inverse of entropy_code: uint32 words -> int64 [T, h, w]."""
    queue, model = _coders()
    dec = queue.RangeDecoder(np.asarray(words, dtype=np.uint32))
    t, h, w = grid
    if isinstance(prior, UniformPrior):
        ids = dec.decode(model.Uniform(prior.num_codes), t * h * w).reshape(t, h, w)
    elif isinstance(prior, FrequencyPrior):
        probs = prior.probabilities()
        ids = np.stack([dec.decode(model.Categorical(probs[s], perfect=False), h * w).reshape(h, w) for s in range(t)])
    elif isinstance(prior, ContextPrior):
        categorical = model.Categorical(perfect=False)
        ids = np.zeros(grid, dtype=np.int64)

        def code(cell_freq, _):
            cells = dec.decode(categorical, cell_freq).astype(np.int64)
            return cells, lambda member_freq: prior.cells[cells, dec.decode(categorical, member_freq)]

        _run_context(prior, grid, ids, code)
    elif isinstance(prior, CircuitPrior):
        ids = prior.decode(words, grid)
    else:
        raise TypeError(f"not a prior: {prior!r}")
    return np.asarray(ids, dtype=np.int64)


def _run_context(prior: ContextPrior, grid, ids: np.ndarray, code) -> None:
    """Walk the wavefront. At each step: the cells' frequencies from the decoded neighbours, then
    code(cell_freq, the step's ids) codes the cells and returns (cells, code_members), and code_members(member
    frequencies) codes the indices in the cells and returns the step's ids (the decoder fills ids with them).

    Encoder and decoder run this same loop; the prior's arithmetic is exact, so they compute the same
    frequencies whatever the shapes, threads or machine."""
    t, h, w = grid
    latent = np.zeros((prior.channels, h, w), dtype=np.float64)
    for rows, cols in wavefront(h, w):
        cell_freq, coef = prior.heads(prior.features(latent, rows, cols))
        cells, code_members = code(cell_freq, ids[:, rows, cols].T.reshape(-1))
        step_ids = np.asarray(code_members(prior.member_frequencies(coef, cells))).reshape(len(rows), t)
        ids[:, rows, cols] = step_ids.T
        latent[:, rows, cols] = prior.latent_of(step_ids).T


# -- compressing the grids of one model----------------------------------------------------------------------------------
class TokenCompressor:
    """Compress and decompress token grids of one loaded artifact with any of its priors."""

    def __init__(self, artifact, priors: dict | None = None):
        self.manifest = artifact.manifest
        self.priors = priors if priors is not None else load_priors(artifact)
        self.codebook_digest = bytes.fromhex(self.manifest.codebook.sha256)[:8]
        self.model_digest = bytes.fromhex(self.manifest.model_digest)[:8]

    @property
    def default_prior(self) -> str:
        """The strongest prior the model has: context, else frequency, else uniform."""
        return next(p for p in ("context", "frequency", "uniform") if p in self.priors)

    def compress(self, ids: np.ndarray, image_size: tuple[int, int], prior: str | None = None) -> bytes:
        m = self.manifest
        prior = prior or self.default_prior
        if prior not in self.priors:
            raise ValueError(f"model {m.model_id} has no {prior!r} prior; it has {', '.join(self.priors)}")
        ids = np.asarray(ids)
        if ids.ndim != 3 or ids.shape[0] != m.tokens_per_position or max(ids.shape[1:]) > MAX_GRID_SIDE:
            raise ValueError(f"token grid must be [{m.tokens_per_position}, h, w] with h, w <= {MAX_GRID_SIDE}; "
                             f"got {list(ids.shape)}")
        if ids.size == 0 or ids.min() < 0 or ids.max() >= m.num_codes:
            raise ValueError(f"token ids must lie in [0, {m.num_codes})")
        hh, ww = image_size
        if not grid_fits(image_size, ids.shape[1:], m.downsample):
            raise ValueError(f"image size {hh}x{ww} is not what a {ids.shape[1]}x{ids.shape[2]} grid at "
                             f"f={m.downsample} covers")
        p = self.priors[prior]
        payload = entropy_code(ids, p).astype("<u4").tobytes()
        header = Header(m.model_id, prior, self.codebook_digest, p.digest, (int(hh), int(ww)), tuple(ids.shape),
                        m.num_codes, token_crc(ids), len(payload), zlib.crc32(payload), self.model_digest)
        return header.pack() + payload

    def check(self, header: Header) -> None:
        """Refuse a header this model cannot decode, naming the mismatch."""
        m = self.manifest
        check_maker(header, "gq", m, self.model_digest)
        if header.codebook_digest != self.codebook_digest:
            raise BitstreamError(f"stream's codebook digest {header.codebook_digest.hex()} does not match model "
                                 f"{m.model_id}'s {self.codebook_digest.hex()}")
        if header.prior not in self.priors:
            raise BitstreamError(f"stream uses the {header.prior} prior, which model {m.model_id} does not have")
        if header.prior_digest != self.priors[header.prior].digest:
            raise BitstreamError(f"stream's {header.prior} prior ({header.prior_digest.hex()}) is not this model's "
                                 f"({self.priors[header.prior].digest.hex()}): the prior was refitted")
        t, h, w = header.grid
        if (t, header.num_codes) != (m.tokens_per_position, m.num_codes) or not grid_fits(
                header.image_size, (h, w), m.downsample):
            raise BitstreamError(f"header sizes (grid {list(header.grid)}, K {header.num_codes}, image "
                                 f"{header.image_size[0]}x{header.image_size[1]}) do not fit model {m.model_id}")

    def decompress(self, data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[np.ndarray, Header]:
        """bytes -> (int64 [T, h, w], header). BitstreamError on anything wrong, before or after decoding; a
        header naming more than `max_pixels` image pixels is refused before anything is allocated."""
        header, payload = open_stream(data, max_pixels)
        self.check(header)
        words = np.frombuffer(payload, dtype="<u4")
        try:
            ids = entropy_decode(words, self.priors[header.prior], header.grid)
        except Exception as e:  # the coder ran out of words or met an impossible state
            raise BitstreamError(f"payload does not decode with the {header.prior} prior: {e}") from None
        if token_crc(ids) != header.token_crc:
            raise BitstreamError(f"decoded tokens fail their checksum: the {header.prior} prior computed "
                                 "differently here than where the stream was made")
        return ids, header
