"""generator/: the autoregressive model, its sampling, and the whole path against a live tokenizer."""

import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import LiveServer
from gqtok.core.layout import grids_to_sequences, sequences_to_grids
from gqtok.generator.model import ARTransformer, GeneratorConfig, sample_next


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    cfg = GeneratorConfig(vocab_size=50, grid=(3, 4), tokens_per_position=2, n_layer=2, n_head=2, n_embd=32)
    model = ARTransformer(cfg, codebook=np.random.default_rng(0).standard_normal((50, 4)))
    for p in model.parameters():  # away from the near-uniform start, so that the tests below can fail
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def test_sequences_are_raster_order_with_the_position_tokens_innermost():
    grids = np.arange(2 * 2 * 3 * 4).reshape(2, 2, 3, 4)
    seqs = grids_to_sequences(grids)
    assert seqs[0, :4].tolist() == [grids[0, 0, 0, 0], grids[0, 1, 0, 0], grids[0, 0, 0, 1], grids[0, 1, 0, 1]]
    assert np.array_equal(sequences_to_grids(seqs, 2, (3, 4)), grids)


def test_kv_cache_gives_the_logits_of_the_full_forward(small_model):
    """Step by step with the cache, each position's logits equal the teacher-forced pass."""
    ids = torch.randint(0, 50, (3, small_model.cfg.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = small_model(ids)
        caches = [None] * len(small_model.blocks)
        for i in range(ids.shape[1]):
            x = small_model.start.expand(3, 1, -1) if i == 0 else small_model.tok_emb(ids[:, i - 1 : i])
            x = x + small_model.pos_emb[:, i : i + 1]
            for j, block in enumerate(small_model.blocks):
                x, caches[j] = block(x, caches[j])
            torch.testing.assert_close(small_model.head(small_model.ln_f(x))[:, 0], full[:, i], atol=1e-5, rtol=1e-4)


def test_generation_with_and_without_the_cache_agrees_and_seeds_repeat(small_model):
    a = small_model.generate(4, temperature=1.0, seed=3)
    assert a.shape == (4, 24) and int(a.max()) < 50
    assert torch.equal(a, small_model.generate(4, temperature=1.0, seed=3, use_cache=False))
    assert torch.equal(a, small_model.generate(4, temperature=1.0, seed=3))
    assert not torch.equal(a, small_model.generate(4, temperature=1.0, seed=4))


def test_temperature_top_k_and_top_p():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0]]).repeat(2000, 1)
    assert (sample_next(logits, 0.0, None, None, gen) == 1).all()  # greedy
    assert set(sample_next(logits, 1.0, 2, None, gen).tolist()) == {1, 3}  # top-k keeps the 2 likeliest
    # p(1) = 0.53, p(3) = 0.32: top_p 0.5 keeps id 1 alone, 0.6 keeps ids 1 and 3
    assert set(sample_next(logits, 1.0, None, 0.5, gen).tolist()) == {1}
    assert set(sample_next(logits, 1.0, None, 0.6, gen).tolist()) == {1, 3}
    assert len(set(sample_next(logits, 1.0, None, None, gen).tolist())) == 5
    hot = sample_next(logits, 100.0, None, None, gen)  # a high temperature flattens: id 4 becomes common
    assert (hot == 4).float().mean() > 0.1


@pytest.mark.slow
def test_train_and_serve_against_a_live_tokenizer(live_server, small_photos, tmp_path):
    """Tokenize through the service, train a few steps, then POST /generate decodes samples through it too."""
    from gqtok.generator.train import load_generator, train_generator

    run = tmp_path / "gen"
    summary = train_generator(run, live_server, small_photos, {"grid": (4, 6), "n_layer": 2, "n_embd": 64},
                              {"steps": 40, "batch_size": 16, "crops_per_photo": 4, "eval_every": 20, "lr": 3e-3},
                              progress=False)
    assert summary["log2_k"] == 8.0 and summary["train_sequences"] == 12 * 4 and summary["val_sequences"] == 3
    first, last = summary["log"][0]["val_bits_per_token"], summary["val_bits_per_token"]
    assert last < 8.0 and last <= first  # it learned something about the tokens
    model, loaded = load_generator(run)
    assert loaded["val_bits_per_token"] == last and model.cfg.seq_len == 2 * 4 * 6
    assert (run / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by a container's other user

    server = LiveServer([], "--tokenizer-url", live_server, command=["generator", "serve", str(run)])
    try:
        url = server.url
        r = httpx.post(f"{url}/generate", json={"n": 4, "seed": 7, "top_k": 50}, timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        sheet = Image.open(io.BytesIO(r.content))
        assert sheet.size == (2 * 48 + 2, 2 * 32 + 2)  # 2 x 2 grid of 48x32 samples, 2 px apart
        assert float(r.headers["x-tokens-per-second"]) > 0 and r.headers["x-seed"] == "7"
        again = httpx.post(f"{url}/generate", json={"n": 4, "seed": 7, "top_k": 50}, timeout=120)
        assert again.content == r.content  # same seed, same images
        other = httpx.post(f"{url}/generate", json={"n": 4, "seed": 8, "top_k": 50}, timeout=120)
        assert other.content != r.content
        for bad, field in (({"n": 0}, "n"), ({"n": 17}, "n"), ({"temperature": -1}, "temperature"),
                           ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"), ({"steps": 3}, "steps")):
            b = httpx.post(f"{url}/generate", json=bad, timeout=30)
            assert b.status_code == 400 and b.json()["error_type"] == "invalid_request" and field in b.json()["error"]
        info = httpx.get(f"{url}/info").json()
        assert info["val_bits_per_token"] == last and info["tokenizer"]["model"] == "tiny"
    finally:
        server.stop()


def test_train_from_token_shards_checks_the_model(live_server, tiny_model, small_photos, tmp_path):
    """`gqtok generator train --tokens DIR`: trains on pre-tokenized shards, validates on the held-out photos'
    rows, and refuses shards that another model (or version) made."""
    import json
    import shutil

    from gqtok.bulk.preprocess import Preprocess
    from gqtok.bulk.shards import Job, list_inputs, run_local
    from gqtok.generator.train import train_generator
    from gqtok.service.tokenizer import Tokenizer

    tokens = tmp_path / "tokens"
    job = Job(list_inputs([small_photos]), tokens, Preprocess(size=32, crop="ten"), shard_size=8)
    run_local(job, Tokenizer.load(str(tiny_model), device="cpu").runtime, progress=False)
    summary = train_generator(tmp_path / "gen", live_server, small_photos, {"n_layer": 1, "n_embd": 32},
                              {"steps": 10, "batch_size": 8, "eval_every": 10}, progress=False, tokens_dir=tokens)
    assert tuple(summary["model"]["grid"]) == (4, 4)  # from the shards
    assert summary["train_sequences"] == 12 * 10 and summary["val_sequences"] == 3 * 10  # ten views per photo
    assert summary["val_bits_per_token"] is not None and summary["tokenizer"]["tokens"] == str(tokens)

    stale = tmp_path / "stale"
    shutil.copytree(tokens, stale)
    meta = json.loads((stale / "meta.json").read_text())
    meta["model"] |= {"model_version": "an-older-export", "model_digest": "0" * 64}  # another export's tokens
    (stale / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tokenize the data again"):
        train_generator(tmp_path / "gen2", live_server, small_photos, {"n_layer": 1, "n_embd": 32},
                        {"steps": 1}, progress=False, tokens_dir=stale)
