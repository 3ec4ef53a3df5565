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


# -- the codec model's streams (LatentCompressor, through service/compressor.CodecCompressor) ---------------------
@pytest.fixture(scope="module")
def codec(tiny_codec_model):
    from gqtok.service.compressor import load_compressor

    return load_compressor(str(tiny_codec_model), device="cpu")


@pytest.fixture(scope="module")
def codec_photo(small_photos):
    from gqtok.photos import center_crop, load_rgb

    return center_crop(load_rgb(sorted(small_photos.iterdir())[2]), (203, 301))  # not multiples of 8 or 32


@pytest.mark.slow  # trains the tiny codec
def test_codec_round_trip_at_every_quality(codec, codec_photo):
    """Each quality decodes to the original size, rates rise with quality, and the header says what made it."""
    from gqtok.core.bitstream import read_header

    sizes, errors = [], []
    for quality in (1, 2, 3):
        data = codec.compress(codec_photo, quality=quality)
        header = read_header(data)
        assert (header.codec, header.quality, header.prior, header.model_id) == ("dvae", quality, "hyperprior",
                                                                                 "tiny-codec")
        assert header.grid == (8, 26, 38) and header.image_size == (203, 301)
        image, back = codec.decompress(data)
        assert back == header and image.shape == codec_photo.shape and image.dtype == np.uint8
        sizes.append(len(data))
        errors.append(np.abs(image.astype(int) - codec_photo).mean())
    assert sizes[0] < sizes[-1], sizes  # lambda 0.002 .. 0.2: more bits at the top
    # and they buy fidelity: 30 steps leave the tiny codec far from trained and the margin depends on the CPU's
    # float paths (an AVX2 host: 9%), so only the order is asserted here; the bundled codec's margin is
    # (tests/test_default_model.py::test_bundled_codec_makes_and_decodes_the_recorded_streams)
    assert errors[-1] < errors[0], errors
    default = read_header(codec.compress(codec_photo))
    assert default.quality == codec.manifest.codec.default_quality == 2


@pytest.mark.slow  # trains the tiny codec
def test_codec_refuses_what_it_cannot_code(codec, codec_photo, tiny_model, tiny_codec_model):
    from gqtok.core.artifact import ArtifactError, load_artifact
    from gqtok.service.compressor import ImageCompressor
    from gqtok.service.runtime import TokenizerRuntime

    for bad in (0, 4, 2.5):
        with pytest.raises(ValueError, match="quality must be an integer from 1 .* to 3"):
            codec.compress(codec_photo, quality=bad)
    with pytest.raises(ValueError, match="not the 'context' prior"):
        codec.compress(codec_photo, prior="context")
    with pytest.raises(ValueError, match="GQ tokenizer: it compresses at one rate"):
        ImageCompressor(load_artifact(tiny_model)).compress(codec_photo, quality=2)
    with pytest.raises(ArtifactError, match="tiny-codec is a codec model and cannot be used for tokenizing"):
        TokenizerRuntime(load_artifact(tiny_codec_model))


@pytest.mark.slow  # trains the tiny codec
def test_streams_are_decoded_only_by_the_model_and_codec_that_made_them(codec, codec_photo, tiny_model,
                                                                        tiny_codec_model, tmp_path):
    """A codec stream through a tokenizer, a token stream through the codec, a re-exported codec (same id, other
    networks), a forged quality and a corrupted payload: each refused, by name, never decoded into noise."""
    import dataclasses
    import json
    import shutil

    import onnx

    from gqtok.core.artifact import load_artifact
    from gqtok.core.bitstream import BitstreamError, Header
    from gqtok.core.manifest import Manifest, file_sha256
    from gqtok.service.compressor import CodecCompressor, ImageCompressor

    data = codec.compress(codec_photo, quality=2)
    tokens = ImageCompressor(load_artifact(tiny_model))
    with pytest.raises(BitstreamError, match="made by the dvae codec of model 'tiny-codec'"):
        tokens.decompress(data)
    with pytest.raises(BitstreamError, match="holds GQ tokens of model 'tiny'"):
        codec.decompress(tokens.compress(codec_photo))
    # the same id and files but for one network changed: another model digest
    other = tmp_path / "tiny-codec"
    shutil.copytree(tiny_codec_model, other)
    manifest = json.loads((other / "manifest.json").read_text())
    graph = onnx.load(str(other / "decoder.onnx"))
    graph.doc_string = "another export"  # other bytes, the same network: enough for another digest
    onnx.save(graph, str(other / "decoder.onnx"))
    manifest["files"]["decoder.onnx"] = file_sha256(other / "decoder.onnx")
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert Manifest.read(other).model_digest != codec.manifest.model_digest
    with pytest.raises(BitstreamError, match="another export of model 'tiny-codec'"):
        CodecCompressor(load_artifact(other)).latents.decompress(data)

    header, payload = Header.unpack(data)
    forged = dataclasses.replace(header, quality=7).pack() + payload
    with pytest.raises(BitstreamError, match="quality 7"):
        codec.decompress(forged)
    corrupted = bytearray(data)
    corrupted[-3] ^= 0x20
    with pytest.raises(BitstreamError, match="payload checksum"):
        codec.decompress(bytes(corrupted))
    lying = dataclasses.replace(header, payload_crc=0).pack()  # header checksum right, payload checksum wrong
    with pytest.raises(BitstreamError):
        codec.decompress(lying + payload)
    too_big = dataclasses.replace(header, image_size=(40000, 40000), grid=(8, 5000, 5000)).pack() + payload
    with pytest.raises(BitstreamError, match="pixels; the limit is"):
        codec.decompress(too_big)


CODEC_IN_A_SUBPROCESS = """
import hashlib, sys
import numpy as np
from gqtok.service.compressor import load_compressor

codec = load_compressor(sys.argv[1], device="cpu")
photo, streams = np.load(sys.argv[2]), np.load(sys.argv[3])
for quality in (1, 2, 3):
    print(hashlib.sha256(codec.compress(photo, quality=quality)).hexdigest())
    print(hashlib.sha256(codec.decompress(streams[f"q{quality}"].tobytes())[0].tobytes()).hexdigest())
"""


@pytest.mark.slow  # trains the tiny codec
def test_codec_streams_are_the_same_bytes_and_pixels_under_every_blas_kernel_thread_count_and_simd_setting(
        codec, codec_photo, tiny_codec_model, tmp_path):
    """Compress at every quality here, then in subprocesses under other OpenBLAS kernels, thread counts and numpy
    SIMD features: the same bytes, and this process's streams decode to the same pixels."""
    import hashlib

    from conftest import run_under_each_env

    streams = {f"q{q}": codec.compress(codec_photo, quality=q) for q in (1, 2, 3)}
    want = [h for q in (1, 2, 3) for h in (hashlib.sha256(streams[f"q{q}"]).hexdigest(),
                                           hashlib.sha256(codec.decompress(streams[f"q{q}"])[0].tobytes()).hexdigest())]
    np.save(tmp_path / "photo.npy", codec_photo)
    np.savez(tmp_path / "streams.npz", **{k: np.frombuffer(v, np.uint8) for k, v in streams.items()})
    script = tmp_path / "codec_hashes.py"
    script.write_text(CODEC_IN_A_SUBPROCESS)
    outputs = run_under_each_env(script, tiny_codec_model, tmp_path / "photo.npy", tmp_path / "streams.npz")
    assert all(out == want for out in outputs), (want, outputs)


@pytest.mark.slow  # trains the tiny codec
def test_cli_compress_at_a_quality_and_decompress_by_the_header(codec, codec_photo, tiny_codec_model, tiny_model,
                                                                 tmp_path, capsys):
    import json

    from PIL import Image

    from gqtok.cli import main

    src = tmp_path / "photo.png"
    Image.fromarray(codec_photo).save(src)
    main(["compress", str(src), "-o", str(tmp_path / "p.gqt"), "--model", str(tiny_codec_model), "--quality", "3"])
    report = json.loads(capsys.readouterr().out)
    data = (tmp_path / "p.gqt").read_bytes()
    assert (report["codec"], report["quality"], report["bytes"]) == ("dvae", 3, len(data))
    assert data == codec.compress(codec_photo, quality=3)
    # decompress finds the codec among the models offered by the header's id
    main(["decompress", str(tmp_path / "p.gqt"), "-o", str(tmp_path / "back.png"), "--model", str(tiny_model),
          "--model", str(tiny_codec_model)])
    assert json.loads(capsys.readouterr().out)["quality"] == 3
    assert np.array_equal(np.asarray(Image.open(tmp_path / "back.png")), codec.decompress(data)[0])
    for args, message in (([str(tiny_codec_model), "--quality", "9"], "quality must be an integer from 1"),
                          ([str(tiny_model), "--quality", "2"], "GQ tokenizer: it compresses at one rate")):
        with pytest.raises(SystemExit):
            main(["compress", str(src), "-o", str(tmp_path / "x.gqt"), "--force", "--model", *args])
        assert message in capsys.readouterr().err
