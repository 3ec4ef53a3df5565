"""The Python client: its retry policy and request building against httpx.MockTransport (fast, no
server), then the real thing against a live uvicorn serving the tiny model (marked slow)."""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

import gqtok.service.client as client_mod
from gqtok.service.client import AsyncTokenizerClient, TokenizerClient, TokenizerError
from gqtok import photos as photo_files

NPY = "application/x-npy"


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


TOKENS = np.arange(2 * 2 * 3, dtype=np.uint16).reshape(1, 2, 2, 3)
IMG = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)


def error(status: int, error_type: str, message: str = "nope", **headers) -> httpx.Response:
    return httpx.Response(status, json={"error": message, "error_type": error_type}, headers=headers)


def ok_tokens() -> httpx.Response:
    return httpx.Response(200, content=npy(TOKENS), headers={"content-type": NPY})


class Script:
    """A mock server: answers the scripted responses in order (the last one repeats), records requests."""

    def __init__(self, *answers):
        self.answers, self.requests = list(answers), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer() if callable(answer) else answer


@pytest.fixture
def slept(monkeypatch) -> list[float]:
    """Waits the clients asked for, recorded instead of slept."""
    waits: list[float] = []

    async def async_sleep(s):
        waits.append(s)

    monkeypatch.setattr(client_mod, "_sleep", waits.append)
    monkeypatch.setattr(client_mod, "_async_sleep", async_sleep)
    return waits


def mock_client(script, **kw) -> TokenizerClient:
    return TokenizerClient("http://127.0.0.1:1", transport=httpx.MockTransport(script), **kw)


# -- retry policy ----------------------------------------------------------------------------------------------
def test_429_with_retry_after_is_retried_until_it_succeeds(slept):
    script = Script(error(429, "queue_full", **{"retry-after": "1"}), error(429, "queue_full", **{"retry-after": "1"}),
                    ok_tokens)
    with mock_client(script) as c:
        out = c.tokenize(IMG)
    assert np.array_equal(out, TOKENS) and out.dtype == np.uint16
    assert len(script.requests) == 3 and len(slept) == 2
    assert all(1.0 <= s <= 1.2 for s in slept), slept  # Retry-After (1 s) beats the 0.2 / 0.4 s backoff
    assert script.requests[0].content == script.requests[2].content  # the same body every attempt


def test_503_backs_off_exponentially_with_a_cap(slept):
    script = Script(*[error(503, "not_ready")] * 5, ok_tokens)
    with mock_client(script, retries=5, backoff=0.5, max_backoff=3.0) as c:
        c.tokenize(IMG)
    assert len(slept) == 5
    for got, base in zip(slept, [0.5, 1.0, 2.0, 3.0, 3.0]):
        assert base <= got <= base * 1.1 + 0.01  # plus at most 10 % jitter


def test_4xx_raises_at_once_with_the_servers_error(slept):
    script = Script(error(422, "invalid_image", "image is GIF; send PNG, JPEG or WebP"))
    with mock_client(script) as c, pytest.raises(TokenizerError) as e:
        c.tokenize(IMG)
    assert e.value.status == 422 and e.value.error_type == "invalid_image" and "GIF" in e.value.message
    assert "422 invalid_image" in str(e.value)
    assert len(script.requests) == 1 and slept == []


@pytest.mark.parametrize("status,error_type", [(400, "invalid_request"), (401, "unauthorized"),
                                               (404, "unknown_model"), (413, "payload_too_large"),
                                               (500, "inference_failed")])
def test_other_errors_are_not_retried(slept, status, error_type):
    script = Script(error(status, error_type))
    with mock_client(script) as c, pytest.raises(TokenizerError) as e:
        c.info()
    assert (e.value.status, e.value.error_type) == (status, error_type) and len(script.requests) == 1


def test_a_503_timeout_is_final_unless_asked(slept):
    """The server ran out of time for this request: sending it again would add work it cannot cancel."""
    script = Script(error(503, "timeout", "request took longer than 60 s", **{"retry-after": "1"}), ok_tokens)
    with mock_client(script) as c, pytest.raises(TokenizerError) as e:
        c.tokenize(IMG)
    assert e.value.error_type == "timeout" and len(script.requests) == 1 and slept == []
    script = Script(error(503, "timeout", **{"retry-after": "1"}), ok_tokens)
    with mock_client(script, retry_timeouts=True) as c:
        assert c.tokenize(IMG).shape == TOKENS.shape
    assert len(script.requests) == 2


def test_retries_exhausted_raise_the_last_429(slept):
    script = Script(error(429, "queue_full", "queue is full", **{"retry-after": "2"}))
    with mock_client(script, retries=3) as c, pytest.raises(TokenizerError) as e:
        c.tokenize([IMG, IMG])
    assert e.value.status == 429 and e.value.error_type == "queue_full" and e.value.retry_after == 2.0
    assert len(script.requests) == 4 and len(slept) == 3  # the first attempt and three retries


def test_retry_after_as_http_date_and_its_cap(slept):
    in_3s = email.utils.formatdate(time.time() + 3, usegmt=True)
    script = Script(error(503, "shutting_down", **{"retry-after": in_3s}),
                    error(503, "shutting_down", **{"retry-after": "86400"}), ok_tokens)
    with mock_client(script) as c:
        c.tokenize(IMG)
    assert 1.5 <= slept[0] <= 3.5, slept  # whole seconds in the header
    assert 60 <= slept[1] <= 66.1  # a day is capped at a minute


def test_connection_errors_are_retried_timeouts_are_not(slept):
    script = Script(httpx.ConnectError("refused"), httpx.RemoteProtocolError("closed"), ok_tokens)
    with mock_client(script) as c:
        assert c.tokenize(IMG).shape == (1, 2, 2, 3)
    assert len(slept) == 2
    script = Script(httpx.ReadTimeout("slow"))
    with mock_client(script) as c, pytest.raises(TokenizerError) as e:
        c.tokenize(IMG)
    assert e.value.status is None and e.value.error_type == "timeout" and len(script.requests) == 1
    script = Script(httpx.ConnectError("refused"))
    with mock_client(script, retries=2) as c, pytest.raises(TokenizerError) as e:
        c.info()
    assert e.value.error_type == "connection_error" and len(script.requests) == 3


def test_a_proxys_500_or_502_is_retried_and_an_error_body_that_is_not_ours_is_read(slept):
    """A 502 from a balancer in front (its replica died mid-request) is retried; the last one is read as ours is
    not (a balancer's HTML page)."""
    bad_gateway = httpx.Response(502, text="<html>bad gateway</html>")
    script = Script(bad_gateway, ok_tokens)
    with mock_client(script) as c:
        assert c.tokenize(IMG).shape == (1, 2, 2, 3)
    assert len(script.requests) == 2
    script = Script(bad_gateway)
    with mock_client(script, retries=1) as c, pytest.raises(TokenizerError) as e:
        c.models()
    assert e.value.status == 502 and e.value.error_type == "http_error" and "bad gateway" in e.value.message
    assert len(script.requests) == 2
    script = Script(httpx.Response(504, text="<html>gateway timeout</html>"))  # may still be working: final
    with mock_client(script) as c, pytest.raises(TokenizerError) as e:
        c.models()
    assert e.value.status == 504 and len(script.requests) == 1
    # Ray Serve's proxy answers a bare 500 when the replica died mid-request: retried; the service's own is final
    script = Script(httpx.Response(500, text="Internal Server Error"), ok_tokens)
    with mock_client(script) as c:
        assert c.tokenize(IMG).shape == (1, 2, 2, 3)
    script = Script(error(500, "internal", "unexpected error"), ok_tokens)
    with mock_client(script) as c, pytest.raises(TokenizerError) as e:
        c.tokenize(IMG)
    assert e.value.error_type == "internal" and len(script.requests) == 1


def test_async_client_has_the_same_retry_policy(slept):
    script = Script(error(429, "queue_full", **{"retry-after": "1"}), ok_tokens)
    script_422 = Script(error(422, "invalid_tokens", "token ids must lie in [0, 256)"))

    async def main():
        async with AsyncTokenizerClient("http://127.0.0.1:1", transport=httpx.MockTransport(script)) as c:
            out = await c.tokenize(IMG)
        async with AsyncTokenizerClient("http://127.0.0.1:1", transport=httpx.MockTransport(script_422)) as c:
            with pytest.raises(TokenizerError) as e:
                await c.detokenize(TOKENS)
        return out, e.value

    out, err = asyncio.run(main())
    assert np.array_equal(out, TOKENS) and len(script.requests) == 2 and len(slept) == 1 and slept[0] >= 1.0
    assert err.error_type == "invalid_tokens" and len(script_422.requests) == 1


# -- what goes on the wire -------------------------------------------------------------------------------------
def test_one_image_is_a_raw_png_body():
    script = Script(ok_tokens)
    with mock_client(script, api_key="s3cret", model="tiny") as c:
        c.tokenize(Image.fromarray(IMG), fit="crop")
    r = script.requests[0]
    assert r.method == "POST" and r.url.path == "/v1/tokenize"
    assert r.headers["content-type"] == "image/png" and r.headers["accept"] == NPY
    assert r.headers["authorization"] == "Bearer s3cret"
    assert dict(r.url.params) == {"model": "tiny", "fit": "crop"}
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), IMG)  # lossless


def test_several_images_are_multipart_and_files_keep_their_format(tmp_path):
    jpeg = io.BytesIO()
    Image.fromarray(IMG).save(jpeg, format="JPEG")
    (tmp_path / "x.jpg").write_bytes(jpeg.getvalue())
    script = Script(ok_tokens)
    with mock_client(script) as c:
        c.tokenize([IMG, Image.fromarray(IMG).convert("L"), jpeg.getvalue(), tmp_path / "x.jpg",
                    str(tmp_path / "x.jpg")])
    r = script.requests[0]
    assert r.headers["content-type"].startswith("multipart/form-data; boundary=")
    body = r.content
    assert body.count(b'name="image"') == 5
    assert body.count(b"Content-Type: image/png") == 2 and body.count(b"Content-Type: image/jpeg") == 3
    assert body.count(jpeg.getvalue()) == 3  # files are sent as they are, not re-encoded
    assert "authorization" not in r.headers and dict(r.url.params) == {"fit": "pad"}


def test_tokenize_json_asks_for_json():
    answer = {"model": "tiny", "results": [{"tokens": TOKENS[0].tolist(), "grid_size": [2, 3]}]}
    script = Script(httpx.Response(200, json=answer))
    with mock_client(script) as c:
        assert c.tokenize_json(png(IMG)) == answer
    assert script.requests[0].headers["accept"] == "application/json"


def info(limit: int) -> httpx.Response:
    return httpx.Response(200, json={"limits": {"max_images_per_request": limit}})


def test_detokenize_sends_npy_and_reads_npy_back():
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    script = Script(info(32), httpx.Response(200, content=npy(images), headers={"content-type": NPY}))
    with mock_client(script) as c:
        out = c.detokenize(np.concatenate([TOKENS, TOKENS]))
    assert script.requests[0].url.path == "/info"  # more than one grid: the server's limit, asked once
    r = script.requests[1]
    assert r.url.path == "/v1/detokenize" and r.headers["content-type"] == NPY and r.headers["accept"] == NPY
    sent = np.load(io.BytesIO(r.content))
    assert sent.shape == (2, 2, 2, 3) and sent.dtype == np.uint16
    assert [im.size for im in out] == [(24, 16)] * 2 and np.array_equal(np.asarray(out[1]), images[1])


class FakeDecoder:
    """A mock server whose /v1/detokenize answers each grid [t, h, w] with an h x w image filled with the grid's
    first id, so that a test can tell which grid came back where."""

    def __init__(self, limit: int):
        self.limit, self.batches = limit, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/info":
            return info(self.limit)
        grids = np.load(io.BytesIO(request.content))
        assert len(grids) <= self.limit
        self.batches.append(grids.shape)
        out = np.stack([np.full((g.shape[1], g.shape[2], 3), g.flat[0] % 256, np.uint8) for g in grids])
        return httpx.Response(200, content=npy(out), headers={"content-type": NPY})


def test_detokenize_splits_by_size_and_limit_and_keeps_the_order():
    grids = [np.full((1, 2 + i % 2, 3), i, np.uint16) for i in range(7)]  # two sizes, interleaved
    server = FakeDecoder(limit=2)
    with mock_client(server) as c:
        out = c.detokenize(grids, output="numpy")
    assert sorted(server.batches) == [(1, 1, 3, 3), (2, 1, 2, 3), (2, 1, 2, 3), (2, 1, 3, 3)]  # 4 + 3 grids, 2 a request
    assert isinstance(out, list) and [a.shape for a in out] == [(2 + i % 2, 3, 3) for i in range(7)]
    assert [int(a[0, 0, 0]) for a in out] == list(range(7))
    with mock_client(FakeDecoder(limit=3)) as c:  # one size, longer than the limit: one batch back
        same = c.detokenize(np.stack([np.full((1, 2, 3), i, np.uint16) for i in range(5)]), output="numpy")
    assert same.shape == (5, 2, 3, 3) and same[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    with mock_client(FakeDecoder(limit=3)) as c:
        with pytest.raises(ValueError, match="output must be one of pil, numpy, torch"):
            c.detokenize(grids, output="cv2")


def test_detokenize_returns_torch_tensors_channels_first():
    torch = pytest.importorskip("torch")
    with mock_client(FakeDecoder(limit=8)) as c:
        batch = c.detokenize(torch.full((2, 1, 2, 3), 51, dtype=torch.int32), output="torch")
        mixed = c.detokenize([torch.zeros(1, 2, 3, dtype=torch.int64), torch.zeros(1, 3, 3, dtype=torch.int64)],
                             output="torch")
    assert batch.dtype == torch.float32 and tuple(batch.shape) == (2, 3, 2, 3)
    assert torch.allclose(batch, torch.full_like(batch, 51 / 255))
    assert [tuple(t.shape) for t in mixed] == [(3, 2, 3), (3, 3, 3)]


def test_async_detokenize_splits_the_same_way():
    grids = [np.full((1, 2 + i % 2, 3), i, np.uint16) for i in range(5)]

    async def run():
        async with AsyncTokenizerClient("http://127.0.0.1:1", transport=httpx.MockTransport(FakeDecoder(2))) as c:
            return await c.detokenize(grids, output="numpy")

    assert [int(a[0, 0, 0]) for a in asyncio.run(run())] == list(range(5))


def test_detokenize_with_image_size_asks_the_server_to_crop_and_resize():
    script = Script(httpx.Response(200, content=npy(np.zeros((1, 13, 21, 3), np.uint8)), headers={"content-type": NPY}))
    with mock_client(script, model="tiny") as c:
        out = c.detokenize(TOKENS[0].tolist(), image_size=(np.int64(13), 21), output_size=(26, 42))
    r = script.requests[0]
    assert r.headers["content-type"] == NPY and r.headers["accept"] == NPY
    assert np.array_equal(np.load(io.BytesIO(r.content)), TOKENS[0])
    assert dict(r.url.params) == {"model": "tiny", "image_size": "13,21", "output_size": "26,42"}
    assert out[0].size == (21, 13)
    with mock_client(Script()) as c, pytest.raises(ValueError, match="output_size must be"):
        c.detokenize(TOKENS[0], output_size=(0, 5))
    with mock_client(Script()) as c, pytest.raises(ValueError, match="max_tokens must be"):
        c.tokenize(np.zeros((8, 8, 3), np.uint8), max_tokens=0)


def test_bad_input_is_refused_before_sending():
    script = Script(ok_tokens)
    with mock_client(script) as c:
        with pytest.raises(ValueError, match=r"\[0, 1\]"):  # floats are taken as 0-1; 0-255 floats are refused
            c.tokenize(IMG.astype(np.float32))
        with pytest.raises(TypeError, match="uint8 or float"):
            c.tokenize(IMG.astype(np.int32))
        with pytest.raises(ValueError, match="HxWx3"):
            c.tokenize(np.zeros((4, 4, 2), np.uint8))
        with pytest.raises(ValueError, match="no images"):
            c.tokenize([])
        with pytest.raises(ValueError, match="fit"):
            c.tokenize(IMG, fit="stretch")
        with pytest.raises(TypeError, match="integer"):
            c.detokenize([[0.5, 1.0]])
    assert script.requests == []


def test_model_info_and_codebook_default_to_the_servers_default_model():
    cb = np.ones((8, 4), np.float32)

    def server(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"models": [], "default": "m1"})
        if request.url.path == "/v1/models/m1/codebook":
            return httpx.Response(200, content=npy(cb), headers={"content-type": NPY})
        return httpx.Response(200, json={"model_id": request.url.path.rsplit("/", 1)[-1]})

    with mock_client(server) as c:
        assert c.model_info()["model_id"] == "m1" and c.model_info("m2")["model_id"] == "m2"
        assert np.array_equal(c.codebook(), cb)


def test_health_never_raises():
    with mock_client(Script(httpx.Response(200, json={"ready": True}))) as c:
        assert c.health() is True
    with mock_client(Script(error(503, "not_ready"))) as c:
        assert c.health() is False
    with mock_client(Script(httpx.ConnectError("refused"))) as c:
        assert c.health() is False


# -- against a live server: the tiny model (f=8, t=2, K=256, d=4) --------------------------------------------
@pytest.fixture(scope="module")
def photos(photos_dir) -> list[np.ndarray]:
    """Four held-out photos, centre-cropped to 64x96 (a multiple of f=8)."""
    paths = [photos_dir / f"{stem}.jpg" for stem in photo_files.HELDOUT[:4]]
    return [photo_files.center_crop(photo_files.load_rgb(p), (64, 96)) for p in paths]


@pytest.mark.slow
def test_live_tokenize_and_round_trip(live_server, tiny_model, photos):
    from gqtok.core.artifact import load_artifact
    from gqtok.service.runtime import TokenizerRuntime

    rt = TokenizerRuntime(load_artifact(tiny_model), device="cpu", threads=1)
    with TokenizerClient(live_server) as c:
        ids = c.tokenize(photos[0])
        assert ids.shape == (1, 2, 8, 12) and ids.dtype == np.uint16 and int(ids.max()) < 256
        js = c.tokenize_json(photos[0])
        assert js["model"] == "tiny" and js["results"][0]["grid_size"] == [8, 12]
        assert np.array_equal(np.array(js["results"][0]["tokens"]), ids[0])
        images = c.detokenize(ids)
        assert len(images) == 1 and images[0].size == (96, 64) and images[0].mode == "RGB"
        # exactly what the model gives in process: nothing lost or reordered on the way
        assert np.array_equal(ids, rt.tokenize(photos[0][None]))
        assert np.array_equal(np.asarray(images[0]), rt.detokenize(rt.tokenize(photos[0][None]))[0])
        # one grid (t, h, w) and nested lists decode to the same pixels
        assert np.array_equal(np.asarray(c.detokenize(ids[0])[0]), np.asarray(images[0]))
        assert np.array_equal(np.asarray(c.detokenize(js["results"][0]["tokens"])[0]), np.asarray(images[0]))


@pytest.mark.slow
def test_live_compress_and_decompress(live_server, tiny_model, photos):
    from gqtok.core.artifact import load_artifact
    from gqtok.core.bitstream import read_header
    from gqtok.service.compressor import ImageCompressor

    local = ImageCompressor(load_artifact(tiny_model))
    img = photos[1][:50, :77]
    with TokenizerClient(live_server) as c:
        data = c.compress(img, prior="frequency")
        assert read_header(data).prior == "frequency" and data == local.compress(img, "frequency")
        image = c.decompress(data)
        assert image.size == (77, 50) and np.array_equal(np.asarray(image), local.decompress(data)[0])
        with pytest.raises(TokenizerError) as e:
            c.decompress(data[:-1])
        assert e.value.status == 422 and e.value.error_type == "invalid_bitstream"


@pytest.mark.slow
def test_live_odd_size_pads_and_crops_back(live_server, photos):
    img = photos[1][:61, :83]
    with TokenizerClient(live_server) as c:
        ids = c.tokenize(img)
        assert ids.shape == (1, 2, 8, 11)
        assert c.tokenize(img, fit="crop").shape == (1, 2, 7, 10)
        with pytest.raises(TokenizerError) as e:
            c.tokenize(img, fit="exact")
        assert e.value.status == 422 and e.value.error_type == "invalid_image"
        (out,) = c.detokenize(ids, image_size=(61, 83))
        assert out.size == (83, 61)
        (full,) = c.detokenize(ids)
        assert full.size == (88, 64) and np.array_equal(np.asarray(full)[:61, :83], np.asarray(out))


@pytest.mark.slow
def test_live_several_images_make_one_batch(live_server, photos, photos_dir, tmp_path):
    jpg = photos_dir / f"{photo_files.HELDOUT[0]}.jpg"
    crop = tmp_path / "crop.jpg"
    Image.fromarray(photos[3]).save(crop, quality=95)
    with TokenizerClient(live_server) as c:
        singles = np.concatenate([c.tokenize(x) for x in photos])
        batch = c.tokenize(photos)
        assert batch.shape == (4, 2, 8, 12) and np.array_equal(batch, singles)
        # PIL images, encoded bytes and paths mix in one request
        mixed = c.tokenize([Image.fromarray(photos[0]), png(photos[1]), crop, str(crop)])
        assert np.array_equal(mixed[:2], singles[:2]) and np.array_equal(mixed[2], mixed[3])
        assert np.array_equal(mixed[2], c.tokenize(crop.read_bytes())[0])
        images = c.detokenize(batch)
        assert [im.size for im in images] == [(96, 64)] * 4
        # images of different grid sizes cannot share one array; JSON holds them
        with pytest.raises(TokenizerError) as e:
            c.tokenize([photos[0], photos[1][:32]])
        assert e.value.status == 406 and e.value.error_type == "not_acceptable"
        js = c.tokenize_json([photos[0], photos[1][:32], jpg])
        assert [r["grid_size"] for r in js["results"]][:2] == [[8, 12], [4, 12]]


@pytest.mark.slow
def test_live_tokenize_many_chunks_mixes_sizes_and_isolates_bad_images(tiny_model, start_server, photos):
    """Seven images, two sizes and one broken file, against a server that takes 3 per request: per image its
    tokens (the same as alone) or its own error, from 3 requests; float, channels-first and torch inputs give the
    tokens of the uint8 image."""
    import torch

    server = start_server([tiny_model], "--max-images-per-request", "3")
    images = [photos[0], photos[1][:40, :56], b"not an image", photos[2], photos[3][:32], photos[1], photos[0][::-1]]
    with TokenizerClient(server.url) as c:
        results = c.tokenize_many(images)
        async_results = asyncio.run(_tokenize_many_async(server.url, images))
        alone = [c.tokenize(x)[0] if not isinstance(x, bytes) else None for x in images]
        float_chw = c.tokenize(photos[0].transpose(2, 0, 1).astype(np.float32) / 255)
        tensor = c.tokenize(torch.from_numpy(photos[0].copy()))
    assert len(results) == 7 and isinstance(results[2], TokenizerError)
    assert results[2].status == 422 and results[2].error_type == "invalid_image" and "image 2" in results[2].message
    for got, want in zip(results, alone):
        if want is not None:
            assert got.dtype == np.int64 and np.array_equal(got, want)
    assert all(np.array_equal(a, b) for a, b in zip(async_results, results) if not isinstance(b, TokenizerError))
    assert np.array_equal(float_chw[0], alone[0]) and np.array_equal(tensor[0], alone[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        c.tokenize(photos[0].astype(np.float32))


async def _tokenize_many_async(url, images):
    async with AsyncTokenizerClient(url) as c:
        return await c.tokenize_many(images)


@pytest.mark.slow
def test_live_async_client_gives_the_same_tokens(live_server, photos):
    with TokenizerClient(live_server) as c:
        expected = c.tokenize(photos)
        expected_images = [np.asarray(im) for im in c.detokenize(expected)]

    async def main():
        async with AsyncTokenizerClient(live_server) as c:
            singles = await asyncio.gather(*(c.tokenize(x) for x in photos))  # concurrent: batched server side
            batch = await c.tokenize(photos)
            images = await c.detokenize(batch)
            return singles, batch, images, await c.codebook(), await c.info(), await c.health()

    singles, batch, images, cb, info, healthy = asyncio.run(main())
    assert np.array_equal(np.concatenate(singles), expected) and np.array_equal(batch, expected)
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(images, expected_images))
    assert cb.shape == (256, 4) and info["default_model"] == "tiny" and healthy is True


@pytest.mark.slow
def test_live_metadata_codebook_health(live_server, tiny_model):
    from gqtok.core.artifact import load_artifact

    with TokenizerClient(live_server) as c:
        assert c.health() is True
        info = c.info()
        assert info["models"] == ["tiny"] and info["default_model"] == "tiny"
        models = c.models()
        assert models["default"] == "tiny" and [m["model_id"] for m in models["models"]] == ["tiny"]
        meta = c.model_info()
        assert meta == c.model_info("tiny")
        assert (meta["num_codes"], meta["token_dim"], meta["tokens_per_position"], meta["downsample"]) == (256, 4, 2, 8)
        cb = c.codebook()
        assert cb.shape == (256, 4) and cb.dtype == np.float32
        assert np.array_equal(cb, load_artifact(tiny_model).codebook)
        with pytest.raises(TokenizerError) as e:
            c.codebook("nope")
        assert e.value.status == 404 and e.value.error_type == "unknown_model"
        with pytest.raises(TokenizerError) as e:
            c.tokenize(b"not an image")
        assert e.value.status == 422 and e.value.error_type == "invalid_image"
        with pytest.raises(TokenizerError) as e:
            c.detokenize(np.full((2, 3, 3), 256))
        assert e.value.status == 422 and e.value.error_type == "invalid_tokens"
    # nothing listens there: not healthy, and a call fails as a connection error after its retries
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with TokenizerClient(dead, retries=1, backoff=0.01) as c:
        assert c.health() is False
        with pytest.raises(TokenizerError) as e:
            c.info()
        assert e.value.status is None and e.value.error_type == "connection_error"


@pytest.mark.slow
def test_live_client_rides_out_a_full_queue(tiny_model, start_server, photos):
    """A real 429 storm: a queue of 2 that is held 300 ms (batches of 8 never fill) and 6 concurrent
    requests; without retries some are refused, with them every one succeeds."""
    from concurrent.futures import ThreadPoolExecutor

    server = start_server([tiny_model], "--max-queue-size", "2", "--max-batch-size", "8", "--max-queue-delay-ms", "300")

    def burst(client):
        def call(i):
            try:
                return client.tokenize(photos[i % 4])
            except TokenizerError as e:
                return e

        with ThreadPoolExecutor(6) as pool:
            return list(pool.map(call, range(6)))

    with TokenizerClient(server.url) as c:
        expected = [c.tokenize(x) for x in photos]
        with TokenizerClient(server.url, retries=0) as no_retry:
            outcomes = burst(no_retry)
        refused = [e for e in outcomes if isinstance(e, TokenizerError)]
        assert refused and all(e.status == 429 and e.error_type == "queue_full" and e.retry_after == 1
                               for e in refused), outcomes
        got = burst(c)
    assert all(np.array_equal(g, expected[i % 4]) for i, g in enumerate(got)), got


@pytest.mark.slow
def test_live_api_key(tiny_model, start_server, photos):
    server = start_server([tiny_model], env={"GQTOK_API_KEY": "s3cret"})
    with TokenizerClient(server.url, api_key="s3cret") as c:
        assert c.tokenize(photos[0]).shape == (1, 2, 8, 12) and c.info()["auth"] is True
    with TokenizerClient(server.url) as c:
        assert c.health() is True  # probes need no key
        with pytest.raises(TokenizerError) as e:
            c.tokenize(photos[0])
        assert e.value.status == 401 and e.value.error_type == "unauthorized"


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF"])
def test_formats_the_server_does_not_take_go_as_png(fmt, tmp_path):
    """BMP, GIF and TIFF files that Pillow reads are converted to PNG (first frame), by path or by bytes."""
    buf = io.BytesIO()
    Image.fromarray(IMG).save(buf, format=fmt)
    (tmp_path / f"x.{fmt.lower()}").write_bytes(buf.getvalue())
    script = Script(ok_tokens)
    with mock_client(script) as c:
        c.tokenize(buf.getvalue())
        c.tokenize(tmp_path / f"x.{fmt.lower()}")
    for r in script.requests:
        assert r.headers["content-type"] == "image/png"
        sent = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
        expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))  # GIF: its palette's colours
        assert np.array_equal(sent, expected)


def test_bytes_pillow_cannot_read_are_sent_for_the_server_to_name():
    script = Script(ok_tokens)
    with mock_client(script) as c:
        c.tokenize(b"hello, not an image")
    assert script.requests[0].content == b"hello, not an image"


@pytest.mark.slow
def test_live_token_budget_with_both_clients(live_server, photos_dir):
    """A 3:2 photo under a budget of 24 tokens (t=2: 12 positions): resized with its aspect kept to a grid within
    the budget, and given back at its own size."""
    import asyncio

    photo = photo_files.center_crop(photo_files.load_rgb(photos_dir / f"{photo_files.HELDOUT[0]}.jpg"), (120, 180))
    with TokenizerClient(live_server) as c:
        ids = c.tokenize(photo, max_tokens=24)
        result = c.tokenize_json(photo, max_tokens=24)["results"][0]
        full = c.tokenize_json(photo)["results"][0]
        back = c.detokenize(ids, image_size=result["resized_size"], output_size=result["original_size"],
                            output="numpy")
    h, w = result["grid_size"]
    assert ids.shape[0] == 1 and ids.shape[1] * h * w <= 24 and (ids.shape[2], ids.shape[3]) == (h, w)
    assert result["original_size"] == [120, 180] and full["resized_size"] == [120, 180]
    rh, rw = result["resized_size"]
    assert rh < 120 and abs(rw / rh - 1.5) < 0.1  # smaller, aspect kept
    assert back.shape == (1, 120, 180, 3)

    async def run_async():
        from gqtok.service.client import AsyncTokenizerClient

        async with AsyncTokenizerClient(live_server) as ac:
            a_ids = await ac.tokenize(photo, max_tokens=24)
            a_back = await ac.detokenize(a_ids, image_size=result["resized_size"],
                                         output_size=result["original_size"], output="numpy")
        return a_ids, a_back

    a_ids, a_back = asyncio.run(run_async())
    assert np.array_equal(a_ids, ids) and np.array_equal(a_back, back)
