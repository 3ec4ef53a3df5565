"""The discretized-VAE codec's training side (training/codec.py): its likelihood, its rate levels, fine-tuning from
a Gaussian VAE, resume."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from gqtok.training.codec import LIKELIHOOD_FLOOR, discretized_gaussian_bits
from gqtok.training.train import load_run, load_weights, train


@pytest.mark.parametrize("mean, scale", [(0.0, 0.11), (0.3, 1.0), (-2.7, 5.0), (0.5, 40.0)])
def test_discretized_gaussian_is_a_distribution_over_the_integers(mean, scale):
    k = torch.arange(-400, 401, dtype=torch.float64)
    p = 2.0 ** -discretized_gaussian_bits(k, torch.tensor(mean, dtype=torch.float64),
                                          torch.tensor(scale, dtype=torch.float64))
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6 + 801 * LIKELIHOOD_FLOOR)
    assert k[p.argmax()].item() == round(mean) or abs(mean - round(mean)) == 0.5
    # symmetric about the mean: the lower-tail form loses nothing on the upper side
    assert discretized_gaussian_bits(torch.tensor(mean + 3.0), torch.tensor(mean), torch.tensor(scale)).item() == \
        pytest.approx(discretized_gaussian_bits(torch.tensor(mean - 3.0), torch.tensor(mean), torch.tensor(scale)).item())


def test_far_tail_is_floored_not_infinite():
    bits = discretized_gaussian_bits(torch.tensor(1e4), torch.tensor(0.0), torch.tensor(0.11))
    assert bits.item() == pytest.approx(-math.log2(LIKELIHOOD_FLOOR))


@pytest.mark.slow
def test_codec_starts_from_the_gaussian_vae_it_names(tiny_run, tiny_codec):
    source = load_weights(tiny_run)[1]
    model, config = load_run(tiny_codec)
    assert config["model"]["quantizer"] == "uniform" and config["model"]["rate_lambdas"] == [0.002, 0.02, 0.2]
    # its network is the source's shape (channels, widths) and it trained on from the source's weights
    assert {k for k in model.state_dict() if k.startswith(("encoder.", "decoder."))} == set(source)
    first = load_file(str(tiny_codec / "model.safetensors"))
    moved = [k for k in source if not torch.equal(first[f"model.{k}"], source[k])]
    assert moved, "the codec did not train"
    gains = model.log_gain.exp()
    assert (gains[1:] > gains[:-1]).float().mean() > 0.8  # a higher lambda keeps more of the latent


@pytest.mark.slow
def test_rate_rises_with_lambda_when_coding(tiny_codec, small_photos):
    from gqtok.training import data as photo_data

    model, _ = load_run(tiny_codec)
    x = photo_data.to_model_input(photo_data.RandomCrops(
        sorted(small_photos.iterdir())[:4], 64, seed=3).batch(4))
    bits, errors = [], []
    with torch.no_grad():
        for level in range(3):
            recon, bits_y, bits_z = model(x, torch.full((4,), level), noise=False)
            bits.append((bits_y + bits_z).mean().item())
            errors.append(torch.mean((recon.clamp(-1, 1) - x) ** 2).item())
    assert bits[0] < bits[1] < bits[2]
    assert errors[0] > errors[2]


@pytest.mark.slow
def test_codec_resume_continues_exactly(tiny_run, small_photos, tmp_path):
    kw = dict(data=small_photos, preset="tiny", progress=False)
    settings = {"quantizer": "uniform", "rate_lambdas": (0.01, 0.1), "init_from": str(tiny_run), "image_every": 0}
    train(tmp_path / "straight", overrides={**settings, "steps": 12}, **kw)
    train(tmp_path / "split", overrides={**settings, "steps": 6}, **kw)
    train(tmp_path / "split", overrides={"steps": 12}, resume=True, **kw)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert a.keys() == b.keys() and "model.log_gain" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_codec_refuses_a_source_that_is_not_its_network(tiny_run, small_photos, tmp_path):
    with pytest.raises(ValueError, match="model settings cannot change"):
        train(tmp_path / "c", small_photos, "tiny", {"quantizer": "uniform", "init_from": str(tiny_run),
                                                     "latent_channels": 16}, progress=False)


@pytest.mark.slow
def test_the_portable_coder_codes_what_the_model_estimates(tiny_codec, small_photos):
    """A trained codec's latents through gqtok.core.latents: the words decode to the encoder's y_hat exactly,
    cost about the bits the model estimates, and decode to the picture the float model makes."""
    import numpy as np

    from gqtok.training import data as photo_data
    from gqtok.training.codec import discretized_gaussian_bits, portable_coder

    model, _ = load_run(tiny_codec)
    coder = portable_coder(model)
    x = photo_data.to_model_input(photo_data.RandomCrops(sorted(small_photos.iterdir())[:1], 64, seed=5).batch(1))
    for level in range(3):
        with torch.no_grad():
            gain = model.log_gain[level].exp()[None, :, None, None]
            y = model.encoder(x)[0] * gain
            z = torch.round(model.hyper.analysis(y))
            _, _, estimated_z = model(x, torch.tensor([level]), noise=False)
        z_int = z[0].numpy().astype(np.int64)
        k, y_hat = coder.symbols(y[0].double().numpy(), z_int)
        words = coder.encode(z_int, k)
        z_back, _, y_back = coder.decode(words, z_int.shape, k.shape)
        assert np.array_equal(z_back, z_int) and np.array_equal(y_back, y_hat)
        # the bits the coder's integer means and tabled scales cost, against the float model's estimate
        _, index = coder.entropy_parameters(z_int, k.shape[1:])
        ideal_y = discretized_gaussian_bits(torch.tensor(k, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                                            torch.tensor(coder.y_tables.levels[index])).sum().item()
        coded = 32 * len(words)
        assert coded < 1.15 * (ideal_y + estimated_z.item()) + 64, (level, coded, ideal_y, estimated_z.item())
        with torch.no_grad():
            recon = model.decoder(torch.tensor(y_back, dtype=torch.float32)[None] / gain)
            float_recon = model(x, torch.tensor([level]), noise=False)[0]
        assert torch.mean((recon - float_recon) ** 2).item() < 1e-3  # integer means: the same picture, nearly


def test_a_codec_freezes_its_norms_and_keeps_its_gains(tiny_codec, small_photos, tmp_path):
    """--norm fixed on a codec started from a codec: the norms' statistics are measured through the codec (every
    rate level), its trained gains and hyperprior are kept, not calibrated afresh."""
    run = tmp_path / "fixed-codec"
    train(run, small_photos, "tiny", {"steps": 1, "image_every": 0, "init_from": str(tiny_codec), "norm": "fixed",
                                      "lr": 1e-12}, progress=False)
    before, after = (load_file(str(r / "model.safetensors")) for r in (tiny_codec, run))
    assert json.loads((run / "config.json").read_text())["model"]["norm"] == "fixed"
    assert torch.allclose(after["model.log_gain"], before["model.log_gain"], atol=1e-6)  # one step at lr 1e-12
    stats = [k for k in after if k.startswith("model.") and k.endswith("stat_var")]
    assert stats and not any(torch.equal(after[k], torch.ones_like(after[k])) for k in stats)


def test_gains_resampled_to_new_levels_keep_the_trained_ones_and_extend_the_ends():
    from gqtok.training.codec import resampled_gains

    log_gain = torch.tensor([[0.0, 1.0], [1.0, 3.0], [2.0, 4.0]])  # levels at lambda 0.01, 0.1, 1 (a decade apart)
    out = resampled_gains(log_gain, [0.01, 0.1, 1.0], [0.01, math.sqrt(0.1), 1.0, 10.0, 0.001])
    assert torch.allclose(out[0], log_gain[0]) and torch.allclose(out[2], log_gain[2])
    assert torch.allclose(out[1], torch.tensor([1.5, 3.5]), atol=1e-6)  # halfway in log(lambda)
    assert torch.allclose(out[3], torch.tensor([3.0, 5.0]), atol=1e-6)  # the last decade's slope, continued
    assert torch.allclose(out[4], torch.tensor([-1.0, -1.0]), atol=1e-6)  # and the first's, below


def test_a_codec_grows_rate_levels_from_a_codec(tiny_codec, small_photos, tmp_path):
    """--rate-lambdas on a codec started from a codec: its trained levels keep their gains, new ones are extended
    from them (not calibrated afresh)."""
    run = tmp_path / "more-levels"
    train(run, small_photos, "tiny", {"steps": 1, "image_every": 0, "init_from": str(tiny_codec), "lr": 1e-12,
                                      "quantizer": "uniform", "rate_lambdas": (0.002, 0.02, 0.2, 2.0)}, progress=False)
    before, after = (load_file(str(r / "model.safetensors"))["model.log_gain"] for r in (tiny_codec, run))
    assert json.loads((run / "config.json").read_text())["model"]["rate_lambdas"] == [0.002, 0.02, 0.2, 2.0]
    assert after.shape == (4, before.shape[1]) and torch.allclose(after[:3], before, atol=1e-6)
    assert torch.allclose(after[3], 2 * before[2] - before[1], atol=1e-5)


def test_a_codec_widens_its_latents_and_starts_from_the_same_pictures(tiny_codec, small_photos, tmp_path):
    """--latent-channels on a codec started from a codec: the trained channels keep their weights, the new ones
    start disconnected from the decoder and the hyperprior, so every rate level decodes the source's pictures at
    step 0; narrowing is refused."""
    from gqtok.training import data as photo_data
    from gqtok.training.train import load_run

    source_channels = json.loads((tiny_codec / "config.json").read_text())["model"]["latent_channels"]
    run = tmp_path / "wider"
    train(run, small_photos, "tiny", {"steps": 1, "image_every": 0, "init_from": str(tiny_codec), "lr": 1e-12,
                                      "quantizer": "uniform", "rate_lambdas": (0.002, 0.02, 0.2),
                                      "latent_channels": 2 * source_channels}, progress=False)
    (before, _), (after, _) = load_run(tiny_codec), load_run(run)
    assert after.cfg.latent_channels == 2 * source_channels
    x = photo_data.to_model_input(photo_data.RandomCrops(photo_data.training_photos(small_photos)[0], 32,
                                                         seed=3).batch(2))
    with torch.no_grad():
        for level in range(3):
            levels = torch.full((2,), level)
            a, bits_a, _ = before(x, levels, noise=False)
            b, bits_b, _ = after(x, levels, noise=False)
            assert torch.allclose(a, b, atol=1e-5), level
            assert (bits_b >= bits_a - 1e-3).all()  # the new channels cost bits, they carry no picture yet
    with pytest.raises(ValueError, match="widen"):
        train(tmp_path / "narrower", small_photos, "tiny", {"steps": 1, "init_from": str(tiny_codec),
                                                            "quantizer": "uniform", "latent_channels": 4},
              progress=False)
