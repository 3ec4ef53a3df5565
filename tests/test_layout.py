import numpy as np
import pytest
import torch

from gqtok.core import layout


@pytest.mark.parametrize("c,d", [(16, 16), (16, 8), (16, 4), (8, 4), (6, 2), (5, 1)])
def test_group_round_trip_numpy_and_torch(c, d):
    z = np.random.default_rng(0).standard_normal((2, c, 3, 5)).astype(np.float32)
    tok = layout.group(z, d)
    assert tok.shape == (2, c // d, 3, 5, d)
    assert np.array_equal(layout.ungroup(tok), z)
    tt = layout.group(torch.from_numpy(z), d)
    assert torch.equal(tt, torch.from_numpy(np.ascontiguousarray(tok)))
    assert torch.equal(layout.ungroup(tt), torch.from_numpy(z))


def test_grouping_is_strided():
    # channel c -> token c % T, slot c // T
    c, d = 16, 4
    t = c // d
    z = np.arange(c, dtype=np.float32).reshape(1, c, 1, 1)
    tok = layout.group(z, d)[0, :, 0, 0]  # [T, d]
    for k in range(t):
        assert tok[k].tolist() == [k + j * t for j in range(d)]


def test_channels_must_divide():
    with pytest.raises(ValueError, match="multiple of the token dimension"):
        layout.tokens_per_position(16, 5)
    with pytest.raises(ValueError):
        layout.group(np.zeros((1, 6, 2, 2)), 4)


@pytest.mark.parametrize("t", [1, 2])
def test_budget_size_fits_the_budget_keeps_the_aspect_and_never_enlarges(t):
    import math

    from gqtok.core.layout import budget_size

    rng = np.random.default_rng(t)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 2000, 2))
        budget = int(rng.integers(t, 5000))
        bh, bw = budget_size(h, w, 8, t, budget)
        assert 1 <= bh <= h and 1 <= bw <= w
        assert t * math.ceil(bh / 8) * math.ceil(bw / 8) <= budget
        if (bh, bw) == (h, w):
            continue
        # the aspect is kept to the pixel, unless a side hit its floor of one pixel
        assert min(bh, bw) == 1 or abs(bh / h - bw / w) <= 1 / min(bh, bw)
        # and it is the largest: by brute force over the scales where a side fills a whole number of cells
        scales = [k * 8 / h for k in range(1, math.ceil(h / 8) + 1)] + [k * 8 / w for k in range(1, math.ceil(w / 8) + 1)]
        fits = [s for s in scales if s <= 1 and t * math.ceil(max(1, math.floor(h * s)) / 8)
                * math.ceil(max(1, math.floor(w * s)) / 8) <= budget]
        best = max(fits, default=0)
        assert bh >= math.floor(h * best) - 1 and bw >= math.floor(w * best) - 1, (h, w, budget, best)
    with pytest.raises(ValueError, match="less than one position"):
        budget_size(64, 64, 8, 2, 1)
