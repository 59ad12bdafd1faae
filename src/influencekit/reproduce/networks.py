"""Models shared by the network experiments (Fig. 2 right, §5.1, §5.2), sized for 8×8 digits.

- :class:`DigitsCNN`: the paper's Fig. 2 CNN: five tanh 3×3 convolutions with 8 channels, a tanh
  1×1 convolution to 10 channels, global average pooling and a linear 10×10 layer: 2,616
  parameters, the paper's count. Inputs ``(b, 1, 8, 8)``.
- :func:`train_feature_extractor`: a tanh MLP trained on digit classes *other* than the binary
  task's, then frozen: the stand-in for Inception's pretrained features.
- :class:`FrozenFeatureClassifier`: frozen features + a logistic top layer ``top`` (the only
  trainable parameters, as the paper retrained only Inception's top layer).
- :class:`RBFKernelMachine`: a linear model on whitened RBF-kernel features, i.e. a kernel machine
  regularised by its RKHS norm (the paper's reference code trained its RBF SVM this way).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..datasets import digits
from ..objective import CrossEntropyObjective
from ..randomness import seeded
from ..training import train_steps
from .common import zero_linear


class DigitsCNN(nn.Module):
    """Fig. 2's CNN: ``(b, 1, s, s)`` → ``(b, 10)`` logits, 2,616 parameters (any image size).

    Layers: conv3×3(1→8), conv3×3(8→8, stride 2), conv3×3(8→8), conv3×3(8→8, stride 2),
    conv3×3(8→8), conv1×1(8→10), each followed by tanh (spatial size 8 → 4 → 2), then the mean
    over positions and ``fc`` = Linear(10, 10). Strides and padding follow the all-convolutional
    design the paper's code used; the widths give its 2,616 parameters.
    """

    strides = (1, 2, 1, 2, 1)

    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        inputs = 1
        for stride in self.strides:
            layers += [nn.Conv2d(inputs, channels, 3, stride=stride, padding=1), nn.Tanh()]
            inputs = channels
        layers += [nn.Conv2d(channels, classes, 1), nn.Tanh()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(classes, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def as_images(X: Tensor) -> Tensor:
    """Flat square images ``(n, s²)`` → ``(n, 1, s, s)`` (digits: s = 8; MNIST: s = 28)."""
    side = round(X.shape[1] ** 0.5) if X.ndim == 2 else 0
    if X.ndim != 2 or side * side != X.shape[1]:
        raise ValueError(f"expected flat square images of shape (n, s²), got {tuple(X.shape)}.")
    return X.reshape(-1, 1, side, side)


class FeatureMLP(nn.Module):
    """Two tanh layers ``64 → width → width``: the feature part of the extractor."""

    def __init__(self, width: int = 64, inputs: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(inputs, width), nn.Tanh(),
                                    nn.Linear(width, width), nn.Tanh())
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def train_feature_extractor(excluded: tuple[int, ...], width: int = 64, steps: int = 1500,
                            seed: int = 0, dtype: torch.dtype = torch.float64) -> FeatureMLP:
    """Train :class:`FeatureMLP` + a softmax head on the digits *not* in ``excluded``; freeze it.

    Uses the training split of :func:`~influencekit.datasets.digits` (same seed as the
    experiments), so no test image is seen. Adam, lr 1e-3, batch 128, weight decay 1e-4. The
    layers are initialised from ``seed`` in a forked generator (the caller's random state is
    left alone). The returned extractor has ``requires_grad=False`` everywhere and is in eval
    mode.
    """
    classes = tuple(c for c in range(10) if c not in excluded)
    if len(classes) < 2:
        raise ValueError(f"excluding {excluded} leaves fewer than two classes to train on.")
    split = digits(seed=seed, classes=classes)
    with seeded(seed):
        features = FeatureMLP(width)
        head = nn.Sequential(features, nn.Linear(width, len(classes)))
    train_steps(head, CrossEntropyObjective(weight_decay=1e-4),
                (split.X_train.float(), split.y_train), steps=steps, lr=1e-3, batch_size=128,
                seed=seed)
    features = features.to(dtype).eval()
    for parameter in features.parameters():
        parameter.requires_grad_(False)
    return features


class FrozenFeatureClassifier(nn.Module):
    """Binary classifier s(x) = topᵀ φ(x) + b on frozen features φ; output ``(b,)`` scores.

    Only ``top`` is meant to be trained or tracked (``params=["top"]``); it starts at zero.
    """

    def __init__(self, features: nn.Module, width: int) -> None:
        super().__init__()
        self.features = features
        self.top = zero_linear(width, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.top(self.features(x)).squeeze(-1)


class LogisticTop(nn.Module):
    """The top layer alone, on precomputed features ``(b, d)`` → ``(b,)`` scores.

    Shares its parameter names (``top.weight``, ``top.bias``) with
    :class:`FrozenFeatureClassifier`, so the two can exchange state. Starts at zero.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.top = zero_linear(width, 1, bias=True)

    def forward(self, features: Tensor) -> Tensor:
        return self.top(features).squeeze(-1)


def median_heuristic_gamma(X: Tensor, scale: float = 2.0) -> float:
    """γ = scale / median_{i≠j} ‖x_i − x_j‖², so that k(x, x') = exp(−γ‖x − x'‖²) ≈ e^−scale
    for a typical pair (the reference code's γ gave γ‖x − x'‖² ≈ 2–4 on its images)."""
    squared = torch.cdist(X, X).pow(2)
    positive = squared[squared > 0]
    if positive.numel() == 0:
        raise ValueError("all points coincide; the median heuristic for γ is undefined.")
    return scale / float(positive.median())


class RBFKernelMachine(nn.Module):
    """f(x) = wᵀ L⁻¹ k(x), k(x)_j = exp(−γ‖x − c_j‖²), K = L·Lᵀ over the centres c (``(n, d)``).

    With the L2 penalty (λ/2)‖w‖² this is kernel regression with the RKHS-norm penalty
    (f = Σ_j a_j k(·, c_j), ‖f‖²_H = ‖w‖² for a = L⁻ᵀw); training point i has feature row i of
    L. Output ``(b,)`` scores; only ``linear`` has parameters (no bias, as in the paper's code),
    and they start at zero.
    """

    def __init__(self, centers: Tensor, gamma: float, jitter: float = 1e-8) -> None:
        super().__init__()
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}.")
        self.gamma = float(gamma)
        self.register_buffer("centers", centers.clone())
        gram = self.kernel(centers)
        eye = torch.eye(len(centers), dtype=centers.dtype, device=centers.device)
        self.register_buffer("cholesky", torch.linalg.cholesky(gram + jitter * eye))
        self.linear = zero_linear(len(centers), 1)

    def kernel(self, x: Tensor) -> Tensor:
        """k(x, c_j) for each row of ``x`` ``(b, d)`` and centre j: ``(b, n)``."""
        return torch.exp(-self.gamma * torch.cdist(x, self.centers).pow(2))

    def features(self, x: Tensor) -> Tensor:
        """Whitened kernel features L⁻¹ k(x), ``(b, n)``."""
        return torch.linalg.solve_triangular(self.cholesky, self.kernel(x).T, upper=False).T

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.features(x)).squeeze(-1)
