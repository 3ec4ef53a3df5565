"""gqtok/core/bitstream.py: the compressed format round-trips bit-exactly and refuses anything it cannot decode."""

import dataclasses
import math
import struct
import zlib

import numpy as np
import pytest

from gqtok.core.artifact import load_artifact
from gqtok.core.bitstream import FORMAT_VERSION, BitstreamError, TokenCompressor, Header, grid_fits, read_header
from gqtok.service.compressor import ImageCompressor

pytestmark = pytest.mark.slow
PRIORS = ("uniform", "frequency", "context", "pc")


@pytest.fixture(scope="module")
def image_compressor(tiny_model):
    return ImageCompressor(load_artifact(tiny_model))


@pytest.fixture(scope="module")
def photo(small_photos):
    from gqtok.photos import load_rgb

    return load_rgb(sorted(small_photos.iterdir())[0])[:203, :301]  # neither side a multiple of 8


@pytest.fixture(scope="module")
def photo_ids(image_compressor, photo):
    from gqtok.core.layout import fit_to_grid

    return image_compressor.runtime.tokenize(fit_to_grid(photo, 8, "pad")[None])[0]


def test_the_tiny_model_has_every_prior(image_compressor):
    assert image_compressor.priors == list(PRIORS)
    assert image_compressor.tokens.default_prior == "context"


@pytest.mark.parametrize("prior", PRIORS)
def test_photo_tokens_round_trip_bit_exactly(image_compressor, photo, photo_ids, prior):
    data = image_compressor.tokens.compress(photo_ids, photo.shape[:2], prior)
    ids, header = image_compressor.tokens.decompress(data)
    assert ids.dtype == np.int64 and np.array_equal(ids, photo_ids)
    assert (header.prior, header.image_size, header.grid, header.model_id) == (prior, (203, 301), (2, 26, 38), "tiny")
    assert header.total_bytes == len(data)


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("shape", [(2, 1, 1), (2, 1, 7), (2, 9, 1), (2, 5, 13)])
def test_random_tokens_round_trip_even_where_the_prior_finds_them_unlikely(image_compressor, prior, shape):
    ids = np.random.default_rng(sum(shape)).integers(0, 256, shape)
    data = image_compressor.tokens.compress(ids, (shape[1] * 8 - 3, shape[2] * 8), prior)
    assert np.array_equal(image_compressor.tokens.decompress(data)[0], ids)


def test_image_round_trip_matches_tokenize_then_detokenize(image_compressor, photo, photo_ids):
    image, header = image_compressor.decompress(image_compressor.compress(photo))
    expected = image_compressor.runtime.detokenize(photo_ids[None])[0, :203, :301]
    assert image.shape == photo.shape and np.array_equal(image, expected)
    assert header.prior == "context"


def test_uniform_costs_log2_k_bits_and_fitted_priors_cost_less(image_compressor, photo, photo_ids):
    sizes = {p: len(image_compressor.tokens.compress(photo_ids, photo.shape[:2], p)) for p in PRIORS}
    header_bytes = sizes["uniform"] - read_header(image_compressor.tokens.compress(photo_ids, photo.shape[:2], "uniform")).payload_length
    tokens = photo_ids.size
    assert abs(8 * (sizes["uniform"] - header_bytes) - tokens * math.log2(256)) <= 64  # range coder: a word or two
    assert sizes["context"] < sizes["frequency"] < sizes["uniform"] and sizes["pc"] < sizes["uniform"]


def _repack(data: bytes, **changes) -> bytes:
    """The stream with header fields changed and its checksums recomputed (a well-formed lie)."""
    header, payload = Header.unpack(data)
    return dataclasses.replace(header, **changes).pack() + payload


def test_corrupted_truncated_and_foreign_streams_are_refused(image_compressor, photo, photo_ids, tiny_model):
    data = image_compressor.tokens.compress(photo_ids, photo.shape[:2], "context")
    flipped_payload = bytearray(data)
    flipped_payload[-5] ^= 0x10
    flipped_header = bytearray(data)
    flipped_header[20] ^= 0x01
    cases = {
        bytes(flipped_payload): "payload checksum mismatch",
        bytes(flipped_header): "header checksum mismatch",
        data[:-3]: "truncated",
        data[:30]: "truncated header",
        data + b"\0\0\0\0": "trailing bytes",
        b"": "no GQTK magic",
        (tiny_model / "manifest.json").read_bytes(): "no GQTK magic",
        b"GQTK" + bytes([FORMAT_VERSION + 1]) + data[5:]: f"format version {FORMAT_VERSION + 1}",
        b"GQTK" + bytes([FORMAT_VERSION, 9]) + data[6:]: "unknown prior id 9",
    }
    for stream, message in cases.items():
        with pytest.raises(BitstreamError, match=message):
            image_compressor.tokens.decompress(stream)


def test_the_header_is_checked_against_the_loaded_model(image_compressor, photo, photo_ids):
    tokens = image_compressor.tokens
    data = tokens.compress(photo_ids, photo.shape[:2], "frequency")
    cases = {
        _repack(data, model_id="other"): "made by model 'other'",
        _repack(data, codebook_digest=b"\1" * 8): "codebook digest",
        _repack(data, prior_digest=b"\1" * 8): "prior was refitted",
        _repack(data, grid=(1, 26, 38)): "do not fit model tiny",
        _repack(data, image_size=(150, 301)): "do not fit model tiny",  # 26 rows of 8 are more than 150 needs
        _repack(data, num_codes=512): "do not fit model tiny",
        _repack(data, token_crc=data[-1]): "fail their checksum",  # as if the prior computed differently
    }
    for stream, message in cases.items():
        with pytest.raises(BitstreamError, match=message):
            tokens.decompress(stream)


def test_a_stream_from_another_model_names_both_models(photo, photo_ids, image_compressor):
    default = TokenCompressor(load_artifact("models/default"))
    with pytest.raises(BitstreamError, match="made by model 'tiny', this is 'gqtok-default'"):
        default.decompress(image_compressor.tokens.compress(photo_ids, photo.shape[:2]))


def test_encode_refuses_grids_and_sizes_that_do_not_fit(image_compressor, photo_ids):
    tokens = image_compressor.tokens
    with pytest.raises(ValueError, match=r"token grid must be \[2, h, w\]"):
        tokens.compress(photo_ids[:1], (203, 301))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\)"):
        tokens.compress(photo_ids + 256, (203, 301))
    with pytest.raises(ValueError, match="is not what a 26x38 grid"):
        tokens.compress(photo_ids, (100, 301))
    with pytest.raises(ValueError, match="has no 'arithmetic' prior"):
        tokens.compress(photo_ids, (203, 301), "arithmetic")


CODEC_IN_A_SUBPROCESS = """
import hashlib, sys
import numpy as np
from gqtok.core.artifact import load_artifact
from gqtok.service.compressor import ImageCompressor

codec = ImageCompressor(load_artifact(sys.argv[1]))
photo, streams = np.load(sys.argv[2]), np.load(sys.argv[3])
for prior in ("uniform", "frequency", "context", "pc"):
    print(hashlib.sha256(codec.compress(photo, prior)).hexdigest())
    print(hashlib.sha256(codec.decompress(streams[prior].tobytes())[0].tobytes()).hexdigest())
"""


@pytest.mark.parametrize("model", ["tiny", "default"])
def test_streams_are_the_same_bytes_and_pixels_under_every_blas_kernel_thread_count_and_simd_setting(
        model, tiny_model, small_photos, tmp_path):
    """Compress with every prior here, then in subprocesses under different OpenBLAS kernels, thread counts and
    numpy SIMD features: each compresses the photo to the same bytes and decompresses this process's streams to
    the same pixels."""
    import hashlib

    from conftest import run_under_each_env
    from gqtok.photos import center_crop, load_rgb

    model_dir = tiny_model if model == "tiny" else "models/default"
    codec = ImageCompressor(load_artifact(model_dir))
    photo = center_crop(load_rgb(sorted(small_photos.iterdir())[1]), (200, 296))  # not a multiple of 8 wide
    streams = {p: codec.compress(photo, p) for p in PRIORS}
    want = [h for p in PRIORS for h in (hashlib.sha256(streams[p]).hexdigest(),
                                        hashlib.sha256(codec.decompress(streams[p])[0].tobytes()).hexdigest())]
    np.save(tmp_path / "photo.npy", photo)
    np.savez(tmp_path / "streams.npz", **{p: np.frombuffer(s, np.uint8) for p, s in streams.items()})
    script = tmp_path / "codec_hashes.py"
    script.write_text(CODEC_IN_A_SUBPROCESS)
    outputs = run_under_each_env(script, model_dir, tmp_path / "photo.npy", tmp_path / "streams.npz")
    assert all(out == want for out in outputs), (want, outputs)


def test_version_1_streams_decode_where_they_were_exact_and_are_refused_by_name_where_not(
        image_compressor, photo, photo_ids):
    tokens = image_compressor.tokens
    for prior in ("uniform", "frequency"):  # coded the same way in both versions
        old = _repack(tokens.compress(photo_ids, photo.shape[:2], prior), version=1)
        assert np.array_equal(tokens.decompress(old)[0], photo_ids)
    old_context = _repack(tokens.compress(photo_ids, photo.shape[:2], "context"), version=1)
    with pytest.raises(BitstreamError, match="version 1 stream with the context prior.*does not decode portably"):
        tokens.decompress(old_context)


def test_header_layout_is_stable():
    """The byte layout is the format: a change here must bump FORMAT_VERSION."""
    h = Header("m1", "frequency", b"\xaa" * 8, b"\xbb" * 8, (17, 9), (1, 3, 2), 256, 7, 8, 9, b"\xcc" * 8)
    packed = h.pack()
    assert packed[:8] == b"GQTK\x04\x01\x02m" and packed[8:9] == b"1"
    assert packed[9:11] == b"\x00\x00"  # codec gq, no quality
    assert packed[11:35] == b"\xaa" * 8 + b"\xbb" * 8 + b"\xcc" * 8
    assert struct.unpack_from("<II", packed, 35) == (17, 9)
    assert struct.unpack("<I", packed[-4:])[0] == zlib.crc32(packed[:-4])
    assert len(packed) == 7 + 2 + 2 + 24 + 8 + 6 + 4 * 4 + 4
    dvae = dataclasses.replace(h, codec="dvae", quality=5, prior="hyperprior", payload_length=4,
                               payload_crc=zlib.crc32(b"abcd"))
    packed_dvae = dvae.pack()
    assert packed_dvae[5] == 3 and packed_dvae[9:11] == b"\x01\x05"
    assert Header.unpack(packed_dvae + b"abcd") == (dvae, b"abcd")
    for lie in (dataclasses.replace(dvae, prior="context"), dataclasses.replace(dvae, codec="gq")):
        with pytest.raises(BitstreamError, match="cannot use the .* prior"):
            Header.unpack(lie.pack() + b"abcd")
    # version 3, as written until the codec byte: the digests right after the model id
    v3 = dataclasses.replace(h, version=3).pack()
    assert v3[4] == 3 and v3[9:33] == packed[11:35] and len(v3) == len(packed) - 2
    # version 2, as written until the model digest: no digest, the sizes right after the prior's digest
    v2 = dataclasses.replace(h, model_digest=b"", version=2).pack()
    assert v2[4] == 2 and struct.unpack_from("<II", v2, 25) == (17, 9) and len(v2) == len(v3) - 8


def test_another_export_under_the_same_id_is_refused_by_digest(tiny_model, tiny_model_reexport, photo, photo_ids):
    """Same id, version and codebook, other networks: the stream names both digests instead of decoding."""
    from gqtok.core.bitstream import TokenCompressor

    ours, theirs = (TokenCompressor(load_artifact(d)) for d in (tiny_model, tiny_model_reexport))
    assert ours.manifest.model_id == theirs.manifest.model_id and ours.codebook_digest == theirs.codebook_digest
    assert ours.manifest.model_version == theirs.manifest.model_version
    data = ours.compress(photo_ids, photo.shape[:2], "uniform")
    with pytest.raises(BitstreamError, match=f"another export of model 'tiny'.*{ours.model_digest.hex()}.*"
                                             f"{theirs.model_digest.hex()}"):
        theirs.decompress(data)
    assert np.array_equal(ours.decompress(data)[0], photo_ids)
    # a version 2 stream carries no model digest: it is checked against what it does carry, and decodes
    assert np.array_equal(theirs.decompress(_repack(data, version=2, model_digest=b""))[0], photo_ids)


def test_grid_fits_is_the_pad_rule():
    assert grid_fits((203, 301), (26, 38), 8) and grid_fits((8, 8), (1, 1), 8)
    assert not grid_fits((200, 301), (26, 38), 8) and not grid_fits((9, 8), (1, 1), 8)


def test_cli_compress_and_decompress(tiny_model, photo, tmp_path, capsys):
    import json

    from PIL import Image

    from gqtok.cli import main

    src = tmp_path / "photo.png"
    Image.fromarray(photo).save(src)
    main(["compress", str(src), "-o", str(tmp_path / "p.gqt"), "--model", str(tiny_model), "--prior", "frequency"])
    report = json.loads(capsys.readouterr().out)
    data = (tmp_path / "p.gqt").read_bytes()
    assert report["bytes"] == len(data) and report["prior"] == "frequency" and report["image_size"] == [203, 301]
    assert report["bits_per_pixel"] == pytest.approx(8 * len(data) / (203 * 301), abs=1e-4)
    main(["decompress", str(tmp_path / "p.gqt"), "-o", str(tmp_path / "back.png"), "--model", str(tiny_model)])
    back = np.asarray(Image.open(tmp_path / "back.png"))
    assert np.array_equal(back, ImageCompressor(load_artifact(tiny_model)).decompress(data)[0])
    # the header names the model: decompressing with another model's directory says which one it needs
    with pytest.raises(SystemExit):
        main(["decompress", str(tmp_path / "p.gqt"), "--model", "models/default"])
    assert "made by model 'tiny'" in capsys.readouterr().err


def test_cli_and_library_refuse_what_they_cannot_hold(tiny_model, photo, tmp_path, capsys):
    """The CLI caps pixels as the server does, before decoding; a crafted header naming a huge image is refused
    by the library before anything is allocated; no existing file is overwritten without --force."""
    from PIL import Image

    from gqtok.cli import main

    src = tmp_path / "photo.png"
    Image.fromarray(photo).save(src)
    out = tmp_path / "p.gqt"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit):
        main(["compress", str(src), "-o", str(out), "--model", str(tiny_model)])
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    with pytest.raises(SystemExit):
        main(["compress", str(src), "-o", str(out), "--model", str(tiny_model), "--force", "--max-pixels", "1000"])
    assert "301x203 = 61103 pixels; the limit is 1000" in capsys.readouterr().err
    main(["compress", str(src), "-o", str(out), "--model", str(tiny_model), "--force"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["decompress", str(out), "--model", str(tiny_model), "--max-pixels", "1000", "-o", str(tmp_path / "b.png")])
    assert "the limit is 1000" in capsys.readouterr().err and not (tmp_path / "b.png").exists()

    codec = ImageCompressor(load_artifact(tiny_model))
    header, payload = Header.unpack(out.read_bytes())
    huge = dataclasses.replace(header, image_size=(65000, 65000), grid=(header.grid[0], 8125, 8125))
    with pytest.raises(BitstreamError, match="4225000000 pixels; the limit is 1048576"):
        codec.decompress(huge.pack() + payload)
