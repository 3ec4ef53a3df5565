"""The discretized-VAE image codec: a rate you choose (the seed "Discretizing VAEs for lossy image compression").

The Gaussian VAE's encoder and decoder, with three changes that make it a codec:
- recognition is uniform around the encoder's output: y = gain * mu, training decodes y + U(-1/2, 1/2), coding
  rounds (y - mean) to integers;
- the prior of each integer is a discretized Gaussian, P(k) = F(k + 1/2) - F(k - 1/2) with F the normal CDF of a
  mean and scale that a hyperprior predicts from side information z (z = h_a(y), coded first, under a
  factorized discretized Gaussian per channel);
- the emission is exp(-lambda * MSE), so the loss is bits + lambda * 255^2 * MSE, lambda the rate knob.

One model serves several rates: each lambda (a "level") has its own per-channel gain on the latents (the
decoder sees y / gain), and every training image draws its level at random, so the networks are shared and only
16 numbers per level differ. The hyperprior's synthesis is built from ReLU convolutions and nearest upsampling so
that it can run in integer arithmetic at coding time (the means and scales must be the same on every machine).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Scales of the latents' discretized Gaussians: coding snaps them to a log-spaced table over this range.
SCALE_MIN, SCALE_MAX = 0.11, 64.0
LIKELIHOOD_FLOOR = 1e-9  # no symbol is coded with less probability than this (about 30 bits)


def discretized_gaussian_bits(values: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """-log2 of the mass that N(mean, scale^2) puts on [values - 1/2, values + 1/2], elementwise.

    Written on the lower tail (|values - mean| mirrored below the mean), where the CDF difference keeps its
    precision."""
    v = -(values - mean).abs()
    mass = torch.special.ndtr((v + 0.5) / scale) - torch.special.ndtr((v - 0.5) / scale)
    return -torch.log2(mass.clamp_min(LIKELIHOOD_FLOOR))


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


class HyperPrior(nn.Module):
    """Side information z = h_a(y) at a quarter of y's resolution, and h_s(z) -> (mean, scale) for every element
    of y. h_s is ReLU convolutions and nearest upsampling only (integer arithmetic reproduces it exactly)."""

    def __init__(self, channels: int, hyper_channels: int, width: int = 64):
        super().__init__()
        self.analysis = nn.Sequential(
            _conv(channels, width), nn.ReLU(),
            _conv(width, width, 5, 2), nn.ReLU(),
            _conv(width, hyper_channels, 5, 2))
        self.synthesis = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest"), _conv(hyper_channels, width), nn.ReLU(),
            nn.Upsample(scale_factor=2.0, mode="nearest"), _conv(width, width), nn.ReLU(),
            _conv(width, 2 * channels))
        # z's factorized prior: a zero-mean discretized Gaussian per channel, its log-scale learned
        self.z_log_scale = nn.Parameter(torch.full((hyper_channels,), math.log(2.0)))

    def forward(self, y: torch.Tensor, noise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_hat, mean, scale): z with uniform noise (training) or rounded (coding); mean and scale of y."""
        z = self.analysis(y)
        z_hat = z + torch.empty_like(z).uniform_(-0.5, 0.5) if noise else torch.round(z)
        mean, log_scale = self.synthesis(z_hat)[..., : y.shape[-2], : y.shape[-1]].chunk(2, dim=1)
        scale = log_scale.clamp(math.log(SCALE_MIN), math.log(SCALE_MAX)).exp()
        return z_hat, mean, scale

    def z_bits(self, z_hat: torch.Tensor) -> torch.Tensor:
        scale = self.z_log_scale.clamp(math.log(SCALE_MIN), math.log(SCALE_MAX)).exp()[:, None, None]
        return discretized_gaussian_bits(z_hat, torch.zeros_like(scale), scale)


class DiscretizedVAE(nn.Module):
    """Encoder and decoder of the Gaussian VAE (same names, so its weights load), a hyperprior, and one
    per-channel log-gain per rate level."""

    def __init__(self, cfg):
        super().__init__()
        from gqtok.training.model import Decoder, EffNetEncoder, Encoder

        self.cfg = cfg
        self.encoder = EffNetEncoder(cfg) if cfg.encoder == "effnet-lite0" else Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.hyper = HyperPrior(cfg.latent_channels, cfg.hyper_channels)
        self.log_gain = nn.Parameter(torch.zeros(len(cfg.rate_lambdas), cfg.latent_channels))

    @torch.no_grad()
    def calibrate_gains(self, x: torch.Tensor, spread: float = 8.0) -> None:
        """Start every level's gain at 1 / (the posterior's median sigma per channel), times a factor spread
        geometrically over [1/sqrt(spread), sqrt(spread)] from the lowest lambda to the highest: rounding then
        adds about the noise the Gaussian VAE's decoder was trained with."""
        _, logvar = self.encoder(x)
        sigma = (0.5 * logvar).exp().transpose(0, 1).flatten(1).median(dim=1).values
        levels = len(self.cfg.rate_lambdas)
        order = torch.tensor(self.cfg.rate_lambdas).argsort().argsort().float()
        factor = spread ** ((order / max(1, levels - 1)) - 0.5) if levels > 1 else torch.ones(1)
        self.log_gain.copy_(factor.log()[:, None] - sigma.log()[None, :])

    def forward(self, x: torch.Tensor, level: torch.Tensor, noise: bool = True):
        """(reconstruction, bits of y per image, bits of z per image) at the rate level of each image."""
        mu, _ = self.encoder(x)
        gain = self.log_gain[level].exp()[:, :, None, None]
        y = mu * gain
        z_hat, mean, scale = self.hyper(y, noise)
        y_hat = y + torch.empty_like(y).uniform_(-0.5, 0.5) if noise else torch.round(y - mean) + mean
        recon = self.decoder(y_hat / gain)
        bits_y = discretized_gaussian_bits(y_hat, mean, scale).flatten(1).sum(1)
        bits_z = self.hyper.z_bits(z_hat).flatten(1).sum(1)
        return recon, bits_y, bits_z

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def resampled_gains(log_gain: torch.Tensor, source_lambdas, lambdas) -> torch.Tensor:
    """A codec's per-level log-gains [levels, C] moved to other lambdas (a codec started from a codec with more or
    other rate levels): per channel, piecewise linear in log(lambda) between the trained levels and extended
    along the last segment at either end (gain grows with lambda about as a power law)."""
    x = torch.tensor(source_lambdas, dtype=torch.float64).log()
    if len(x) == 1:  # one trained level: every level starts from its gains
        return log_gain[:1].repeat(len(lambdas), 1)
    order = x.argsort()
    x, g = x[order], log_gain.detach().double()[order]
    rows = []
    for t in torch.tensor(lambdas, dtype=torch.float64).log():
        i = int(torch.searchsorted(x, t).clamp(1, len(x) - 1))
        w = (t - x[i - 1]) / (x[i] - x[i - 1])
        rows.append(g[i - 1] + w * (g[i] - g[i - 1]))
    return torch.stack(rows).to(log_gain.dtype)


def widened_state(state: dict, channels_from: int, fresh: dict) -> dict:
    """A codec's weights for more latent channels (a codec started from one with fewer: the higher rates need
    more than the 16 a Gaussian VAE's token carries). The trained channels keep their weights; a new channel
    starts as the fresh network makes it on the encoder's side (so it carries something from the first step),
    disconnected from the decoder and the hyperprior's analysis (zero input weights: the reconstruction is the
    source's at step 0), with a predicted mean of 0 and the gain that is the mean of the trained channels'.
    `fresh`: the state dict of the wider network as built."""
    out = dict(state)
    for name, trained in state.items():
        target = fresh[name]
        if target.shape == trained.shape:
            continue
        if name == "log_gain":  # [levels, C]
            extra = trained.mean(dim=1, keepdim=True).expand(-1, target.shape[1] - channels_from)
            out[name] = torch.cat([trained, extra], dim=1)
            continue
        w = target.detach().clone()
        if trained.shape[0] != target.shape[0]:  # output rows: two halves of 2C (mu | logvar, mean | log-scale)
            half = target.shape[0] // 2
            w[:channels_from], w[half:half + channels_from] = trained[:channels_from], trained[channels_from:]
            if name.startswith("hyper.synthesis"):
                w[channels_from:half] = 0  # the new channels' predicted means
        else:  # input channels
            w.zero_()
            w[:, :channels_from] = trained
        out[name] = w
    return out


def rate_distortion_loss(x: torch.Tensor, recon: torch.Tensor, bits: torch.Tensor, lam: torch.Tensor):
    """(loss, bpp per image, MSE per image on the [0, 1] scale): mean of bpp + lambda * 255^2 * MSE."""
    pixels = x.shape[-2] * x.shape[-1]
    mse = F.mse_loss(recon.float(), x, reduction="none").flatten(1).mean(1) / 4.0  # [-1, 1] -> [0, 1]
    bpp = bits / pixels
    return (bpp + lam * 255.0**2 * mse).mean(), bpp, mse


NUM_SCALE_LEVELS = 64  # the coder's table of scales, log-spaced over [SCALE_MIN, SCALE_MAX]


def portable_coder(model: DiscretizedVAE):
    """The coder that decodes this model's streams the same on every machine (gqtok.core.latents): its
    hyperprior's synthesis in integers, a table per scale level for y, a table per channel for z."""
    from gqtok.core.latents import FrequencyTables, IntegerSynthesis, LatentCoder, scale_levels

    layers = []
    for module in model.hyper.synthesis:
        if isinstance(module, nn.Upsample):
            layers.append(("up",))
        elif isinstance(module, nn.ReLU):
            layers.append(("relu",))
        elif isinstance(module, nn.Conv2d):
            layers.append(("conv", module.weight.detach().double().numpy(), module.bias.detach().double().numpy()))
        else:
            raise TypeError(f"the synthesis holds a {type(module).__name__}, which has no integer form")
    z_scales = model.hyper.z_log_scale.detach().clamp(math.log(SCALE_MIN), math.log(SCALE_MAX)).exp()
    return LatentCoder(IntegerSynthesis.from_float(layers),
                       FrequencyTables.build(scale_levels(NUM_SCALE_LEVELS, SCALE_MIN, SCALE_MAX)),
                       FrequencyTables.build(z_scales.double().numpy()))
