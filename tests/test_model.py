import math

import pytest
import torch

from gqtok.training.model import PRESETS, GaussianVAE, VAEConfig, build_model, kl_bits_per_token


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


@pytest.mark.parametrize("network", [dict(patch=2, channel_mult=(1, 2, 2)), dict(patch=4, channel_mult=(1, 2)),
                                     dict(encoder="effnet-lite0", channel_mult=(1, 1, 2, 2)),
                                     dict(encoder="effnet-lite0", downsample=16, patch=2, channel_mult=(1, 1, 2, 2))])
def test_unshuffle_stem_and_effnet_encoder_keep_the_grid(network):
    cfg = VAEConfig(latent_channels=8, token_dim=4, codebook_bits=8, base_channels=8, groups=4, **network)
    model = GaussianVAE(cfg).eval()
    x = torch.rand(1, 3, 48, 80) * 2 - 1
    recon, mu, _, _ = model(x, sample=False)
    f = cfg.downsample
    assert mu.shape == (1, 8, 48 // f, 80 // f) and recon.shape == x.shape


@pytest.mark.parametrize("kwargs,match", [
    (dict(downsample=4), "downsample"),
    (dict(latent_channels=16, token_dim=5), "multiple"),
    (dict(channel_mult=(1, 2)), "channel_mult"),
    (dict(codebook_bits=0), "codebook_bits"),
    (dict(base_channels=20, groups=16), "groups"),
    (dict(patch=2), "log2\\(f/p\\) \\+ 1 = 3"),
    (dict(patch=3, channel_mult=(1, 2)), "patch"),
    (dict(encoder="vit"), "encoder"),
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


def test_a_coarser_grid_grows_from_a_finer_model():
    """grown_state: the f=8 decoder becomes the f=16 decoder's finer levels (one level down), the new coarsest
    level and what changed shape start fresh, and the grown model loads strictly."""
    from gqtok.training.model import grown_state

    torch.manual_seed(0)
    small = VAEConfig(**PRESETS["tiny"]["model"])  # f=8, patch 1: 4 levels
    big = VAEConfig(**{**PRESETS["tiny"]["model"], "downsample": 16, "channel_mult": (1, 1, 2, 2, 2)})
    source, target = GaussianVAE(small), GaussianVAE(big)
    state, fresh = grown_state(source.state_dict(), small, big, target.state_dict())
    target.load_state_dict(state, strict=True)
    src, out = source.state_dict(), target.state_dict()
    per_level = big.blocks_per_level + 2
    for key, value in src.items():
        if key.startswith("decoder.up."):
            index, rest = key[len("decoder.up."):].split(".", 1)
            assert torch.equal(out[f"decoder.up.{int(index) + per_level}.{rest}"], value), key
    assert torch.equal(out["decoder.conv_in.weight"], src["decoder.conv_in.weight"])
    assert torch.equal(out["decoder.conv_out.weight"], src["decoder.conv_out.weight"])
    assert any(k.startswith("decoder.up.0.") for k in fresh) and not any(k.startswith("decoder.conv_out") for k in fresh)
    x = torch.rand(1, 3, 64, 64)
    assert target.encoder(x)[0].shape[-2:] == (4, 4)  # a 16x16 patch per position


def _centre_of_decoding(model, image: torch.Tensor, border: int) -> torch.Tensor:
    with torch.no_grad():
        y = model(image, sample=False)[0]
    return y[..., border:-border, border:-border]


def test_fixed_norms_make_the_output_independent_of_the_image_size():
    """GroupNorm's per-image statistics change a pixel's reconstruction with what else is in the image (the
    default model's blue cast grew with size); fixed norms, calibrated on crops, do not: the same 64x64 middle of
    a picture decodes to the same pixels in a 320x320 crop and inside the 512x512 picture (up to float rounding)."""
    from gqtok.training.model import calibrate_fixed_norms

    torch.manual_seed(0)
    group = build_model(VAEConfig(**PRESETS["tiny"]["model"])).eval()
    fixed = build_model(VAEConfig(**{**PRESETS["tiny"]["model"], "norm": "fixed"})).eval()
    fixed.load_state_dict(group.state_dict(), strict=False)
    crops = [torch.rand(4, 3, 64, 64) * 2 - 1 for _ in range(3)]
    assert calibrate_fixed_norms(fixed, crops) == sum(isinstance(m, torch.nn.GroupNorm) for m in group.modules())
    # the first layer's statistics are its input's per-crop group means and variances, averaged over the crops
    first = fixed.encoder.down[0].norm1
    with torch.no_grad():
        h = fixed.encoder.conv_in(fixed.encoder.stem(torch.cat(crops))).reshape(12, first.num_groups, -1)
    assert torch.allclose(first.stat_mean, h.mean(-1).mean(0), atol=1e-5)
    assert torch.allclose(first.stat_var, h.var(-1, unbiased=False).mean(0), atol=1e-5)

    # the tiny model sees about 128 pixels around a pixel (its receptive field), so 128 pixels of margin
    big = torch.rand(1, 3, 512, 512) * 2 - 1
    big[..., :96, :] = -0.8  # the rest of the picture is darker than its middle
    middle = big[..., 96:416, 96:416]
    for model, same in ((fixed, True), (group, False)):
        alone = _centre_of_decoding(model, middle, 128)
        inside = _centre_of_decoding(model, big, 224)
        assert torch.allclose(alone, inside, atol=1e-4) is same


def test_grey_below_chroma_greys_faint_colour_only():
    """The chroma dead zone: a pixel tinted by less than the threshold (in 8-bit Cb, Cr units) comes out exactly
    grey at its luma, a coloured one is untouched, and a grey one stays as it was."""
    from gqtok.training.model import grey_below_chroma

    def px(r, g, b):  # 8-bit RGB -> [1, 3, 1, 1] in [-1, 1]
        return torch.tensor([r, g, b], dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1

    faint, coloured, grey = px(120, 121, 119), px(120, 130, 100), px(77, 77, 77)
    out = grey_below_chroma(torch.cat([faint, coloured, grey], dim=3), 1.5)
    f = out[0, :, 0, 0]
    assert f[0] == f[1] == f[2]  # exactly grey
    assert (f[0] + 1) * 127.5 == pytest.approx(0.299 * 120 + 0.587 * 121 + 0.114 * 119, abs=1e-4)
    assert torch.equal(out[..., 1:2], coloured) and torch.equal(out[..., 2:3], grey)
    assert torch.equal(grey_below_chroma(faint, 0.5), faint)  # its chroma (about 1.1) is above 0.5


def test_chroma_deadzone_applies_in_evaluation_not_in_training():
    cfg = VAEConfig(**{**PRESETS["tiny"]["model"], "chroma_deadzone": 255.0})
    model = build_model(cfg)
    z = torch.randn(1, cfg.latent_channels, 2, 3, generator=torch.Generator().manual_seed(0))
    model.train()
    assert not torch.equal(model.decoder(z)[:, 0], model.decoder(z)[:, 1])
    model.eval()
    y = model.decoder(z)
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])  # everything is "faint" at 255
    with pytest.raises(ValueError, match="chroma_deadzone"):
        VAEConfig(chroma_deadzone=-1)
