"""Baselines through the shared training loop and evaluation: each trains a few real steps and evaluates."""

import numpy as np
import pytest
import torch

from gqtok.training.evaluate import evaluate
from gqtok.training.quantizers.tokenbridge import GaussianScalarQuantizer
from gqtok.training.train import load_run, train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("quantizer,channels,bits", [("vq", 8, 8.0), ("fsq", 6, np.log2(64000)), ("lfq", 8, 8.0),
                                                     ("bsq", 8, 8.0)])
def test_baseline_trains_and_evaluates(quantizer, channels, bits, small_photos, tmp_path):
    run = tmp_path / quantizer
    last = train(run, small_photos, "tiny", {"quantizer": quantizer, "latent_channels": channels,
                                             "token_dim": channels, "steps": 4, "crop": 32}, progress=False)
    assert "kl_mean" not in last and any(k.startswith("q_") for k in last)
    r = evaluate(run, small_photos, size=(64, 64), limit=1, progress=False)
    assert r["method"] == quantizer and r["rate"]["bits_per_token"] == pytest.approx(bits)
    assert r["rate"]["tokens_per_image"] == 64 and r["kl_bits_per_token"] is None
    assert 0 < r["quantized"]["psnr"] < 60 and r["codebook"]["tokens_counted"] == 64
    with pytest.raises(ValueError, match="GQ needs a Gaussian VAE"):
        evaluate(run, small_photos, size=(64, 64), limit=1, progress=False, method="gq")


def test_two_tokens_per_position_and_vq_remedies(small_photos, tmp_path):
    """FSQ at twice the rate (12 channels, two 6-channel tokens per position, one grid for both) and VQ with the
    practitioners' remedies (EMA codebook, dead-code restarts, normalized lookup) through training and evaluation."""
    fsq = train(tmp_path / "fsq2", small_photos, "tiny", {"quantizer": "fsq", "latent_channels": 12, "token_dim": 6,
                                                        "steps": 3, "crop": 32}, progress=False)
    r = evaluate(tmp_path / "fsq2", small_photos, size=(64, 64), limit=1, progress=False)
    assert r["rate"]["tokens_per_image"] == 2 * 64 and r["rate"]["bpp"] == pytest.approx(2 * np.log2(64000) / 64)
    assert r["codebook"]["tokens_counted"] == 128 and 0 < r["quantized"]["psnr"] < 60 and "q_usage" in fsq
    train(tmp_path / "vq", small_photos, "tiny", {"quantizer": "vq", "vq_remedies": True, "latent_channels": 8,
                                                  "token_dim": 8, "steps": 3, "crop": 32}, progress=False)
    model, _ = load_run(tmp_path / "vq")
    q = model.quantizer
    assert q.ema_decay == 0.99 and q.normalize and q.dead_code_restart
    assert "quantizer.codebook" not in dict(model.named_parameters())  # the EMA moves it, not the optimizer
    assert not torch.equal(q.ema_count, torch.ones_like(q.ema_count))  # three steps of EMA were saved
    r = evaluate(tmp_path / "vq", small_photos, size=(64, 64), limit=1, progress=False)
    assert r["method"] == "vq" and 0 < r["quantized"]["psnr"] < 60
    with pytest.raises(ValueError, match="vq_remedies applies to the vq quantizer"):
        train(tmp_path / "bad", small_photos, "tiny", {"quantizer": "fsq", "vq_remedies": True, "latent_channels": 6,
                                                       "token_dim": 6, "steps": 1}, progress=False)


def test_plain_kl_with_gq_and_tokenbridge(small_photos, tmp_path):
    run = tmp_path / "plain"
    last = train(run, small_photos, "tiny", {"kl_mode": "fixed", "kl_weight": 1e-4, "steps": 4, "crop": 32},
                 progress=False)
    assert "lam" not in last and "kl_mean" in last  # KL logged, no TDC scalars moving
    gq = evaluate(run, small_photos, size=(64, 64), limit=1, progress=False)
    tb = evaluate(run, small_photos, size=(64, 64), limit=1, progress=False, method="tokenbridge", tokenbridge_levels=2)
    assert gq["method"] == "gq" and tb["method"] == "tokenbridge"
    # tiny has C = 8 channels: 8 one-bit tokens per position at 2 levels (GQ: 2 tokens of 8 bits)
    assert tb["rate"]["tokens_per_image"] == 8 * 8 * 8 and tb["rate"]["bits_per_token"] == 1.0
    assert tb["codebook"]["size"] == 2 and tb["quantization_error_in_sigmas"] is not None


def test_tokenbridge_bins_are_equal_probability():
    q = GaussianScalarQuantizer(levels=8)
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(0)).reshape(1, 1, 400, 500)
    counts = torch.bincount(q.encode(z).flatten(), minlength=8).float() / z.numel()
    assert torch.allclose(counts, torch.full((8,), 1 / 8), atol=0.004)
    # each level's value is its bin's mean under N(0, 1), symmetric around 0
    ids = q.encode(z)
    for k in range(8):
        assert q.centers[k].item() == pytest.approx(z[ids == k].mean().item(), abs=0.02)
    assert torch.allclose(q.centers, -q.centers.flip(0), atol=1e-6)
    assert torch.equal(q.encode(q.centers.reshape(1, 8, 1, 1)).flatten(), torch.arange(8))
    with pytest.raises(ValueError):
        GaussianScalarQuantizer(levels=6)


def test_export_refuses_a_baseline(small_photos, tmp_path):
    from gqtok.export.exporter import export_run

    train(tmp_path / "fsq", small_photos, "tiny", {"quantizer": "fsq", "latent_channels": 6, "token_dim": 6,
                                                   "steps": 1, "crop": 32}, progress=False)
    with pytest.raises(ValueError, match="only GQ models and codecs export to the service; .* the fsq baseline"):
        export_run(tmp_path / "fsq", tmp_path / "out")
    assert not (tmp_path / "out").exists()
