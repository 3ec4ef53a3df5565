"""The embedded default model: `gqtok serve` with no arguments serves it (the README's first command)."""

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from gqtok.core.artifact import load_artifact
from gqtok.training import data as photo_data

DEFAULT = Path(__file__).resolve().parents[1] / "models" / "default"
pytestmark = pytest.mark.slow


def test_embedded_model_is_complete_and_small():
    art = load_artifact(DEFAULT)  # every digest and the codebook check out
    m = art.manifest
    assert (m.downsample, m.latent_channels, m.token_dim, m.num_codes) == (8, 16, 16, 2**16)
    assert sum(p.stat().st_size for p in DEFAULT.iterdir()) <= 40 * 2**20
    assert m.eval and m.eval["quantized"]["psnr"] > 15 and m.training["step"] > 0


def test_serve_with_no_arguments_tokenizes_a_photo(start_server, photos_dir):
    server = start_server([])  # no --model: models/default
    meta = httpx.get(f"{server.url}/v1/models").json()
    assert meta["default"] == json.loads((DEFAULT / "manifest.json").read_text())["model_id"]
    _, held = photo_data.split_heldout(photo_data.list_images(photos_dir))
    img = photo_data.center_crop(photo_data.load_rgb(held[0]), (256, 256))
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
