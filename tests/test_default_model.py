"""The embedded default model: `gqtok serve` with no arguments serves it (the README's first command)."""

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from gqtok.core.artifact import load_artifact
from gqtok.core.models import find_model
from gqtok import photos as photo_files

DEFAULT = Path(__file__).resolve().parents[1] / "models" / "default"  # the committed files, as checked in
pytestmark = pytest.mark.slow


def test_embedded_model_is_complete_and_small():
    art = load_artifact(DEFAULT)  # every digest and the codebook check out
    m = art.manifest
    assert (m.downsample, m.latent_channels, m.token_dim, m.num_codes) == (8, 16, 16, 2**16)
    assert sum(p.stat().st_size for p in DEFAULT.iterdir()) <= 40 * 2**20
    assert m.eval and m.eval["quantized"]["psnr"] > 15
    # trained, or (0.5.0: an output setting changed with no steps) made from a trained run, which it names
    assert m.training["step"] > 0 or m.training["train"]["init_from"]


def test_serve_with_no_arguments_tokenizes_a_photo(start_server, photos_dir):
    server = start_server([])  # no --model: models/default
    meta = httpx.get(f"{server.url}/v1/models").json()
    assert meta["default"] == json.loads((DEFAULT / "manifest.json").read_text())["model_id"]
    _, held = photo_files.split_heldout(photo_files.list_images(photos_dir))
    img = photo_files.center_crop(photo_files.load_rgb(held[0]), (256, 256))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    r = httpx.post(f"{server.url}/v1/tokenize", content=buf.getvalue(), headers={"content-type": "image/png"},
                   timeout=60)
    assert r.status_code == 200
    tokens = np.array(r.json()["results"][0]["tokens"])
    assert tokens.shape == (32, 32) and tokens.max() < 2**16  # 1024 tokens for a 256x256 photo
    r = httpx.post(f"{server.url}/v1/detokenize", json={"tokens": tokens.tolist()}, timeout=60)
    recon = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(float)
    assert 10 * np.log10(255**2 / np.mean((recon - img) ** 2)) > 15


def memory_cgroup(name: str, limit_bytes: int) -> Path | None:
    """A memory cgroup with a hard limit (the kernel kills what passes it, as in a container), or None where this
    process may not make one (not root, no memory controller)."""
    for root, limit_file in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),  # cgroup v1
                             (Path("/sys/fs/cgroup"), "memory.max")):  # cgroup v2
        group = root / name
        try:
            group.mkdir(exist_ok=True)
            (group / limit_file).write_text(str(limit_bytes))
            return group
        except OSError:
            continue
    return None


def test_ten_rounds_of_a_megapixel_photo_stay_under_2_gib_and_do_not_grow(photos_dir):
    """The reliability target with default settings: ten rounds of tokenize + detokenize of a 1440x720 photo
    (under the default 1 MP limit) peak under 2 GiB resident, memory after the last round is not above memory
    after the first by more than 10%, and a server in a memory cgroup limited to 2 GiB (what a container with
    `--memory 2g` gets) survives them. benchmarks/memory.py reports the same figures."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import wait_until_ready

    sys.path.insert(0, str(DEFAULT.parents[1]))
    from benchmarks import memory

    group = memory_cgroup(f"gqtok-test-{os.getpid()}", 2 * 2**30)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    join = f"echo $$ > {group}/cgroup.procs && " if group else ""
    proc = subprocess.Popen(["sh", "-c", f"{join}exec {sys.executable} -m gqtok.cli serve --port {port} "
                             "--log-level warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def alive():
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")

        wait_until_ready(url, 120, alive)
        result = memory.rounds(url, proc.pid, memory.photo(720, 1440), 10)
        assert proc.poll() is None, "the server died during the rounds"
        assert result["peak_mib"] < 2048, result
        assert result["last_over_warm"] <= 1.10, result  # rounds 4-10 against the first three's largest
        if group is None:
            pytest.skip(f"no memory cgroup could be made here (needs root); peak {result['peak_mib']} MiB measured")
    finally:
        proc.terminate()
        proc.wait(60)
        if group is not None:
            group.rmdir()


# -- behaviour pinned across refactors ----------------------------------------------------------------------------
# tests/fixtures/behaviour_default_model.npz holds two crops of a held-out photo (96x128, and 72x100 which pads to
# 72x104), their tokens, their decoded pixels and their compressed bytes under each prior, recorded by
# tests/fixtures/record_default_model.py when the default model last changed. The same machine kind must
# reproduce them exactly.
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "behaviour_default_model.npz"


@pytest.fixture(scope="module")
def recorded():
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("selector", ["exact", "onnx"])
def test_same_tokens_and_pixels_as_recorded(recorded, selector):
    from gqtok.core.layout import fit_to_grid
    from gqtok.service.runtime import TokenizerRuntime

    rt = TokenizerRuntime(load_artifact(find_model()), device="cpu", selector=selector)
    for name in ("a", "b"):
        ids = rt.tokenize(fit_to_grid(recorded[f"{name}_image"], 8, "pad")[None])
        assert np.array_equal(ids, recorded[f"{name}_tokens"]), (name, selector)
        assert np.array_equal(rt.detokenize(ids)[0], recorded[f"{name}_pixels"]), (name, selector)


def test_same_compressed_bytes_as_recorded(recorded):
    from threadpoolctl import threadpool_limits

    from gqtok.service.compressor import ImageCompressor

    compressor = ImageCompressor(load_artifact(find_model()))
    with threadpool_limits(1, user_api="blas"):  # as the server and the CLI code (one_blas_thread)
        check_compressed_bytes(compressor, recorded)


def check_compressed_bytes(compressor, recorded):
    for name in ("a", "b"):
        img = recorded[f"{name}_image"]
        for prior in ("uniform", "frequency", "context"):
            data = compressor.compress(img, prior)
            assert data == recorded[f"{name}_{prior}"].tobytes(), (name, prior)
            decoded, _ = compressor.decompress(data)
            assert np.array_equal(decoded, recorded[f"{name}_pixels"][: img.shape[0], : img.shape[1]])


def test_streams_of_older_formats_still_decode_to_the_recorded_pixels(recorded):
    """The streams recorded in formats 1 to 3 (the same payloads under the older headers) decode with today's
    reader."""
    from gqtok.service.compressor import ImageCompressor

    compressor = ImageCompressor(load_artifact(find_model()))
    older = [k for k in recorded if "_v" in k and not k.startswith("replaced")]
    assert {k.split("_v")[-1] for k in older} == {"1", "2", "3"} and len(older) == 16
    for key in older:
        name = key.split("_")[0]
        assert recorded[key][4] == int(key.split("_v")[-1])  # the format version byte
        decoded, _ = compressor.decompress(recorded[key].tobytes())
        h, w = recorded[f"{name}_image"].shape[:2]
        assert np.array_equal(decoded, recorded[f"{name}_pixels"][:h, :w]), key


def test_streams_of_the_replaced_default_model_are_refused_by_name(recorded):
    """The default model before this one made the replaced_* streams (same model id): the model digest and the
    prior files' digests in their headers tell them apart, so they are refused, never decoded into other pixels."""
    from gqtok.core.bitstream import BitstreamError
    from gqtok.service.compressor import ImageCompressor

    compressor = ImageCompressor(load_artifact(find_model()))
    replaced = [k for k in recorded if k.startswith("replaced_")]
    assert len(replaced) >= 6
    for key in replaced:
        with pytest.raises(BitstreamError, match="model|prior"):
            compressor.decompress(recorded[key].tobytes())


def test_the_server_answers_the_recorded_tokens_and_bytes(start_server, recorded):
    server = start_server([])
    for name in ("a", "b"):
        buf = io.BytesIO()
        Image.fromarray(recorded[f"{name}_image"]).save(buf, format="PNG")
        r = httpx.post(f"{server.url}/v1/tokenize", content=buf.getvalue(),
                       headers={"content-type": "image/png", "accept": "application/x-npy"}, timeout=60)
        assert np.array_equal(np.load(io.BytesIO(r.content)), recorded[f"{name}_tokens"])
        r = httpx.post(f"{server.url}/v1/compress?prior=context", content=buf.getvalue(),
                       headers={"content-type": "image/png"}, timeout=60)
        assert r.content == recorded[f"{name}_context"].tobytes()


def test_bundled_model_is_found_outside_the_repository(tmp_path, monkeypatch):
    from gqtok.core.models import bundled_models_dir, find_model as find

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GQTOK_HOME", str(tmp_path / "home"))
    assert find() == bundled_models_dir() / "default"
    assert find("gqtok-default") == bundled_models_dir() / "default"  # by model id
    user = tmp_path / "home" / "models" / "default"  # the user data directory comes first
    user.mkdir(parents=True)
    (user / "manifest.json").write_text(json.dumps({"model_id": "mine"}))
    assert find() == user and find("mine") == user
    with pytest.raises(FileNotFoundError, match="no model 'nope'"):
        find("nope")


# -- the bundled codec (models/codec), pinned the same way: behaviour_codec_model.npz -------------------------------
CODEC_FIXTURE = FIXTURE.with_name("behaviour_codec_model.npz")


def test_bundled_codec_makes_and_decodes_the_recorded_streams():
    """The bundled codec compresses crop a to the recorded bytes at qualities 1, 3, 6 and decodes them to the
    recorded pixels (within one level on another CPU: the comment below); its rates and fidelity rise with
    quality. (Re-record after re-exporting the codec: python tests/fixtures/record_default_model.py codec.)"""
    from gqtok.core.bitstream import read_header
    from gqtok.service.compressor import load_compressor

    with np.load(CODEC_FIXTURE) as z:
        recorded = {k: z[k] for k in z.files}
    codec = load_compressor("codec", device="cpu")
    assert recorded["model_digest"].tobytes().decode() == codec.manifest.model_digest, \
        "models/codec changed: re-record tests/fixtures/behaviour_codec_model.npz"
    sizes, errors = [], []
    for q in (1, 3, 6):
        data = codec.compress(recorded["image"], quality=q)
        assert data == recorded[f"q{q}_stream"].tobytes(), q
        assert read_header(data).quality == q
        # the bytes are exact on any machine; the pixels come from the float32 synthesis network, which another
        # CPU's SIMD path rounds differently (docs/compression.md): an AVX2 host put 1 value of 36,864 one level
        # off the recording (made on an AVX-512 host)
        pixels = codec.decompress(data)[0].astype(int)
        diff = np.abs(pixels - recorded[f"q{q}_pixels"])
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.001 * diff.size, (q, diff.max(), np.count_nonzero(diff))
        sizes.append(len(data))
        errors.append(np.square(pixels - recorded["image"]).mean())
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.5 * errors[0], errors  # the bits buy fidelity


# -- the bundled 256-token model (models/f16), beside the default ----------------------------------------------------
F16 = DEFAULT.with_name("f16")


def test_the_256_token_model_is_complete_and_models_stay_under_40_mb():
    art = load_artifact(F16)
    m = art.manifest
    assert (m.downsample, m.token_dim, m.num_codes, m.tokens_per_position) == (16, 16, 2**16, 1)
    assert m.model_id == "gqtok-f16" and m.training["model"]["norm"] == "fixed"
    bundled = [p for d in DEFAULT.parent.iterdir() if d.is_dir() for p in d.iterdir()]
    assert sum(p.stat().st_size for p in bundled) <= 40 * 2**20


def test_both_models_by_name_in_every_front_end(start_server, photos_dir, small_photos, tmp_path):
    """gqtok serve with both models lists both; the server, the client, the in-process API and gqtok tokenize each
    take either by name: a 256x256 photo is 256 tokens with gqtok-f16 and 1,024 with the default, the same
    tokens everywhere."""
    import subprocess
    import sys

    from gqtok import Tokenizer
    from gqtok.core.shards import TokenShards
    from gqtok.service.client import TokenizerClient

    _, held = photo_files.split_heldout(photo_files.list_images(photos_dir))
    img = photo_files.center_crop(photo_files.load_rgb(held[0]), (256, 256))
    server = start_server(["default", "f16"])
    listed = httpx.get(f"{server.url}/v1/models").json()
    assert {m["model_id"] for m in listed["models"]} == {"gqtok-default", "gqtok-f16"}
    expected = {"gqtok-default": (32, 32), "gqtok-f16": (16, 16)}
    with TokenizerClient(server.url) as client:
        for model_id, grid in expected.items():
            local = Tokenizer.load(model_id, device="cpu").encode(img)
            assert local.shape == (1, 1, *grid)
            assert np.array_equal(client.tokenize(img, model=model_id), local)
            if model_id == "gqtok-f16":  # decoded back to a picture of the same size, and close to it
                recon = np.asarray(client.detokenize(local[0], model=model_id)[0].convert("RGB"), float)
                assert recon.shape == img.shape and 10 * np.log10(255**2 / np.mean((recon - img) ** 2)) > 20
    photo_dir = tmp_path / "in"
    photo_dir.mkdir()
    Image.fromarray(img).save(photo_dir / "photo.png")
    subprocess.run([sys.executable, "-m", "gqtok.cli", "tokenize", str(photo_dir), "--out", str(tmp_path / "out"),
                    "--model", "f16", "--size", "256"], check=True, capture_output=True, timeout=300)
    shards = TokenShards(tmp_path / "out")
    assert shards.meta["model"]["model_id"] == "gqtok-f16"
    assert np.array_equal(shards.grids()[0], Tokenizer.load("f16", device="cpu").encode(img)[0])
    # the generator tokenizes through the server with the model it is told, not the server's default
    from gqtok.generator.train import train_generator

    summary = train_generator(tmp_path / "gen", server.url, small_photos, {"grid": (2, 2), "n_layer": 2, "n_embd": 64},
                              {"steps": 2, "batch_size": 4, "crops_per_photo": 1, "eval_every": 2}, progress=False,
                              tokenizer_model="gqtok-f16")
    f16 = load_artifact(F16).manifest
    assert (summary["tokenizer"]["tokenizer_model"], summary["tokenizer"]["model_version"]) == (
        "gqtok-f16", f16.model_version)
