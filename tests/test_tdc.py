import math

import pytest
import torch

from gqtok.training.tdc import TDC


def test_weights_follow_the_band():
    tdc = TDC(target_bits=16)
    tdc.lam.fill_(2.0), tdc.lam_max.fill_(10.0), tdc.lam_min.fill_(0.1)
    kl = torch.tensor([[20.0, 16.2, 10.0], [16.0, 15.6, 16.5]])  # above, inside, below / inside, inside, edge
    per_image = torch.tensor([10 * 20.0 + 16.2 + 0.1 * 10.0, 16.0 + 15.6 + 16.5])
    assert tdc.loss(kl).item() == pytest.approx(2.0 * per_image.mean().item())


def test_weights_carry_no_gradient():
    tdc = TDC(target_bits=4)
    kl = torch.tensor([[9.0, 1.0]], requires_grad=True)
    tdc.lam_max.fill_(5.0), tdc.lam_min.fill_(0.5)
    tdc.loss(kl).backward()
    assert kl.grad.tolist() == [[pytest.approx(tdc.lam.item() * 5.0), pytest.approx(tdc.lam.item() * 0.5)]]


@pytest.mark.parametrize("stats,expected", [
    ({"mean": 17.0, "max": 17.0, "min": 17.0}, (1.01, 1.01, 1.0)),    # all above: lam up, lam_max up, lam_min up (clamped at 1)
    ({"mean": 15.0, "max": 15.0, "min": 15.0}, (1 / 1.01, 1.0, 1 / 1.01)),  # all below: lam down, lam_max down (clamped), lam_min down
    ({"mean": 16.0, "max": 16.4, "min": 15.6}, (1 / 1.01, 1.0, 1.0)),  # in band: mean not above target -> lam down
])
def test_update_directions_from_one(stats, expected):
    tdc = TDC(target_bits=16, lam_init=1.0)
    tdc.update(stats)
    assert tuple(tdc.scalars().values()) == pytest.approx(expected)


def test_lam_max_comes_back_down_and_clamps():
    tdc = TDC(target_bits=8)
    for _ in range(2000):
        tdc.update({"mean": 8.0, "max": 50.0, "min": 8.0})
    assert tdc.lam_max.item() == pytest.approx(1e3)  # clamped above
    up = tdc.lam_max.item()
    tdc.update({"mean": 8.0, "max": 8.2, "min": 8.0})
    assert tdc.lam_max.item() == pytest.approx(up / 1.01)  # the reference variant never came down
    for _ in range(2000):
        tdc.update({"mean": 8.0, "max": 0.0, "min": 0.0})
    assert tdc.lam_min.item() == pytest.approx(1e-3) and tdc.lam_max.item() == pytest.approx(1.0)


def test_scalars_survive_a_state_dict_round_trip():
    a = TDC(target_bits=16, lam_init=3e-4)
    for _ in range(7):
        a.update({"mean": 20.0, "max": 30.0, "min": 1.0})
    b = TDC(target_bits=16)
    b.load_state_dict(a.state_dict())
    assert b.scalars() == a.scalars()
    assert b.lam.item() == pytest.approx(3e-4 * 1.01**7)
    assert set(a.state_dict()) == {"lam", "lam_max", "lam_min"}


def test_statistics_single_process():
    kl = torch.tensor([[1.0, 2.0], [3.0, 10.0]])
    assert TDC.statistics(kl) == {"mean": 4.0, "max": 10.0, "min": 1.0}
    assert math.isclose(TDC.statistics(kl[:1])["mean"], 1.5)


def test_lam_floor_stops_the_fall_and_the_default_has_none():
    low = {"mean": 2.0, "max": 5.0, "min": 1.0}  # KL far under target: lam keeps falling
    reference, floored = TDC(16.0, lam_init=1e-4), TDC(16.0, lam_init=1e-4, lam_floor=1e-5)
    for _ in range(1000):
        reference.update(low)
        floored.update(low)
    assert reference.lam.item() == pytest.approx(1e-4 / 1.01**1000, rel=1e-9)  # ~5e-9: the reference rule
    assert floored.lam.item() == 1e-5
    floored.update({"mean": 20.0, "max": 25.0, "min": 10.0})  # and it climbs from the floor at once
    assert floored.lam.item() == pytest.approx(1.01e-5)
