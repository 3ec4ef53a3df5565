"""Convolutional Gaussian VAE: the continuous model that GQ turns into a tokenizer.

Encoder: image in [-1, 1] -> (mu, logvar), each [B, C, H/f, W/f].
Decoder: latent [B, C, H/f, W/f] -> image in [-1, 1] (not clamped; clamp for display).
Built from ResNet blocks with GroupNorm, stride-2 convs down, nearest-neighbour
upsampling + conv up, optional self-attention at the lowest resolution. Every
op exports to ONNX with dynamic batch, height and width.

GroupNorm normalizes by statistics of the whole image, so a network trained on 128x128 crops answers a larger
image differently: measured on the default model, a blue cast that grows with size (mean signed error of the
blue channel +2.4 at 256x256 and +4.0 at 512x512, none when the same pixels go in as 128x128 tiles) and more KL
per token at full size. norm="fixed" normalizes by statistics measured once on training crops
(`calibrate_fixed_norms`) and kept as buffers: the network is then convolutional through and through, and a
token depends on the pixels around it, not on the image's size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gqtok.core import layout
from gqtok.core.layout import tokens_per_position
from gqtok.core.select import LOGVAR_RANGE


QUANTIZER_CHOICES = ("gq", "vq", "fsq", "lfq", "bsq", "uniform")


@dataclass
class VAEConfig:
    downsample: int = 8  # f: latent grid is H/f x W/f; 8 or 16
    latent_channels: int = 16  # C: channels of mu (and of logvar)
    token_dim: int = 16  # d: channels per token; C/d tokens per position
    codebook_bits: int = 16  # b: K = 2^b codewords, target KL log2 K bits per token
    codebook_seed: int = 0  # seed of the GQ codebook (gqtok.core.codebook)
    gq_beta: float = 1.0  # prior weight in the GQ selection score
    # "resnet": the ResNet levels below; "effnet-lite0": EfficientNet-Lite0's stem and blocks down to stride f
    # (ImageNet weights at the start of a new run), then the mid block at the last level's width; it has its own
    # stem, so `patch` then shapes the decoder's head alone
    encoder: str = "resnet"
    # pixel-unshuffle stem and pixel-shuffle head by this factor p: the first level runs at H/p, not at full
    # resolution, where a conv stem spends most of the FLOPs and activation memory. 1 = full-resolution conv stem
    patch: int = 1
    base_channels: int = 64  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)  # width multiplier per level, H/p down to H/f; len = log2(f/p) + 1
    blocks_per_level: int = 1  # ResNet blocks per level
    attention: bool = False  # self-attention at the lowest resolution
    groups: int = 16  # GroupNorm groups (must divide every level's width)
    # "group": GroupNorm with each image's own statistics; "fixed": the same groups with statistics measured on
    # training crops and frozen (FixedGroupNorm), so that the output does not depend on the image's size
    norm: str = "group"
    # "gq": a Gaussian VAE, turned into a tokenizer by GQ after training (the method);
    # "vq", "fsq", "lfq", "bsq": baselines that train with their quantizer in the loop (training/quantizers/;
    # each of the C/d tokens per position is quantized on its own, with one shared codebook);
    # "uniform": the discretized-VAE codec (training/codec.py), a hyperprior and one gain per rate_lambdas entry
    quantizer: str = "gq"
    # Decoder output, in evaluation and export (not in training): a pixel whose chroma, the length of its BT.601
    # (Cb, Cr) in 8-bit units, is below this comes out grey (its luma in all three channels). GQ's token noise
    # leaves grey pictures with a faint tint of about this size; 0 = off. A setting of the output, no weights:
    # it may change on --init-from
    chroma_deadzone: float = 0.0
    # vq only: the practitioners' remedies (training/quantizers/vq.py): an EMA (online k-means) codebook,
    # dead-code restarts and an l2-normalized lookup; pair with a low latent_channels (8, as in LlamaGen)
    vq_remedies: bool = False
    rate_lambdas: tuple[float, ...] = (0.0067,)  # uniform: the lambdas of its rate levels (bpp + lambda*255^2*MSE)
    hyper_channels: int = 32  # uniform: channels of the side information z

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.rate_lambdas = tuple(float(v) for v in self.rate_lambdas)
        if not self.rate_lambdas or min(self.rate_lambdas) <= 0:
            raise ValueError(f"rate_lambdas must be positive, got {self.rate_lambdas}")
        if self.downsample not in (8, 16):
            raise ValueError(f"downsample must be 8 or 16, got {self.downsample}")
        if self.encoder not in ("resnet", "effnet-lite0"):
            raise ValueError(f"encoder must be 'resnet' or 'effnet-lite0', got {self.encoder!r}")
        if self.patch not in (1, 2, 4):
            raise ValueError(f"patch must be 1, 2 or 4, got {self.patch}")
        levels = int(math.log2(self.downsample // self.patch)) + 1
        if len(self.channel_mult) != levels:
            raise ValueError(f"channel_mult needs log2(f/p) + 1 = {levels} entries (f={self.downsample}, "
                             f"p={self.patch}), got {self.channel_mult}")
        tokens_per_position(self.latent_channels, self.token_dim)  # raises if C % d
        if not 1 <= self.codebook_bits <= 24:
            raise ValueError(f"codebook_bits must be in [1, 24], got {self.codebook_bits}")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.groups:
                raise ValueError(f"groups={self.groups} must divide every width {self.base_channels}*{m}")
        if self.norm not in ("group", "fixed"):
            raise ValueError(f"norm must be 'group' or 'fixed', got {self.norm!r}")
        if self.quantizer not in QUANTIZER_CHOICES:
            raise ValueError(f"quantizer must be one of {QUANTIZER_CHOICES}, got {self.quantizer!r}")
        if self.chroma_deadzone < 0:
            raise ValueError(f"chroma_deadzone must be >= 0, got {self.chroma_deadzone}")
        if self.vq_remedies and self.quantizer != "vq":
            raise ValueError(f"vq_remedies applies to the vq quantizer, not {self.quantizer!r}")

    @property
    def num_codes(self) -> int:
        return 2**self.codebook_bits

    @property
    def tokens_per_position(self) -> int:
        return self.latent_channels // self.token_dim

    def to_dict(self) -> dict:
        return asdict(self)


class FixedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are buffers (per group: the mean over training crops of each crop's group mean
    and variance), not the input's: a per-channel affine map, the same at every image size. Until
    calibrate_fixed_norms fills the buffers (or a checkpoint loads them) it behaves as GroupNorm."""

    def __init__(self, num_groups: int, num_channels: int):
        super().__init__(num_groups, num_channels)
        self.register_buffer("stat_mean", torch.zeros(num_groups))
        self.register_buffer("stat_var", torch.ones(num_groups))
        self.calibrating = False

    def forward(self, x):
        if self.calibrating:
            grouped = x.detach().reshape(x.shape[0], self.num_groups, -1)
            self.seen.append(torch.stack([grouped.mean(-1), grouped.var(-1, unbiased=False)]))
            return super().forward(x)
        per_group = self.num_channels // self.num_groups
        scale = self.weight * torch.rsqrt(self.stat_var + self.eps).repeat_interleave(per_group)
        shift = self.bias - self.stat_mean.repeat_interleave(per_group) * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def norm_layer(cfg: VAEConfig, channels: int) -> nn.Module:
    return FixedGroupNorm(cfg.groups, channels) if cfg.norm == "fixed" else nn.GroupNorm(cfg.groups, channels)


@torch.no_grad()
def calibrate_fixed_norms(model: nn.Module, batches, forward=None) -> int:
    """Fill every FixedGroupNorm's statistics from the model's forward passes over `batches` (model inputs in
    [-1, 1]), each layer measured as GroupNorm would see it: the frozen network starts where the per-image one
    was, on average over the batches. forward(x): how to run the model (default: a Gaussian VAE decoding its
    posterior means). Returns how many layers were calibrated."""
    layers = [m for m in model.modules() if isinstance(m, FixedGroupNorm)]
    for layer in layers:
        layer.calibrating, layer.seen = True, []
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            forward(x) if forward else model(x, sample=False)
    finally:
        model.train(was_training)
        for layer in layers:
            seen = torch.cat(layer.seen, dim=1)  # [2, crops, groups]
            layer.stat_mean.copy_(seen[0].mean(0))
            layer.stat_var.copy_(seen[1].mean(0))
            layer.calibrating, layer.seen = False, []
    return len(layers)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: VAEConfig):
        super().__init__()
        self.norm1, self.conv1 = norm_layer(cfg, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm_layer(cfg, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over all positions of the lowest-resolution grid."""

    def __init__(self, ch: int, cfg: VAEConfig):
        super().__init__()
        self.norm, self.qkv, self.proj = norm_layer(cfg, ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        # [b, 1 head, hw, c]: the ONNX exporter takes only 4-D attention inputs
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


def _mid(ch: int, cfg: VAEConfig) -> nn.Sequential:
    layers = [ResBlock(ch, ch, cfg)]
    if cfg.attention:
        layers += [Attention(ch, cfg), ResBlock(ch, ch, cfg)]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.stem = nn.PixelUnshuffle(cfg.patch) if cfg.patch > 1 else nn.Identity()
        self.conv_in = nn.Conv2d(3 * cfg.patch**2, widths[0], 3, padding=1)
        layers, ch = [], widths[0]
        for i, w in enumerate(widths):
            for _ in range(cfg.blocks_per_level):
                layers.append(ResBlock(ch, w, cfg))
                ch = w
            if i < len(widths) - 1:
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.down = nn.Sequential(*layers)
        self.mid = _mid(ch, cfg)
        self.norm_out = norm_layer(cfg, ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.mid(self.down(self.conv_in(self.stem(x))))
        mu, logvar = self.conv_out(F.silu(self.norm_out(h))).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)


class EffNetEncoder(nn.Module):
    """EfficientNet-Lite0's first stages (training/effnet.py), a 1x1 conv to the last level's width, the mid block."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        from gqtok.training.effnet import EffNetTrunk

        ch = cfg.base_channels * cfg.channel_mult[-1]
        self.trunk = EffNetTrunk(cfg.downsample)
        self.proj = nn.Conv2d(self.trunk.out_channels, ch, 1)
        self.mid = _mid(ch, cfg)
        self.norm_out = norm_layer(cfg, ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.mid(self.proj(self.trunk(x)))
        mu, logvar = self.conv_out(F.silu(self.norm_out(h))).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult][::-1]
        ch = widths[0]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = _mid(ch, cfg)
        layers = []
        for i, w in enumerate(widths):
            for _ in range(cfg.blocks_per_level):
                layers.append(ResBlock(ch, w, cfg))
                ch = w
            if i < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        self.up = nn.Sequential(*layers)
        self.norm_out = norm_layer(cfg, ch)
        self.conv_out = nn.Conv2d(ch, 3 * cfg.patch**2, 3, padding=1)
        self.head = nn.PixelShuffle(cfg.patch) if cfg.patch > 1 else nn.Identity()
        self.chroma_deadzone = cfg.chroma_deadzone

    def forward(self, z):
        x = self.head(self.conv_out(F.silu(self.norm_out(self.up(self.mid(self.conv_in(z)))))))
        if self.chroma_deadzone and not self.training:
            x = grey_below_chroma(x, self.chroma_deadzone)
        return x


# BT.601 luma, and chroma (Cb, Cr) in 8-bit units, of RGB in [-1, 1] (JPEG's YCbCr; the rows of Cb and Cr sum
# to 0, so a grey pixel has none), as the weights of one 1x1 convolution
_YCBCR = torch.tensor([[0.299, 0.587, 0.114],
                       [-0.168736 * 127.5, -0.331264 * 127.5, 0.5 * 127.5],
                       [0.5 * 127.5, -0.418688 * 127.5, -0.081312 * 127.5]]).view(3, 3, 1, 1)


def grey_below_chroma(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1]: pixels whose (Cb, Cr) is shorter than `threshold` 8-bit units become their luma
    (exactly equal channels), the others stay as they are: a dead zone on colour, as a codec's quantizer has one.
    One convolution and one select, so that the exported decoder holds few full-size intermediates."""
    ycc = F.conv2d(x, _YCBCR.to(x))
    faint = ycc[:, 1:].square().sum(1, keepdim=True) < threshold * threshold
    return torch.where(faint, ycc[:, :1], x)


def build_baseline_quantizer(cfg: VAEConfig) -> nn.Module:
    """The in-the-loop quantizer of a baseline model, sized from the config."""
    from gqtok.training.quantizers import build_quantizer

    remedies = dict(ema_decay=0.99, dead_code_restart=True, normalize=True) if cfg.vq_remedies else {}
    kwargs = {"vq": dict(num_codes=cfg.num_codes, dim=cfg.token_dim, **remedies), "fsq": {},
              "lfq": dict(dim=cfg.token_dim), "bsq": dict(dim=cfg.token_dim)}[cfg.quantizer]
    q = build_quantizer(cfg.quantizer, **kwargs)
    if q.dim != cfg.token_dim:
        raise ValueError(f"{cfg.quantizer} quantizes {q.dim} channels per token; set token_dim to {q.dim} "
                         f"(and latent_channels to a multiple of it)")
    return q


def grown_state(state: dict, source: VAEConfig, target: VAEConfig, own: dict) -> tuple[dict, list[str]]:
    """A state dict for a model with a coarser grid (target.downsample = 2 x source's) started from a trained one:
    the decoder's levels move one level down (the new coarsest level is new), every tensor whose name and shape
    match is taken, the rest keep `own` (the new model's initial values; its encoder trunk's new stage from
    ImageNet). -> (state, names of the tensors that are new)."""
    extra = len(target.channel_mult) - len(source.channel_mult)
    per_level = target.blocks_per_level + 2  # ResBlocks, then Upsample and Conv between levels
    moved = {}
    for key, value in state.items():
        if key.startswith("decoder.up."):
            index, rest = key[len("decoder.up."):].split(".", 1)
            key = f"decoder.up.{int(index) + extra * per_level}.{rest}"
        moved[key] = value
    out = dict(own)
    fresh = []
    for key, value in own.items():
        if key in moved and moved[key].shape == value.shape:
            out[key] = moved[key]
        else:
            fresh.append(key)
    return out, fresh


class GaussianVAE(nn.Module):
    """The encoder-decoder; with cfg.quantizer != "gq" a baseline quantizer sits between them."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = EffNetEncoder(cfg) if cfg.encoder == "effnet-lite0" else Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = build_baseline_quantizer(cfg) if cfg.quantizer != "gq" else None

    def forward(self, x, sample: bool = True):
        """Returns (reconstruction, mu, logvar, quantizer output or None).

        Gaussian: decodes a posterior sample (sample=False: the posterior mean).
        Baselines: decodes the quantized mu (logvar is unused)."""
        mu, logvar = self.encoder(x)
        if self.quantizer is not None:
            q = self.quantize(mu)
            return self.decoder(q.z_q), mu, logvar, q
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return self.decoder(z), mu, logvar, None

    def quantize(self, mu: torch.Tensor):
        """A baseline's quantizer on each of the T tokens per position (the strided grouping of
        gqtok.core.layout, as GQ uses): QuantizerOutput with z_q and z_continuous [B, C, h, w], ids [B, T, h, w]."""
        b, _, h, w = mu.shape
        t, d = self.cfg.tokens_per_position, self.cfg.token_dim
        tokens = layout.group(mu, d).permute(0, 1, 4, 2, 3).reshape(b * t, d, h, w)
        q = self.quantizer(tokens)
        q.z_q, q.z_continuous = self._positions(q.z_q, b), self._positions(q.z_continuous, b)
        q.ids = q.ids.reshape(b, t, h, w)
        return q

    @torch.no_grad()
    def dequantize(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T, h, w] from `quantize` -> the latent z_q [B, C, h, w] it gave."""
        b, t, h, w = ids.shape
        return self._positions(self.quantizer.decode_ids(ids.reshape(b * t, h, w)), b)

    def _positions(self, tokens: torch.Tensor, b: int) -> torch.Tensor:
        """[B*T, d, h, w] -> [B, C, h, w], undoing quantize's grouping."""
        _, d, h, w = tokens.shape
        return layout.ungroup(tokens.reshape(b, -1, d, h, w).permute(0, 1, 3, 4, 2))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: VAEConfig) -> nn.Module:
    """The network a config describes: the discretized-VAE codec for quantizer "uniform", else the Gaussian VAE
    (with its baseline quantizer, if any)."""
    if cfg.quantizer == "uniform":
        from gqtok.training.codec import DiscretizedVAE

        return DiscretizedVAE(cfg)
    return GaussianVAE(cfg)


def kl_bits_per_token(mu: torch.Tensor, logvar: torch.Tensor, token_dim: int) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) in bits, summed over each token's d channels -> [B, T, H, W]."""
    kl = 0.5 * (mu.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float()) / math.log(2.0)
    return layout.group(kl, token_dim).sum(-1)


PRESETS: dict[str, dict] = {
    # Trains in seconds on a CPU: for tests and smoke runs. 2 tokens of 256 codes per 8x8 patch.
    "tiny": dict(
        model=dict(
            downsample=8, latent_channels=8, token_dim=4, codebook_bits=8, base_channels=16,
            channel_mult=(1, 1, 2, 2), blocks_per_level=1, attention=False, groups=8,
        ),
        train=dict(crop=64, batch_size=8, steps=60, lr=1e-3, log_every=10, image_every=0, ckpt_every=0),
    ),
    # The paper's headline rate: f=8, C=16, d=16, K=2^16 -> one token per 8x8 patch, 0.25 bpp.
    # The recipe the recipe study chose on 2 CPU cores (docs/results.md): EfficientNet-Lite0's ImageNet stages as
    # the encoder's start and a pixel-shuffle head (about 2x the steps per CPU-minute of full-resolution levels),
    # MSE, lr 1e-3 with warm-up and cosine decay, EMA of the weights, random resized crops. No attention: its
    # memory grows with the square of the pixels (a 1 MP image: a 1 GB score matrix in each of encoder and
    # decoder), and without it a token depends only on the pixels around it. Width is sized so that hours of CPU
    # training get somewhere; raise it on a GPU.
    "default": dict(
        model=dict(
            downsample=8, latent_channels=16, token_dim=16, codebook_bits=16, encoder="effnet-lite0", patch=2,
            base_channels=32, channel_mult=(2, 2, 4), blocks_per_level=1, attention=False, groups=16,
        ),
        train=dict(crop=128, batch_size=8, steps=18_000, lr=1e-3, lr_schedule="cosine", warmup_steps=500,
                   lr_final_ratio=0.1, ema_decay=0.999, crop_window_max=3.0, recon_loss="mse"),
    ),
    # The 256-token model (issue 31): one 16-bit token per 16x16 patch (0.0625 bpp; a 256x256 image is a 16x16
    # grid). Grown from the default model's weights (grown_state): its decoder becomes this one's finer levels
    # under a new coarsest one, its encoder trunk gains EfficientNet's stride-16 stage.
    "f16": dict(
        model=dict(
            downsample=16, latent_channels=16, token_dim=16, codebook_bits=16, encoder="effnet-lite0", patch=2,
            base_channels=32, channel_mult=(2, 2, 4, 4), blocks_per_level=1, attention=False, groups=16,
        ),
        train=dict(crop=128, batch_size=8, steps=24_000, lr=5e-4, lr_schedule="cosine", warmup_steps=300,
                   lr_final_ratio=0.1, ema_decay=0.999, crop_window_max=3.0, recon_loss="mse",
                   init_from="default"),
    ),
    # The discretized-VAE codec (training/codec.py): the default model's network, fine-tuned from its weights
    # (its encoder and decoder) for bits + lambda * 255^2 * MSE at six lambdas in one model (a gain per level),
    # about 0.1 to 1 bpp. The hyperprior starts from scratch, hence a learning rate above a fine-tune's.
    "codec": dict(
        model=dict(
            downsample=8, latent_channels=16, token_dim=16, codebook_bits=16, encoder="effnet-lite0", patch=2,
            base_channels=32, channel_mult=(2, 2, 4), blocks_per_level=1, attention=False, groups=16,
            quantizer="uniform", rate_lambdas=(0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.0483), hyper_channels=32,
        ),
        train=dict(crop=128, batch_size=8, steps=12_000, lr=5e-4, lr_schedule="cosine", warmup_steps=300,
                   lr_final_ratio=0.1, ema_decay=0.999, crop_window_max=3.0, recon_loss="mse",
                   init_from="default"),
    ),
}
