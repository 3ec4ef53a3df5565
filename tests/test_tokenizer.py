"""service/tokenizer.py: the in-process Tokenizer gives the server's tokens, on every kind of input."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from gqtok import Tokenizer
from gqtok import photos as photo_files

NPY = "application/x-npy"


@pytest.fixture(scope="module")
def tok(tiny_model) -> Tokenizer:
    return Tokenizer.load(str(tiny_model), device="cpu")


@pytest.fixture(scope="module")
def photo(photos_dir) -> np.ndarray:
    """A real photo crop whose sides are not multiples of f (59x90): fit matters."""
    path = photo_files.list_images(photos_dir)[3]
    return photo_files.center_crop(photo_files.load_rgb(path), (59, 90))


def test_round_trip_equals_the_runtime(tok, photo):
    ids = tok.encode(photo)
    padded = np.pad(photo, ((0, 5), (0, 6), (0, 0)), mode="edge")  # fit=pad: edges repeated up to 64x96
    assert ids.dtype == np.int64 and ids.shape == (1, tok.manifest.tokens_per_position, 8, 12)
    assert np.array_equal(ids, tok.runtime.tokenize(padded[None]))
    images = tok.decode(ids)
    assert images.dtype == np.uint8 and images.shape == (1, 64, 96, 3)
    assert np.array_equal(images, tok.runtime.detokenize(ids))
    assert np.array_equal(tok.encode(photo, fit="crop"), tok.runtime.tokenize(photo[None, 1:57, 1:89]))
    with pytest.raises(ValueError, match="fit=exact needs multiples of 8"):
        tok.encode(photo, fit="exact")


def test_every_input_kind_gives_the_same_tokens(tok, photo):
    torch = pytest.importorskip("torch")
    expected = tok.encode(photo)
    chw_float = photo.transpose(2, 0, 1).astype(np.float32) / 255
    for same in (Image.fromarray(photo), chw_float, torch.from_numpy(chw_float), torch.from_numpy(photo.copy())):
        assert np.array_equal(tok.encode(same), expected)
    batch = tok.encode(np.stack([photo, photo[::-1]]))
    assert batch.shape[0] == 2 and np.array_equal(batch[:1], expected)  # a batch does not change a token
    mixed = tok.encode([photo, photo[:40], photo])  # two sizes: a list, in order
    assert isinstance(mixed, list) and [m.shape[1:] for m in mixed] == [(8, 12), (5, 12), (8, 12)]
    assert np.array_equal(mixed[0], expected[0]) and np.array_equal(mixed[2], expected[0])
    tensors = tok.decode(torch.from_numpy(expected), output="torch")
    assert tensors.dtype == torch.float32 and tuple(tensors.shape) == (1, 3, 64, 96)
    assert np.array_equal(np.round(tensors.numpy() * 255).astype(np.uint8).transpose(0, 2, 3, 1), tok.decode(expected))
    assert np.array_equal(np.asarray(tok.decode(expected, output="pil")[0]), tok.decode(expected)[0])


def test_posterior_selects_the_tokens_and_its_kl_matches_training(tok, photo):
    torch = pytest.importorskip("torch")
    from gqtok.training.model import kl_bits_per_token

    mu, sigma = tok.encode_posterior(photo)
    m = tok.manifest
    assert mu.shape == sigma.shape == (1, m.tokens_per_position, 8, 12, m.token_dim) and (sigma > 0).all()
    flat = tok.runtime.quantizer.select(mu.reshape(-1, m.token_dim), 2 * np.log(sigma.reshape(-1, m.token_dim)))
    assert np.array_equal(flat.reshape(1, m.tokens_per_position, 8, 12), tok.encode(photo))
    raw_mu, raw_logvar = tok.runtime.encode(np.pad(photo, ((0, 5), (0, 6), (0, 0)), mode="edge")[None])
    expected = kl_bits_per_token(torch.from_numpy(raw_mu), torch.from_numpy(raw_logvar), m.token_dim).numpy()
    assert np.allclose(tok.kl_bits(mu, sigma), expected, rtol=1e-4, atol=1e-3)


def test_bad_token_ids_are_refused_by_name(tok):
    t = tok.manifest.tokens_per_position
    with pytest.raises(ValueError, match=r"must be in \[0, "):
        tok.decode(np.full((1, t, 2, 2), tok.manifest.num_codes))
    with pytest.raises(ValueError, match="tokens per position"):
        tok.decode(np.zeros((1, t + 1, 2, 2), np.int64))
    with pytest.raises(ValueError, match="integers"):
        tok.decode(np.zeros((1, t, 2, 2), np.float32))
    with pytest.raises(ValueError, match="output must be"):
        tok.decode(np.zeros((1, t, 2, 2), np.int64), output="cv2")


@pytest.mark.slow
def test_the_same_tokens_as_the_server(tok, photo, live_server):
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    for fit in ("pad", "crop"):
        r = httpx.post(f"{live_server}/v1/tokenize", content=buf.getvalue(), params={"fit": fit},
                       headers={"content-type": "image/png", "accept": NPY}, timeout=60)
        assert r.status_code == 200, r.text
        assert np.array_equal(np.load(io.BytesIO(r.content)).astype(np.int64), tok.encode(photo, fit=fit))


def test_encode_takes_what_the_client_takes_paths_and_encoded_bytes(tok, photo, tmp_path):
    data = io.BytesIO()
    Image.fromarray(photo).save(data, format="PNG")
    (tmp_path / "p.png").write_bytes(data.getvalue())
    want = tok.encode(photo)
    for given in (tmp_path / "p.png", str(tmp_path / "p.png"), data.getvalue(), bytearray(data.getvalue())):
        assert np.array_equal(tok.encode(given), want), type(given)
    assert np.array_equal(tok.encode([data.getvalue(), photo]), np.concatenate([want, want]))


def mpo_bytes(img: np.ndarray) -> bytes:
    """A two-frame MPO (a phone camera's layout): the first frame is the picture."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="MPO", save_all=True, append_images=[Image.fromarray(img[::-1])])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    return buf.getvalue()


def test_mpo_is_its_first_frame_in_process_in_bulk_and_at_the_server(tok, photo, live_server, tmp_path):
    from pathlib import Path

    from gqtok.bulk.preprocess import Preprocess
    from gqtok.bulk.shards import Job, file_views

    data = mpo_bytes(photo)
    first = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    want = tok.encode(first)
    assert np.array_equal(tok.encode(data), want)
    r = httpx.post(f"{live_server}/v1/tokenize", content=data, headers={"content-type": "image/jpeg",
                                                                        "accept": NPY})
    assert r.status_code == 200, r.text
    assert np.array_equal(np.load(io.BytesIO(r.content)), want)
    (tmp_path / "phone.jpg").write_bytes(data)
    views, entry = file_views(str(tmp_path / "phone.jpg"),
                              Job((str(tmp_path / "phone.jpg"),), Path("unused"), Preprocess(size=0)), 8)
    assert entry["status"] == "ok" and np.array_equal(tok.encode(views[0], fit="exact"), want)
