import pytest
import torch

from gqtok.training.effnet import EffNetTrunk, StaticSameConv, efficientnet_lite0, imagenet_state


def test_static_padding_matches_the_packages_same_padding():
    """The trunk's constant pads give the network's own output on even sizes, so its ImageNet weights mean the
    same thing (odd sizes never reach it: images are multiples of 8)."""
    net = efficientnet_lite0(pretrained=True).eval()
    trunk = EffNetTrunk(8)
    trunk.load_imagenet()
    trunk.eval()
    assert all(isinstance(m, StaticSameConv) for m in trunk.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.rand(2, 3, 48, 72) * 2 - 1
    with torch.no_grad():
        h = net._swish(net._bn0(net._conv_stem(((x + 1) * 127.5 - 127) / 128)))
        for block in net._blocks[:5]:
            h = block(h)
        ours = trunk(x)
    assert ours.shape == (2, 40, 6, 9)
    assert torch.allclose(ours, h, atol=1e-5)


def test_imagenet_weights_load_and_batchnorm_keeps_its_statistics():
    trunk = EffNetTrunk(16)
    trunk.load_imagenet()
    state = imagenet_state()
    assert torch.equal(trunk.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(trunk.blocks[10]._project_conv.weight, state["_blocks.10._project_conv.weight"])
    trunk.train()
    assert trunk.training and not any(m.training for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = trunk.bn0.running_mean.clone()
    trunk(torch.rand(2, 3, 64, 64))
    assert torch.equal(trunk.bn0.running_mean, before)
    assert trunk.bn0.weight.requires_grad  # scale and shift still train
    with pytest.raises(ValueError, match="stride 8 or 16"):
        EffNetTrunk(4)
