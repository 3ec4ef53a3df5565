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
