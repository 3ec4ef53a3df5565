"""The service over real HTTP: a real uvicorn serving a tiny model trained and exported by our code."""

from __future__ import annotations

import base64
import hashlib
import io
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import wait_until_ready
from gqtok.core.artifact import load_artifact
from gqtok.service.runtime import TokenizerRuntime
from gqtok import photos as photo_files

pytestmark = pytest.mark.slow
NPY = "application/x-npy"


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@pytest.fixture(scope="module")
def photos(photos_dir) -> list[np.ndarray]:
    """16 different real photo crops, 64x96 (a multiple of f=8)."""
    paths = photo_files.list_images(photos_dir)[::15][:16]
    return [photo_files.center_crop(photo_files.load_rgb(p), (64, 96)) for p in paths]


def tokenize_npy(url: str, img: np.ndarray, **params) -> np.ndarray:
    r = httpx.post(f"{url}/v1/tokenize", content=png(img), params=params,
                   headers={"content-type": "image/png", "accept": NPY}, timeout=60)
    assert r.status_code == 200, r.text
    return load_npy(r.content)


def assert_error(r: httpx.Response, status: int, error_type: str, contains: str = ""):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error_type"] == error_type and contains in body["error"], body


# -- the happy paths -------------------------------------------------------------------------------------------
def test_round_trip_matches_the_model(live_server, tiny_model, photos):
    img = photos[0]
    r = httpx.post(f"{live_server}/v1/tokenize", content=png(img), headers={"content-type": "image/png"})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "tiny"
    res = body["results"][0]
    assert res["grid_size"] == [8, 12] and res["tokens_per_position"] == 2
    assert res["original_size"] == [64, 96] and res["padded_size"] == [64, 96]
    for h in ("x-queue-time", "x-inference-time", "x-total-time"):
        assert float(r.headers[h]) >= 0
    tokens = np.array(res["tokens"])
    assert tokens.shape == (2, 8, 12)

    r = httpx.post(f"{live_server}/v1/detokenize", json={"tokens": tokens.tolist()})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    recon = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    # the same pixels as the model in process, and a real reconstruction
    rt = TokenizerRuntime(load_artifact(tiny_model), device="cpu", threads=1)
    assert np.array_equal(recon, rt.detokenize(rt.tokenize(img[None]))[0])
    psnr = 10 * np.log10(255**2 / np.mean((recon.astype(float) - img) ** 2))
    assert psnr > 10  # a reconstruction, not noise (an 80-step model: low, but far from a random image)


def test_pad_crop_and_exact(live_server, photos):
    img = photos[1][:61, :83]
    pad = httpx.post(f"{live_server}/v1/tokenize", content=png(img), headers={"content-type": "image/png"}).json()
    assert pad["results"][0]["original_size"] == [61, 83] and pad["results"][0]["padded_size"] == [64, 88]
    crop = httpx.post(f"{live_server}/v1/tokenize?fit=crop", content=png(img),
                      headers={"content-type": "image/png"}).json()
    assert crop["results"][0]["padded_size"] == [56, 80] and crop["results"][0]["grid_size"] == [7, 10]
    assert crop["fit"] == "crop" and pad["fit"] == "pad"
    old_name = httpx.post(f"{live_server}/v1/tokenize?resize=crop", content=png(img),  # the deprecated alias
                          headers={"content-type": "image/png"}).json()
    assert old_name["results"][0]["tokens"] == crop["results"][0]["tokens"]
    r = httpx.post(f"{live_server}/v1/tokenize?fit=exact", content=png(img), headers={"content-type": "image/png"})
    assert_error(r, 422, "invalid_image", "multiples of 8")
    # image_size crops the decoded image back to the original
    tokens = pad["results"][0]["tokens"]
    r = httpx.post(f"{live_server}/v1/detokenize", json={"tokens": tokens, "image_size": [61, 83]})
    assert Image.open(io.BytesIO(r.content)).size == (83, 61)
    r = httpx.post(f"{live_server}/v1/detokenize", params={"image_size": "61,83"}, content=npy(np.array(tokens)),
                   headers={"content-type": NPY, "accept": NPY})
    assert load_npy(r.content).shape == (1, 61, 83, 3)


def test_raw_multipart_and_json_agree(live_server, photos):
    a, b = photos[2], photos[3]
    raw = [tokenize_npy(live_server, x)[0] for x in (a, b)]
    files = [("image", ("a.png", png(a), "image/png")), ("image", ("b.png", png(b), "image/png"))]
    multi = httpx.post(f"{live_server}/v1/tokenize", files=files, headers={"accept": NPY})
    assert multi.status_code == 200
    arr = load_npy(multi.content)
    assert arr.dtype == np.uint16 and arr.shape == (2, 2, 8, 12)
    js = httpx.post(f"{live_server}/v1/tokenize",
                    json={"images": [base64.b64encode(png(x)).decode() for x in (a, b)], "model": "tiny"}).json()
    assert np.array_equal(arr, raw) and np.array_equal(np.array([r["tokens"] for r in js["results"]]), raw)
    jpeg = io.BytesIO()
    Image.fromarray(a).save(jpeg, format="JPEG")
    r = httpx.post(f"{live_server}/v1/tokenize", content=jpeg.getvalue(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200


def test_json_options_of_the_wrong_type_are_refused(live_server, photos):
    """Found by the fuzzer: a JSON "model" that is an object once reached a dict lookup and gave a 500."""
    image = base64.b64encode(png(photos[0])).decode()
    for body, field in (({"images": [image], "model": {"a": 1}}, "model"), ({"images": [image], "fit": 3}, "fit"),
                        ({"images": [image], "resize": 3}, "resize"), ({"tokens": [[1, 2]], "model": ["tiny"]}, "model"),
                        ({"tokens": [[1, 2]], "image_size": [True, 2]}, "image_size.0")):
        route = "detokenize" if "tokens" in body else "tokenize"
        assert_error(httpx.post(f"{live_server}/v1/{route}", json=body), 400, "invalid_request", f"{field}: Input should be")


def test_detokenize_several_as_json_and_npy(live_server, photos):
    grids = np.stack([tokenize_npy(live_server, x)[0] for x in photos[:3]]).astype(np.int64)
    r = httpx.post(f"{live_server}/v1/detokenize", json={"tokens": grids.tolist()})
    assert r.status_code == 200
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in r.json()["images"]]
    r2 = httpx.post(f"{live_server}/v1/detokenize", content=npy(grids),
                    headers={"content-type": NPY, "accept": NPY})
    arr = load_npy(r2.content)
    assert arr.dtype == np.uint8 and arr.shape == (3, 64, 96, 3)
    assert all(np.array_equal(arr[i], images[i]) for i in range(3))


def test_models_codebook_info_metrics(live_server, tiny_model, photos):
    assert httpx.post(f"{live_server}/v1/tokenize", content=png(photos[0]),
                      headers={"content-type": "image/png"}).status_code == 200
    models = httpx.get(f"{live_server}/v1/models").json()
    assert models["default"] == "tiny" and models["models"][0]["num_codes"] == 256
    meta = httpx.get(f"{live_server}/v1/models/tiny").json()
    art = load_artifact(tiny_model)
    assert meta["codebook"]["sha256"] == art.manifest.codebook.sha256 and meta["token_layout"] == "strided"
    assert meta["limits"]["max_image_pixels"] > 0 and meta["npy_token_dtype"] == "uint16"
    cb = load_npy(httpx.get(f"{live_server}/v1/models/tiny/codebook").content)
    assert np.array_equal(cb, art.codebook)
    st = httpx.get(f"{live_server}/v1/models/tiny/codebook", params={"format": "safetensors"}).content
    assert st == art.codebook_file() and hashlib.sha256(st).hexdigest() == art.manifest.files["codebook.safetensors"]
    info = httpx.get(f"{live_server}/info").json()
    assert info["providers"]["tiny"] == "CPUExecutionProvider" and info["auth"] is False
    assert httpx.get(f"{live_server}/health/live").json() == {"live": True}
    text = httpx.get(f"{live_server}/metrics").text
    assert 'gqtok_requests_total{route="/v1/tokenize",status="200"}' in text
    assert "gqtok_batch_size_bucket" in text and "gqtok_queue_seconds_bucket" in text
    assert "gqtok_inference_seconds_count" in text and "gqtok_ready 1.0" in text
    assert httpx.get(f"{live_server}/docs").status_code == 200
    assert "/v1/tokenize" in httpx.get(f"{live_server}/openapi.json").json()["paths"]


# -- determinism under batching --------------------------------------------------------------------------------
def test_same_tokens_alone_and_among_concurrent_requests(live_server, photos):
    alone = [tokenize_npy(live_server, x) for x in photos]
    with ThreadPoolExecutor(32) as pool:  # 32 concurrent clients, two requests each
        concurrent = list(pool.map(lambda i: tokenize_npy(live_server, photos[i % 16]), range(64)))
    for i, got in enumerate(concurrent):
        assert np.array_equal(got, alone[i % 16]), f"request {i} differs from its sequential result"
    # and batches really formed
    text = httpx.get(f"{live_server}/metrics").text
    sizes = [line for line in text.splitlines() if line.startswith("gqtok_batch_size_sum")]
    counts = [line for line in text.splitlines() if line.startswith("gqtok_batch_size_count")]
    assert sizes and counts


def test_concurrent_detokenize_equals_sequential(live_server, photos):
    grids = [tokenize_npy(live_server, x)[0].astype(np.int64) for x in photos[:8]]

    def detok(g):
        r = httpx.post(f"{live_server}/v1/detokenize", content=npy(g), headers={"content-type": NPY, "accept": NPY},
                       timeout=60)
        assert r.status_code == 200
        return load_npy(r.content)

    sequential = [detok(g) for g in grids]
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(lambda i: detok(grids[i % 8]), range(32)))
    assert all(np.array_equal(c, sequential[i % 8]) for i, c in enumerate(concurrent))


# -- bad input: a 4xx with a JSON body, never a 500 ------------------------------------------------------------
def test_bad_images(live_server, photos):
    post = lambda data, ct="image/png", **kw: httpx.post(f"{live_server}/v1/tokenize", content=data,  # noqa: E731
                                                         headers={"content-type": ct}, **kw)
    assert_error(post(b"not an image"), 422, "invalid_image", "not a PNG, JPEG or WebP")
    assert_error(post(b""), 422, "invalid_image", "empty")
    assert_error(post(png(photos[0])[:200]), 422, "invalid_image", "truncated or corrupt")
    gif = io.BytesIO()
    Image.fromarray(photos[0]).save(gif, format="GIF")
    assert_error(post(gif.getvalue()), 422, "invalid_image", "GIF")
    assert_error(post(png(photos[0]), "text/plain"), 415, "unsupported_media_type")
    assert_error(post(png(photos[0][:5, :5]), params={"fit": "crop"}), 422, "invalid_image",
                 "smaller than one 8x8 cell")
    assert_error(post(png(photos[0]), params={"fit": "stretch"}), 400, "invalid_request", "fit")
    assert_error(post(png(photos[0]), params={"model": "nope"}), 404, "unknown_model", "nope")
    r = httpx.post(f"{live_server}/v1/tokenize", json={"images": ["%%%"]})
    assert_error(r, 422, "invalid_image", "base64")
    r = httpx.post(f"{live_server}/v1/tokenize", json={"images": [base64.b64encode(b"ab").decode() + "QUJD"]})
    assert_error(r, 422, "invalid_image", "base64")  # padding in the middle
    r = httpx.post(f"{live_server}/v1/tokenize", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_request", "JSON")
    r = httpx.post(f"{live_server}/v1/tokenize", json={"images": []})
    assert_error(r, 400, "invalid_request", "no images")
    # different sizes cannot share one npy array
    files = [("image", ("a.png", png(photos[0]), "image/png")), ("image", ("b.png", png(photos[1][:32]), "image/png"))]
    assert_error(httpx.post(f"{live_server}/v1/tokenize", files=files, headers={"accept": NPY}), 406, "not_acceptable")


def test_real_inputs_give_the_tokens_of_their_8_bit_rgb_images(live_server, tiny_model, start_server, photos):
    """A 16-bit grayscale PNG, an EXIF-rotated JPEG and an RGBA PNG are tokenized as the 8-bit RGB image they
    show (gqtok.photos.to_rgb), not clipped, sideways or with alpha dropped; --alpha refuse refuses the last."""
    def raw(data):
        r = httpx.post(f"{live_server}/v1/tokenize", content=data, headers={"content-type": "image/png",
                                                                              "accept": NPY}, timeout=60)
        assert r.status_code == 200, r.text
        return load_npy(r.content)

    gray = photos[2][..., 1]
    deep = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16) * 257).save(deep, format="PNG")
    assert np.array_equal(raw(deep.getvalue()), tokenize_npy(live_server, np.repeat(gray[..., None], 3, axis=2)))

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown turned 90 degrees clockwise
    jpeg, plain = io.BytesIO(), io.BytesIO()
    Image.fromarray(photos[3]).save(jpeg, format="JPEG", quality=95, exif=exif.tobytes())
    Image.fromarray(photos[3]).save(plain, format="JPEG", quality=95)
    upright = np.ascontiguousarray(np.rot90(np.asarray(Image.open(plain).convert("RGB")), -1))
    turned = raw(jpeg.getvalue())
    assert turned.shape[-2:] == (96 // 8, 64 // 8)
    assert np.array_equal(turned, tokenize_npy(live_server, upright))

    alpha = np.full(photos[4].shape[:2], 255, np.uint8)
    alpha[:, :48] = 0
    rgba = png(np.dstack([photos[4], alpha]))
    on_white = photos[4].copy()
    on_white[:, :48] = 255
    assert np.array_equal(raw(rgba), tokenize_npy(live_server, on_white))
    strict = start_server([tiny_model], "--alpha", "refuse")
    r = httpx.post(f"{strict.url}/v1/tokenize", content=rgba, headers={"content-type": "image/png"}, timeout=60)
    assert_error(r, 422, "invalid_image", "transparent pixels")


def test_one_bad_image_among_several_fails_only_itself(live_server, photos):
    """JSON answers carry a status per image; npy answers (one array) fail whole, and carry the sizes in headers."""
    files = [("image", ("a.png", png(photos[0]), "image/png")), ("image", ("b.png", b"not an image", "image/png")),
             ("image", ("c.png", png(photos[1][:40, :56]), "image/png"))]
    r = httpx.post(f"{live_server}/v1/tokenize", files=files, timeout=60)
    assert r.status_code == 200, r.text
    first, bad, last = r.json()["results"]
    assert bad == {"status": 422, "error": "image 1 is not a PNG, JPEG or WebP image", "error_type": "invalid_image"}
    assert first["status"] == last["status"] == 200
    assert np.array_equal(np.asarray(first["tokens"]), tokenize_npy(live_server, photos[0])[0])
    assert last["original_size"] == [40, 56] and np.array_equal(np.asarray(last["tokens"]),
                                                                 tokenize_npy(live_server, photos[1][:40, :56])[0])
    r = httpx.post(f"{live_server}/v1/tokenize", files=files[:2], headers={"accept": NPY}, timeout=60)
    assert_error(r, 422, "invalid_image", "image 1")
    r = httpx.post(f"{live_server}/v1/tokenize", files=[files[0], files[0]], headers={"accept": NPY}, timeout=60)
    assert r.headers["x-gqtok-original-size"] == "64,96;64,96" and r.headers["x-gqtok-padded-size"] == "64,96;64,96"


def test_decompression_bomb_is_refused_before_decoding(live_server):
    # 6000 x 6000 black pixels compress to a few kB; the header alone is enough to refuse it
    bomb = io.BytesIO()
    Image.new("L", (6000, 6000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 100_000
    r = httpx.post(f"{live_server}/v1/tokenize", content=bomb.getvalue(), headers={"content-type": "image/png"})
    assert_error(r, 413, "image_too_large", "36000000 pixels")


@pytest.mark.parametrize("tokens,status,error_type,contains", [
    ([[[1, 2], [3, 4]]], 422, "invalid_tokens", "2 tokens per position; got 1"),   # T=1 grid for a T=2 model
    ([[[1, 2], [3]], [[1, 2], [3, 4]]], 422, "invalid_tokens", "rectangular"),      # ragged
    ([[[1.5, 2], [3, 4]], [[1, 2], [3, 4]]], 422, "invalid_tokens", "integer"),    # non-integer
    ([[[True, 2], [3, 4]], [[1, 2], [3, 4]]], 422, "invalid_tokens", "integer"),   # bool mixes into ints
    ([[["a", 2], [3, 4]], [[1, 2], [3, 4]]], 422, "invalid_tokens", "integer"),    # strings
    ([[[256, 2], [3, 4]], [[1, 2], [3, 4]]], 422, "invalid_tokens", "[0, 256)"),   # out of range
    ([[[-1, 2], [3, 4]], [[1, 2], [3, 4]]], 422, "invalid_tokens", "[0, 256)"),    # negative
    ([[[10**30, 2], [3, 4]], [[1, 2], [3, 4]]], 422, "invalid_tokens", "beyond int64"),  # overflow
    ([1, 2, 3], 422, "invalid_tokens", "dimensions"),                               # wrong rank
    ([[[], []], [[], []]], 422, "invalid_tokens", "integer"),                       # empty
    ([[[0] * 600] * 600] * 2, 413, "image_too_large", "4800x4800"),                 # decodes past the pixel limit
])
def test_bad_tokens(live_server, tokens, status, error_type, contains):
    r = httpx.post(f"{live_server}/v1/detokenize", json={"tokens": tokens})
    assert_error(r, status, error_type, contains)


def test_bad_token_bodies(live_server):
    url = f"{live_server}/v1/detokenize"
    assert_error(httpx.post(url, content=b'{"tokens": [[[NaN]]]}', headers={"content-type": "application/json"}),
                 400, "invalid_request", "NaN")
    assert_error(httpx.post(url, content=npy(np.zeros((2, 2, 2), np.float32)), headers={"content-type": NPY}),
                 422, "invalid_tokens", "float32")
    assert_error(httpx.post(url, content=b"\x93NUMPY garbage", headers={"content-type": NPY}),
                 422, "invalid_tokens", ".npy")
    assert_error(httpx.post(url, content=npy(np.full((2, 2, 2), np.nan)), headers={"content-type": NPY}),
                 422, "invalid_tokens", "float64")
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # never unpickled by the server
    assert_error(httpx.post(url, content=pickled.getvalue(), headers={"content-type": NPY}), 422, "invalid_tokens")
    huge = npy(np.zeros((2, 2, 2), np.uint16)).replace(b"(2, 2, 2)", b"(2, 9999, 99999)")  # header lies, body short
    assert_error(httpx.post(url, content=huge, headers={"content-type": NPY}), 422, "invalid_tokens", ".npy")
    assert_error(httpx.post(url, json={"grids": []}), 400, "invalid_request", "tokens")
    assert_error(httpx.post(url, json={"tokens": [[[1]], [[1]]], "image_size": [9, 9]}), 400, "invalid_request",
                 "larger")
    assert_error(httpx.post(url, json={"tokens": [[[1]], [[1]]], "image_size": [0, "x"]}), 400, "invalid_request")
    assert_error(httpx.post(url, content=b"x", headers={"content-type": "text/csv"}), 415, "unsupported_media_type")
    assert_error(httpx.get(f"{live_server}/v1/models/nope"), 404, "unknown_model")
    assert_error(httpx.get(f"{live_server}/v1/models/tiny/codebook", params={"format": "csv"}), 400, "invalid_request")
    assert_error(httpx.get(f"{live_server}/no/such/route"), 404, "not_found")


# -- limits: body size, queue, timeout ---------------------------------------------------------------------------
def test_body_limit(tiny_model, start_server, photos):
    server = start_server([tiny_model], "--max-body-bytes", "4096")
    r = httpx.post(f"{server.url}/v1/tokenize", content=png(photos[0]), headers={"content-type": "image/png"})
    assert_error(r, 413, "payload_too_large", "4096")

    def chunks():  # no content-length: the limit must hold for streamed bodies too
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(f"{server.url}/v1/tokenize", content=chunks(), headers={"content-type": "image/png"})
    assert_error(r, 413, "payload_too_large")

    # JSON token grids: refused past what 2 grids of 4096 pixels can need (2 tokens of up to 12 bytes per 8x8
    # cell, plus 64 KiB), before they are read into Python objects, though far under --max-body-bytes
    small = start_server([tiny_model], "--max-image-pixels", "4096", "--max-images-per-request", "2")
    limit = 2 * 2 * (4096 // 64) * 12 + 64 * 1024
    big = {"tokens": [[[1] * 400] * 400] * 2}
    r = httpx.post(f"{small.url}/v1/detokenize", json=big, timeout=30)
    assert_error(r, 413, "payload_too_large", f"the limit is {limit}")
    assert httpx.post(f"{small.url}/v1/detokenize", json={"tokens": [[[1, 2]], [[3, 4]]]}).status_code == 200
    # image bodies: held to what the pixel limit can need (8 bytes per pixel and 1 MiB per image), far under
    # --max-body-bytes; JSON carries a third more per image, for every image a request may hold
    one = 8 * 4096 + 2**20
    r = httpx.post(f"{small.url}/v1/tokenize", content=b"x" * (one + 1), headers={"content-type": "image/png"})
    assert_error(r, 413, "payload_too_large", f"the limit is {one}")
    r = httpx.post(f"{small.url}/v1/tokenize", content=b"x" * (one + 1), headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_request")  # under the JSON limit: read, then refused as JSON
    assert tokenize_npy(small.url, photos[0][:32, :32]).shape[-2:] == (4, 4)


def test_queue_full_gives_429_and_nothing_is_lost(tiny_model, start_server, photos):
    server = start_server([tiny_model], "--max-queue-size", "4", "--max-batch-size", "2",
                          "--max-queue-delay-ms", "300")
    expected = [tokenize_npy(server.url, x) for x in photos[:4]]

    def call(i):
        return i, httpx.post(f"{server.url}/v1/tokenize", content=png(photos[i % 4]),
                             headers={"content-type": "image/png", "accept": NPY}, timeout=60)

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, range(24)))
    statuses = [r.status_code for _, r in results]
    files = [("image", (f"{i}.png", png(photos[0]), "image/png")) for i in range(5)]  # more than the whole queue
    assert_error(httpx.post(f"{server.url}/v1/tokenize", files=files), 413, "payload_too_large", "at most 4")
    assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) >= 4
    for i, r in results:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error_type"] == "queue_full"
        else:  # every accepted request answered correctly, nothing mixed up
            assert np.array_equal(load_npy(r.content), expected[i % 4])


def test_request_timeout_gives_503(tiny_model, start_server, photos):
    server = start_server([tiny_model], "--request-timeout-s", "0.05", "--max-queue-delay-ms", "400",
                          "--max-batch-size", "64")
    r = httpx.post(f"{server.url}/v1/tokenize", content=png(photos[0]), headers={"content-type": "image/png"})
    assert_error(r, 503, "timeout", "0.05 s")
    assert httpx.get(f"{server.url}/health/ready").status_code == 200


# -- a batch that fails inside the runtime ----------------------------------------------------------------------
class InProcessServer:
    """uvicorn in a thread of this process, so a test can reach into the app (here: to break the runtime)."""

    def __init__(self, model_dir, **settings):
        import socket

        import uvicorn

        from gqtok.service.app import create_app
        from gqtok.service.settings import ServiceSettings

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.app = create_app(ServiceSettings(models=[model_dir], port=port, **settings))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="critical"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{port}"
        wait_until_ready(self.url)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def test_an_admitted_image_holds_its_queue_slot_while_its_body_arrives(tiny_model, photos):
    """Queue of 2: two raw images whose bodies trickle in hold both slots, so a third is refused 429 queue_full at
    once (the queue itself is still empty); the two get their own tokens, and every slot comes back, also from
    a request that failed (a body that is not an image)."""
    server = InProcessServer(tiny_model, max_queue_size=2)
    try:
        batcher = server.app.state.service.models["tiny"].tokenize
        expected = [tokenize_npy(server.url, x) for x in photos[:2]]
        sending = threading.Event()

        def slow_body(data):
            yield data[:100]
            sending.wait(10)  # until the third request has had its answer
            time.sleep(0.1)
            yield data[100:]

        def call(i):
            return httpx.post(f"{server.url}/v1/tokenize", content=slow_body(png(photos[i])), timeout=60,
                              headers={"content-type": "image/png", "accept": NPY})

        with ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(call, i) for i in range(2)]
            deadline = time.monotonic() + 10
            while batcher.reserved < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher.reserved == 2 and batcher.depth == 0
            third = httpx.post(f"{server.url}/v1/tokenize", content=png(photos[2]),
                               headers={"content-type": "image/png"}, timeout=10)
            sending.set()
            answers = [f.result() for f in slow]
        assert_error(third, 429, "queue_full", "2 reserved")
        for i, r in enumerate(answers):
            assert r.status_code == 200 and np.array_equal(load_npy(r.content), expected[i])
        assert_error(httpx.post(f"{server.url}/v1/tokenize", content=b"not an image",
                                headers={"content-type": "image/png"}), 422, "invalid_image")
        assert batcher.reserved == 0
        assert httpx.post(f"{server.url}/v1/tokenize", content=png(photos[2]),
                          headers={"content-type": "image/png"}).status_code == 200
    finally:
        server.stop()


def test_a_failing_batch_fails_only_the_bad_request(tiny_model, photos):
    """One poisoned image in a batch of 8: its request gets 500 inference_failed, its 7 batch-mates
    their right tokens, and the server stays ready and keeps serving."""
    server = InProcessServer(tiny_model, max_batch_size=8, max_queue_delay_ms=500)
    try:
        expected = [tokenize_npy(server.url, x) for x in photos[:8]]
        batcher = server.app.state.service.models["tiny"].tokenize
        run_batch, batch_sizes = batcher.run_batch, []

        def poisoned(images):  # a runtime fault triggered by one input: a pixel value of 13 in the corner
            batch_sizes.append(len(images))
            if (images[:, 0, 0, 0] == 13).any():
                raise RuntimeError("simulated onnxruntime failure")
            return run_batch(images)

        batcher.run_batch = poisoned
        poison = photos[3].copy()
        poison[0, 0, 0] = 13
        inputs = [poison if i == 3 else photos[i] for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda x: httpx.post(f"{server.url}/v1/tokenize", content=png(x), timeout=60,
                                                           headers={"content-type": "image/png", "accept": NPY}),
                                      inputs))
        assert batch_sizes[0] > 1  # the poison really shared a batch with others
        assert_error(responses[3], 500, "inference_failed", "simulated onnxruntime failure")
        for i, r in enumerate(responses):
            if i != 3:
                assert r.status_code == 200 and np.array_equal(load_npy(r.content), expected[i]), i
        assert httpx.get(f"{server.url}/health/ready").status_code == 200
        assert np.array_equal(tokenize_npy(server.url, photos[0]), expected[0])
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'status="500"' in metrics
    finally:
        server.stop()


def test_a_persistent_failure_drops_readiness_until_a_probe_succeeds(tiny_model, photos):
    """A sticky runtime fault (every call fails): after 3 failed calls /health/ready answers 503, requests get
    503 not_ready at once, gqtok_ready is 0; once the runtime works again a probe brings readiness back."""
    server = InProcessServer(tiny_model, max_batch_size=1)
    try:
        batcher = server.app.state.service.models["tiny"].tokenize
        run_batch, probe = batcher.run_batch, batcher.probe

        def broken(*_):
            raise RuntimeError("simulated CUDA error: the device is lost")

        batcher.run_batch = batcher.probe = broken
        post = lambda: httpx.post(f"{server.url}/v1/tokenize", content=png(photos[0]), timeout=30,  # noqa: E731
                                  headers={"content-type": "image/png"})
        for _ in range(3):
            assert_error(post(), 500, "inference_failed", "device is lost")
        ready = httpx.get(f"{server.url}/health/ready")
        assert ready.status_code == 503 and ready.json()["models"] == {"tiny": False}
        assert_error(post(), 503, "not_ready")
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "gqtok_ready 0.0" in metrics
        assert 'gqtok_requests_total{route="/v1/tokenize",status="500"} 3.0' in metrics
        batcher.run_batch, batcher.probe = run_batch, probe  # the device comes back
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "readiness did not come back"
            time.sleep(0.1)
        assert post().status_code == 200 and "gqtok_ready 1.0" in httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()


def test_unexpected_errors_are_counted_and_requests_past_the_limit_refused(tiny_model, photos):
    """A 500 from an unexpected exception reaches gqtok_requests_total; past max_concurrent_requests a request
    is refused 429 before its body is read, while /health/live keeps answering."""
    server = InProcessServer(tiny_model, max_concurrent_requests=2, max_batch_size=1)
    try:
        served = server.app.state.service.models["tiny"]
        compress = served.compressor.compress
        served.compressor.compress = lambda *a: 1 / 0
        r = httpx.post(f"{server.url}/v1/compress", content=png(photos[0]), headers={"content-type": "image/png"})
        assert r.status_code == 500
        served.compressor.compress = compress
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'gqtok_requests_total{route="/v1/compress",status="500"} 1.0' in metrics

        run_batch = served.tokenize.run_batch
        served.tokenize.run_batch = lambda images: (time.sleep(1.0), run_batch(images))[1]
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(httpx.post, f"{server.url}/v1/tokenize", content=png(photos[i]), timeout=30,
                                   headers={"content-type": "image/png"}) for i in range(6)]
            time.sleep(0.3)
            live = httpx.get(f"{server.url}/health/live", timeout=5)
            codes = sorted(f.result().status_code for f in futures)
        assert live.status_code == 200
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
        refused = next(f.result() for f in futures if f.result().status_code == 429)
        assert_error(refused, 429, "too_many_requests", "the limit is 2")
        ok = next(f.result() for f in futures if f.result().status_code == 200)
        m = served.manifest
        assert ok.headers["x-gqtok-model"] == "tiny" and ok.headers["x-gqtok-model-version"] == m.model_version
        assert ok.headers["x-gqtok-codebook-sha256"] == m.codebook.sha256
    finally:
        server.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="thread priorities are set on Linux only")
def test_inference_runs_at_a_lower_priority_than_the_event_loop(tiny_model, start_server, photos):
    """With the default --inference-nice 10, onnxruntime's pool, the GQ search's pool and the inference worker run
    at nice 10 and the event loop (uvicorn's main thread) at the process's own 0, so refusals and health probes
    never wait behind inference for a core."""
    server = start_server([tiny_model], "--threads", "2")
    r = httpx.post(f"{server.url}/v1/tokenize", content=png(photos[0]), headers={"content-type": "image/png"})
    assert r.status_code == 200
    tasks = Path(f"/proc/{server.proc.pid}/task")
    nice = {int(t.name): int((t / "stat").read_text().rsplit(")", 1)[1].split()[16]) for t in tasks.iterdir()}
    assert nice[server.proc.pid] == 0
    # the onnxruntime pool's second thread, the exact GQ search's two threads and the tokenize worker
    assert sum(v == 10 for v in nice.values()) >= 4, nice
    assert set(nice.values()) <= {0, 10}, nice


def record_batch_sizes(batcher, label: str, sizes: list) -> None:
    run = batcher.run_batch

    def recorded(items):
        sizes.append((label, len(items)))
        return run(items)

    batcher.run_batch = recorded


def test_batches_stop_at_max_batch_pixels(tiny_model, photos):
    """Batches hold at most max_batch_pixels image pixels (working memory grows with them): with room for two
    64x96 images, six queued together run as batches of two, and an image bigger than the cap runs alone."""
    server = InProcessServer(tiny_model, max_batch_size=8, max_batch_pixels=2 * 64 * 96, max_queue_delay_ms=300)
    try:
        expected = [tokenize_npy(server.url, x) for x in photos[:6]]
        sizes = []  # (direction, batch size) of every inference call
        for direction in ("tokenize", "detokenize"):
            record_batch_sizes(getattr(server.app.state.service.models["tiny"], direction), direction, sizes)
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda x: tokenize_npy(server.url, x), photos[:6]))
            images = list(pool.map(lambda g: httpx.post(f"{server.url}/v1/detokenize", content=npy(g), timeout=60,
                                                         headers={"content-type": NPY, "accept": NPY}), expected))
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))
        assert all(r.status_code == 200 for r in images)
        tokenize_batches = [n for d, n in sizes if d == "tokenize"]
        detokenize_batches = [n for d, n in sizes if d == "detokenize"]
        assert max(tokenize_batches) == 2 and max(detokenize_batches) == 2, sizes
        sizes.clear()
        big = np.concatenate([np.concatenate([photos[0], photos[1]], 1)] * 2, 0)  # 128x192: 4x the pixels
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda x: tokenize_npy(server.url, x), [big, big]))
        assert sizes == [("tokenize", 1), ("tokenize", 1)]
    finally:
        server.stop()


# -- auth ------------------------------------------------------------------------------------------------------
def test_api_key(tiny_model, start_server, photos):
    server = start_server([tiny_model], env={"GQTOK_API_KEY": "s3cret"})
    url = server.url
    for path in ("/v1/models", "/info", "/metrics", "/docs", "/openapi.json", "/v1/models/tiny/codebook"):
        assert_error(httpx.get(url + path), 401, "unauthorized")
        assert_error(httpx.get(url + path, headers={"authorization": "Bearer wrong"}), 401, "unauthorized")
        assert httpx.get(url + path, headers={"authorization": "Bearer s3cret"}).status_code == 200
    r = httpx.post(f"{url}/v1/tokenize", content=png(photos[0]), headers={"content-type": "image/png"})
    assert_error(r, 401, "unauthorized")
    r = httpx.post(f"{url}/v1/tokenize", content=png(photos[0]),
                   headers={"content-type": "image/png", "authorization": "Bearer s3cret"})
    assert r.status_code == 200
    assert httpx.get(f"{url}/health/ready").status_code == 200 and httpx.get(f"{url}/health/live").status_code == 200
    assert httpx.get(f"{url}/info", headers={"authorization": "Bearer s3cret"}).json()["auth"] is True
    # every route the server declares, every method, plus paths it does not have: 401 without the key
    paths = httpx.get(f"{url}/openapi.json", headers={"authorization": "Bearer s3cret"}).json()["paths"]
    calls = [(m.upper(), p.replace("{model_id}", "tiny")) for p, ops in paths.items() for m in ops]
    calls += [("GET", "/nope"), ("POST", "/v1/models"), ("GET", "/redoc"), ("GET", "/health")]
    assert ("POST", "/v1/detokenize") in calls
    for method, path in calls:
        r = httpx.request(method, url + path)
        if path.startswith("/health/"):
            assert r.status_code == 200, (method, path)
        else:
            assert_error(r, 401, "unauthorized")
    # A refusal before the body is read still reaches a client that sends a large body: the server reads and drops
    # the body first, then answers and closes cleanly (closing with unread bytes sends a reset, which can
    # destroy the answer before the client reads it).
    body = bytes(8 * 2**20 - 4096)  # more than the loopback socket buffers hold, under what refusals drop
    for _ in range(3):
        status, rest = raw_post(server.port, "/v1/tokenize", body, "image/png")
        assert status == 401 and b'"unauthorized"' in rest


def raw_post(port: int, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    """POST on a raw socket, sending the body from a thread while the answer is read; (status, the rest). A
    connection reset raises ConnectionResetError."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: {content_type}\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()

        def send():
            try:
                sock.sendall(head + body)
            except OSError:  # the server stopped reading: the answer says why
                pass

        sender = threading.Thread(target=send)
        sender.start()
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sender.join(30)
    return int(answer.split(b" ", 2)[1]), answer


# -- refusing bad artifacts, graceful shutdown ------------------------------------------------------------------
def test_server_refuses_a_tampered_model(tiny_model, tmp_path):
    import shutil
    import subprocess
    import sys

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    data = bytearray((bad / "encoder.onnx").read_bytes())
    data[100] ^= 0xFF
    (bad / "encoder.onnx").write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "gqtok.cli", "serve", "--model", str(bad), "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "encoder.onnx has sha256" in proc.stdout + proc.stderr


def test_graceful_shutdown_drains_in_flight_requests(tiny_model, start_server, photos):
    server = start_server([tiny_model], "--max-queue-delay-ms", "1500", "--max-batch-size", "64")
    results = {}

    def slow(i):  # waits in the queue for its batch to fill or 1.5 s to pass
        results[i] = httpx.post(f"{server.url}/v1/tokenize", content=png(photos[i]),
                                headers={"content-type": "image/png"}, timeout=30)

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    late = httpx.post(f"{server.url}/v1/tokenize", content=png(photos[5]), headers={"content-type": "image/png"})
    assert_error(late, 503, "shutting_down")
    assert httpx.get(f"{server.url}/health/ready").status_code == 503
    for t in threads:
        t.join()
    assert all(results[i].status_code == 200 for i in range(3)), [r.text for r in results.values()]
    assert server.proc.wait(20) == 0


# -- compression -------------------------------------------------------------------------------------------------
def compress(url: str, img: np.ndarray, **params) -> httpx.Response:
    return httpx.post(f"{url}/v1/compress", content=png(img), params=params, headers={"content-type": "image/png"},
                      timeout=60)


def test_compress_and_decompress_round_trip_over_http(live_server, tiny_model, photos):
    from gqtok.service.compressor import ImageCompressor

    img = photos[2][:59, :90]  # padded to 64x96 inside, cropped back on the way out
    local = ImageCompressor(load_artifact(tiny_model))
    sizes = {}
    for prior in ("uniform", "frequency", "context", "pc"):
        r = compress(live_server, img, prior=prior)
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-gqtok", r.text
        assert r.headers["x-gqtok-prior"] == prior
        assert float(r.headers["x-gqtok-bits-per-pixel"]) == pytest.approx(8 * len(r.content) / (59 * 90), abs=1e-5)
        assert float(r.headers["x-coding-time"]) >= 0 and float(r.headers["x-inference-time"]) >= 0
        assert r.content == local.compress(img, prior)  # the same bytes as in process
        sizes[prior] = len(r.content)
        d = httpx.post(f"{live_server}/v1/decompress", content=r.content,
                       headers={"content-type": "application/octet-stream"}, timeout=60)
        assert d.status_code == 200 and d.headers["content-type"] == "image/png" and d.headers["x-gqtok-model"] == "tiny"
        image = np.asarray(Image.open(io.BytesIO(d.content)).convert("RGB"))
        assert np.array_equal(image, local.decompress(r.content)[0]) and image.shape == (59, 90, 3)
    assert sizes["context"] < sizes["frequency"] < sizes["uniform"]
    # no prior named: the strongest the model has
    assert compress(live_server, img).headers["x-gqtok-prior"] == "context"
    d = httpx.post(f"{live_server}/v1/decompress", content=compress(live_server, img).content,
                   headers={"content-type": "application/x-gqtok", "accept": NPY}, timeout=60)
    assert load_npy(d.content).shape == (59, 90, 3)


def test_codec_model_compresses_at_the_quality_asked_over_http(tiny_model, tiny_codec_model, start_server,
                                                               live_server, photos):
    """A server with a tokenizer and a codec (--codec): the client's quality picks the rate, the header's codec
    picks the decoder, the answers equal the in-process codec's, and what does not apply is refused by name."""
    from gqtok.service.client import TokenizerClient, TokenizerError
    from gqtok.service.compressor import load_compressor

    server = start_server([tiny_model], "--codec", str(tiny_codec_model))
    client = TokenizerClient(server.url)
    listed = client.models()
    assert [m["model_id"] for m in listed["models"]] == ["tiny"] and listed["default"] == "tiny"
    assert [(c["model_id"], c["qualities"], c["default_quality"]) for c in listed["codecs"]] == [("tiny-codec", 3, 2)]
    assert client.model_info("tiny-codec")["rate_lambdas"] == [0.002, 0.02, 0.2]
    assert httpx.get(f"{server.url}/health/ready").json()["models"] == {"tiny": True, "tiny-codec": True}
    local = load_compressor(str(tiny_codec_model), device="cpu")
    img = photos[2][:59, :90]
    sizes = []
    for quality in (1, 3):
        data = client.compress(img, model="tiny-codec", quality=quality)
        assert data == local.compress(img, quality=quality)
        assert np.array_equal(np.asarray(client.decompress(data)), local.decompress(data)[0])
        sizes.append(len(data))
    assert sizes[0] < sizes[1]
    r = compress(server.url, img, model="tiny-codec")
    assert r.headers["x-gqtok-quality"] == "2" and r.headers["x-gqtok-model"] == "tiny-codec"
    assert r.headers["x-gqtok-model-digest"] == local.manifest.model_digest
    # the tokenizer beside it still compresses at its one rate
    assert client.decompress(client.compress(img)).size == (90, 59)
    refusals = [(dict(model="tiny-codec", quality=4), 400, "quality must be an integer from 1 (lowest rate) to 3"),
                (dict(model="tiny-codec", quality=0), 400, "quality"),
                (dict(quality=2), 400, "tiny is a GQ tokenizer: it compresses at one rate"),
                (dict(model="tiny-codec", prior="context"), 400, "its latents are coded with its hyperprior")]
    for params, status, message in refusals:
        assert_error(compress(server.url, img, **params), status, "invalid_request", message)
    with pytest.raises(TokenizerError, match="tiny-codec is a codec model: it has no tokens"):
        client.tokenize([img], model="tiny-codec")
    # a codec stream sent to a server without that codec: named, not decoded by another model
    lost = httpx.post(f"{live_server}/v1/decompress", content=local.compress(img),
                      headers={"content-type": "application/x-gqtok"})
    assert_error(lost, 404, "unknown_model", "unknown codec 'tiny-codec'")
    schema = httpx.get(f"{server.url}/openapi.json").json()
    params = {p["name"]: p for p in schema["paths"]["/v1/compress"]["post"]["parameters"]}
    assert params["quality"]["schema"]["anyOf"][0]["minimum"] == 1
    assert "CodecInfo" in schema["components"]["schemas"]
    client.close()


def test_a_codec_passed_as_a_tokenizer_stops_the_server_with_a_message(tiny_codec_model):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "gqtok.cli", "serve", "--port", "0", "--model", str(tiny_codec_model)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "is a codec model (tiny-codec): serve it with --codec" in out.stderr, out.stderr


def test_a_file_the_server_compressed_decompresses_in_the_cli(live_server, tiny_model, photos, tmp_path):
    """Server and CLI run BLAS on one thread whatever the environment asks (service/runtime.py, one_blas_thread),
    so the context prior's float32 probabilities, and so the decoded tokens, agree between them."""
    import os
    import subprocess
    import sys

    img = photos[5]
    r = compress(live_server, img, prior="context")
    assert r.status_code == 200, r.text
    (tmp_path / "a.gqt").write_bytes(r.content)
    served = httpx.post(f"{live_server}/v1/decompress", content=r.content,
                        headers={"content-type": "application/x-gqtok", "accept": NPY}, timeout=60)
    out = subprocess.run([sys.executable, "-m", "gqtok.cli", "decompress", str(tmp_path / "a.gqt"), "-o",
                          str(tmp_path / "a.png"), "--model", str(tiny_model)], capture_output=True, text=True,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png").convert("RGB")), load_npy(served.content))


def test_model_metadata_lists_priors_with_their_held_out_bits(live_server):
    priors = httpx.get(f"{live_server}/v1/models/tiny").json()["priors"]
    assert set(priors) == {"uniform", "frequency", "context", "pc"}
    bits = {k: v["heldout_bits_per_token"] for k, v in priors.items()}
    assert bits["context"] < bits["frequency"] < bits["uniform"] == 8.0 and 0 < bits["pc"] < 8.0


def test_bad_compress_and_decompress_requests(live_server, photos):
    import dataclasses

    from gqtok.core.bitstream import Header

    url = live_server
    good = compress(url, photos[3]).content
    assert_error(compress(url, photos[3], prior="lzma"), 400, "invalid_request",
                 "prior: Input should be 'uniform', 'frequency', 'context' or 'pc'")
    assert_error(compress(url, photos[3], model="nope"), 404, "unknown_model", "'nope'")
    two = httpx.post(f"{url}/v1/compress", files=[("image", ("a.png", png(photos[0]), "image/png"))] * 2)
    assert_error(two, 400, "invalid_request", "exactly one image")
    assert_error(httpx.post(f"{url}/v1/compress", content=b"GQTK", headers={"content-type": "image/png"}),
                 422, "invalid_image")

    def decompress(body: bytes, kind: str = "application/x-gqtok") -> httpx.Response:
        return httpx.post(f"{url}/v1/decompress", content=body, headers={"content-type": kind}, timeout=60)

    flipped = bytearray(good)
    flipped[-2] ^= 0xFF
    header, payload = Header.unpack(good)
    cases = [
        (decompress(good, "image/png"), 415, "unsupported_media_type", "application/x-gqtok"),
        (decompress(png(photos[0])), 422, "invalid_bitstream", "no GQTK magic"),
        (decompress(good[:-4]), 422, "invalid_bitstream", "truncated"),
        (decompress(bytes(flipped)), 422, "invalid_bitstream", "payload checksum"),
        (decompress(b""), 422, "invalid_bitstream", "no GQTK magic"),
        (decompress(dataclasses.replace(header, model_id="elsewhere").pack() + payload), 404, "unknown_model",
         "'elsewhere'"),
        (decompress(dataclasses.replace(header, prior_digest=bytes(8)).pack() + payload), 422, "invalid_bitstream",
         "refitted"),
        # a forged header asking for a huge image is refused before any decoding
        (decompress(dataclasses.replace(header, image_size=(60000, 60000), grid=(2, 7500, 7500)).pack() + payload),
         413, "image_too_large", "60000x60000"),
    ]
    for r, status, error_type, contains in cases:
        assert_error(r, status, error_type, contains)
    assert httpx.get(f"{url}/health/ready").status_code == 200


def test_tokenize_can_answer_each_tokens_posterior(live_server, tiny_model, photos):
    """posterior=true: each token's KL in bits and mean sigma beside its id, from the same encoder call, equal to
    the in-process Tokenizer's; without it the answer is as before."""
    from gqtok import Tokenizer

    img = photos[1]
    r = httpx.post(f"{live_server}/v1/tokenize", content=png(img), params={"posterior": "true"},
                   headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    tok = Tokenizer.load(str(tiny_model), device="cpu")
    mu, sigma = tok.encode_posterior(img)
    assert np.array_equal(np.array(result["tokens"]), tok.encode(img)[0].squeeze())
    kl = np.array(result["kl_bits"])
    assert kl.shape == np.array(result["tokens"]).shape
    assert np.allclose(kl, tok.kl_bits(mu, sigma)[0].squeeze(), atol=2e-3)
    assert np.allclose(np.array(result["sigma_mean"]), sigma.mean(-1)[0].squeeze(), rtol=1e-4, atol=1e-6)
    plain = httpx.post(f"{live_server}/v1/tokenize", content=png(img), headers={"content-type": "image/png"},
                       timeout=60).json()["results"][0]
    assert "kl_bits" not in plain and plain["tokens"] == result["tokens"]
    b64 = base64.b64encode(png(img)).decode()
    js = httpx.post(f"{live_server}/v1/tokenize", json={"images": [b64], "posterior": True}, timeout=60)
    assert js.json()["results"][0]["kl_bits"] == result["kl_bits"]


def test_token_budget_resizes_keeps_the_aspect_and_detokenize_gives_the_original_size_back(
        live_server, tiny_model, photos):
    """max_tokens (query or JSON) resizes before tokenizing, exactly as the in-process Tokenizer does; the answer
    says to what size; detokenize crops to it and resizes back to the original (npy query and JSON body)."""
    from gqtok import Tokenizer

    img = photos[1][:61, :90]  # 61x90 (t=2: 2 tokens per position)
    r = httpx.post(f"{live_server}/v1/tokenize", content=png(img), params={"max_tokens": 40},
                   headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    (gh, gw), (rh, rw) = res["grid_size"], res["resized_size"]
    assert 2 * gh * gw <= 40 and res["original_size"] == [61, 90] and rh < 61 and abs(rw / rh - 90 / 61) < 0.15
    assert res["padded_size"] == [gh * 8, gw * 8]
    tok = Tokenizer.load(str(tiny_model), device="cpu")
    assert tok.budget_size((61, 90), 40) == (rh, rw)
    assert np.array_equal(np.array(res["tokens"]), tok.encode(img, max_tokens=40)[0])
    js = httpx.post(f"{live_server}/v1/tokenize", timeout=60,
                    json={"images": [base64.b64encode(png(img)).decode()], "max_tokens": 40}).json()["results"][0]
    assert js["tokens"] == res["tokens"]
    npy_answer = httpx.post(f"{live_server}/v1/tokenize", content=png(img), params={"max_tokens": 40}, timeout=60,
                            headers={"content-type": "image/png", "accept": NPY})
    assert npy_answer.headers["x-gqtok-resized-size"] == f"{rh},{rw}"
    back = httpx.post(f"{live_server}/v1/detokenize", content=npy_answer.content, timeout=60,
                      params={"image_size": f"{rh},{rw}", "output_size": "61,90"},
                      headers={"content-type": NPY, "accept": NPY})
    assert back.status_code == 200, back.text
    assert load_npy(back.content).shape == (1, 61, 90, 3)
    back_json = httpx.post(f"{live_server}/v1/detokenize", timeout=60, json={
        "tokens": res["tokens"], "image_size": [rh, rw], "output_size": [61, 90]})
    assert np.asarray(Image.open(io.BytesIO(back_json.content))).shape == (61, 90, 3)
    # what cannot be done is refused by name
    too_small = httpx.post(f"{live_server}/v1/tokenize", content=png(img), params={"max_tokens": 1},
                           headers={"content-type": "image/png"}, timeout=60)
    assert too_small.status_code == 400 and "max_tokens=1" in too_small.json()["error"]
    zero = httpx.post(f"{live_server}/v1/tokenize", content=png(img), params={"max_tokens": 0},
                      headers={"content-type": "image/png"}, timeout=60)
    assert zero.status_code == 400 and "max_tokens" in zero.json()["error"]
    huge = httpx.post(f"{live_server}/v1/detokenize", timeout=60, json={
        "tokens": res["tokens"], "output_size": [100000, 100000]})
    assert huge.status_code == 400 and "output_size" in huge.json()["error"]


# -- model identity and the protocol ----------------------------------------------------------------------------
def test_answers_name_the_model_digest_and_detokenize_refuses_another_exports_tokens(
        live_server, tiny_model, tiny_model_reexport, start_server, photos):
    """The re-export scenario at the server: same id, version and codebook, other networks. Answers carry the
    model digest; tokens sent back with the digest of their maker are refused by another export (409)."""
    from gqtok.core.manifest import Manifest

    ours, theirs = Manifest.read(tiny_model), Manifest.read(tiny_model_reexport)
    assert (ours.model_id, ours.model_version) == (theirs.model_id, theirs.model_version)
    assert ours.model_digest != theirs.model_digest
    r = httpx.post(f"{live_server}/v1/tokenize", content=png(photos[0]), headers={"content-type": "image/png"})
    assert r.json()["model_digest"] == r.headers["x-gqtok-model-digest"] == ours.model_digest
    assert httpx.get(f"{live_server}/v1/models/tiny").json()["model_digest"] == ours.model_digest
    grid = r.json()["results"][0]["tokens"]
    ok = httpx.post(f"{live_server}/v1/detokenize", json={"tokens": grid, "model_digest": ours.model_digest})
    assert ok.status_code == 200 and ok.headers["x-gqtok-model-digest"] == ours.model_digest
    other = start_server([tiny_model_reexport])
    for request in ({"json": {"tokens": grid, "model_digest": ours.model_digest}},
                    {"content": npy(np.asarray(grid)[None, None]), "params": {"model_digest": ours.model_digest},
                     "headers": {"content-type": NPY}}):
        refused = httpx.post(f"{other.url}/v1/detokenize", **request)
        assert_error(refused, 409, "model_mismatch", f"model digest {ours.model_digest[:12]}")
        assert theirs.model_digest[:12] in refused.json()["error"]
    from gqtok.service.client import TokenizerClient

    with TokenizerClient(other.url) as client:
        with pytest.raises(Exception, match="model_mismatch|409"):
            client.detokenize(np.asarray(grid)[None, None], model_digest=ours.model_digest)


def test_a_wrong_method_answers_405_with_allow(live_server):
    r = httpx.get(f"{live_server}/v1/tokenize")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"


def test_every_reference_in_the_schema_resolves(live_server):
    spec = httpx.get(f"{live_server}/openapi.json").json()

    def refs(node):
        if isinstance(node, dict):
            yield from ([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(spec))
    assert "#/components/schemas/DetokenizeResponse" in found
    missing = [r for r in found if r.split("/")[-1] not in spec["components"]["schemas"]]
    assert not missing


def test_the_pixel_limit_counts_the_padded_image(live_server, tiny_model, start_server):
    """A 1-pixel-wide image passes a limit on its own pixels but pads to 8 times as many: refused from its header.
    A grid wider than the compressed format holds is refused with 413, not a 500."""
    thin = png(np.zeros((1, 300_000, 3), np.uint8))  # 300,000 pixels, 2,400,000 once padded; the limit: 1,048,576
    for route in ("/v1/tokenize", "/v1/compress"):
        r = httpx.post(f"{live_server}{route}", content=thin, headers={"content-type": "image/png"}, timeout=60)
        assert_error(r, 413, "image_too_large", "300000x1 = 300000 pixels, 300000x8 = 2400000 once padded")
    big = start_server([tiny_model], "--max-image-pixels", "5000000")
    wide = png(np.zeros((1, 530_000, 3), np.uint8))  # a 66,250 wide grid
    r = httpx.post(f"{big.url}/v1/compress", content=wide, headers={"content-type": "image/png"}, timeout=60)
    assert_error(r, 413, "image_too_large", "66250x1 token grid is past the compressed format's 65535 per side")


# -- slow and vanishing clients ---------------------------------------------------------------------------------
def raw_upload(url: str, declared: int, sent: bytes) -> "socket.socket":
    """A POST /v1/tokenize that declares `declared` body bytes and sends only `sent`: a slow or vanished client."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /v1/tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {declared}\r\n"
                 "\r\n".encode() + sent)
    return sock


def read_answer(sock, timeout: float = 10) -> str:
    """The whole answer on a raw socket: until the connection closes or the declared body is in."""
    sock.settimeout(timeout)
    data = b""
    while True:
        head, _, body = data.partition(b"\r\n\r\n")
        length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
        if length and len(body) >= length[0]:
            return data.decode(errors="replace")
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode(errors="replace")
        data += chunk


def test_a_slow_body_gets_408_and_frees_its_slot_and_metrics_and_health_answer_under_overload(
        tiny_model, start_server, photos):
    """Uploads that stall fill the in-flight limit only until body_timeout_s: they get 408; meanwhile /metrics
    and /health/live answer at once; afterwards the server takes work again."""
    server = start_server([tiny_model], "--body-timeout-s", "2", "--max-concurrent-requests", "4")
    start = time.monotonic()
    stalled = [raw_upload(server.url, 100_000, png(photos[0])[:100]) for _ in range(4)]
    time.sleep(0.5)
    busy = httpx.post(f"{server.url}/v1/tokenize", content=png(photos[0]), headers={"content-type": "image/png"})
    assert_error(busy, 429, "too_many_requests")
    for path in ("/metrics", "/health/live"):
        t0 = time.monotonic()
        assert httpx.get(f"{server.url}{path}", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 1.0
    ready = httpx.get(f"{server.url}/health/ready")  # saturated: a balancer should send work elsewhere
    assert ready.status_code == 503 and ready.json()["saturated"] is True
    for sock in stalled:
        answer = read_answer(sock)
        assert answer.startswith("HTTP/1.1 408") and '"error_type":"body_timeout"' in answer, answer[:300]
        sock.close()
    assert time.monotonic() - start < 6
    ok = httpx.post(f"{server.url}/v1/tokenize", content=png(photos[0]), headers={"content-type": "image/png"})
    assert ok.status_code == 200
    assert 'route="/v1/tokenize",status="408"} 4.0' in httpx.get(f"{server.url}/metrics").text
    assert httpx.get(f"{server.url}/health/ready").json() | {"models": None} == {
        "ready": True, "draining": False, "saturated": False, "models": None}


def test_a_client_that_disconnects_mid_upload_is_a_client_abort_not_a_500(tiny_model, start_server, photos):
    server = start_server([tiny_model], "--log-level", "info")
    for _ in range(3):
        raw_upload(server.url, 100_000, png(photos[0])[:500]).close()
    time.sleep(1.0)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'route="/v1/tokenize",status="499"} 3.0' in metrics
    assert 'status="500"' not in metrics
    log = server.stop()
    assert "Traceback" not in log and "ClientDisconnect" not in log, log[-3000:]


def test_shutdown_with_stalled_uploads_ends_within_the_drain_timeout(tiny_model, start_server, photos):
    server = start_server([tiny_model], "--drain-timeout-s", "8", "--body-timeout-s", "60")
    stalled = [raw_upload(server.url, 100_000, png(photos[0])[:100]) for _ in range(3)]
    time.sleep(0.5)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    assert time.monotonic() - t0 < 8.5
    for sock in stalled:
        sock.close()


def test_base64_decoded_in_pieces_is_the_one_call_exactly():
    """The JSON body's images are decoded a piece at a time (service/requests.py): the same bytes as one
    b64decode for every length around the piece size, and the same refusals, padding at a piece's end included."""
    import binascii

    from gqtok.service.requests import B64_PIECE_CHARS, b64decode_in_pieces

    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 3, B64_PIECE_CHARS // 4 * 3 - 1, B64_PIECE_CHARS // 4 * 3, B64_PIECE_CHARS // 4 * 3 + 1,
              2 * B64_PIECE_CHARS + 5):
        raw = rng.bytes(n)
        assert b64decode_in_pieces(base64.b64encode(raw).decode()) == raw
    whole_piece = base64.b64encode(rng.bytes(B64_PIECE_CHARS // 4 * 3 - 1)).decode()  # ends in "=" at the boundary
    for bad in ("QQ==QUJD", "QQ=", "Q", "QUJ$", whole_piece + "QUJD"):
        with pytest.raises(binascii.Error):
            base64.b64decode(bad, validate=True)
        with pytest.raises(binascii.Error):
            b64decode_in_pieces(bad)
