import math

import pytest
import torch

from gqtok.training.model import PRESETS, GaussianVAE, VAEConfig, kl_bits_per_token


@pytest.mark.parametrize("f,mult,attention,hw", [(8, (1, 1, 2, 2), False, (40, 56)), (8, (1, 2, 2, 2), True, (64, 24)),
                                                  (16, (1, 1, 2, 2, 2), True, (48, 80))])
def test_shapes_for_any_multiple_of_f(f, mult, attention, hw):
    cfg = VAEConfig(downsample=f, latent_channels=8, token_dim=4, codebook_bits=8, base_channels=8,
                    channel_mult=mult, attention=attention, groups=4)
    model = GaussianVAE(cfg).eval()
    x = torch.rand(2, 3, *hw) * 2 - 1
    recon, mu, logvar, quantized = model(x, sample=False)
    assert quantized is None
    assert mu.shape == logvar.shape == (2, 8, hw[0] // f, hw[1] // f)
    assert recon.shape == x.shape
    assert logvar.min() >= -30 and logvar.max() <= 20


@pytest.mark.parametrize("kwargs,match", [
    (dict(downsample=4), "downsample"),
    (dict(latent_channels=16, token_dim=5), "multiple"),
    (dict(channel_mult=(1, 2)), "channel_mult"),
    (dict(codebook_bits=0), "codebook_bits"),
    (dict(base_channels=20, groups=16), "groups"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig(**kwargs)


def test_presets_build():
    for name, preset in PRESETS.items():
        cfg = VAEConfig(**preset["model"])
        assert cfg.num_codes == 2**cfg.codebook_bits
    default = VAEConfig(**PRESETS["default"]["model"])
    # the paper's headline setting: one 16-bit token per 8x8 patch, 0.25 bpp
    assert (default.downsample, default.latent_channels, default.token_dim, default.codebook_bits) == (8, 16, 16, 16)
    assert default.tokens_per_position * default.codebook_bits / default.downsample**2 == 0.25


def test_kl_bits_per_token():
    mu = torch.zeros(1, 8, 2, 2)
    logvar = torch.zeros(1, 8, 2, 2)
    assert torch.all(kl_bits_per_token(mu, logvar, 4) == 0)
    mu[:, 0] = 1.0  # channel 0 belongs to token 0 (strided grouping)
    kl = kl_bits_per_token(mu, logvar, 4)
    assert kl.shape == (1, 2, 2, 2)
    assert kl[0, 0].flatten().tolist() == pytest.approx([0.5 / math.log(2)] * 4)
    assert torch.all(kl[0, 1] == 0)
