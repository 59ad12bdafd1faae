"""What to differentiate: the per-example training loss and the per-example test measurement.

Convention (the paper's, and its reference code's): the training objective is

    R(θ) = (1/n) Σ_i L(z_i, θ),   L(z, θ) = ℓ(f_θ(x), y) + (λ/2)·‖θ‖²,

so every training point carries its share of the L2 regulariser (λ = ``weight_decay``, applied to
the tracked parameters θ). The test measurement has no regulariser. Influence functions are taken
with respect to R; damping is separate from λ (see ``Influence``).

A user subclasses :class:`Objective` and writes ``train_loss`` (and, if the quantity of interest on
test points is not the same loss, ``test_loss``). Both map a batch of model outputs and targets to
one number per example, shape ``(b,)``. They must be pure tensor code (no ``.item()``, no Python
branching on values) so that they run under ``torch.func.vmap``; value checks go in ``check``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ObjectiveMismatchError


class Objective(ABC):
    """Base class: per-example training loss ℓ and test measurement, plus an L2 weight decay λ.

    Args:
        weight_decay: λ ≥ 0 of the regulariser (λ/2)·‖θ‖² folded into every training loss.
    """

    def __init__(self, weight_decay: float = 0.0) -> None:
        if not (isinstance(weight_decay, int | float) and math.isfinite(weight_decay)):
            raise ValueError(f"weight_decay must be a finite number ≥ 0, got {weight_decay!r}.")
        if weight_decay < 0:
            raise ValueError(
                f"weight_decay must be ≥ 0 (it is the λ of (λ/2)·‖θ‖²), got {weight_decay}."
            )
        self.weight_decay = float(weight_decay)

    @abstractmethod
    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example data term ℓ of the training loss, shape ``(b,)`` (without the L2 term)."""

    def test_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example test measurement, shape ``(b,)``; by default the training loss ℓ."""
        return self.train_loss(outputs, targets)

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Raise :class:`ObjectiveMismatchError` if outputs/targets do not fit this objective.

        Called on real batches outside any transform, so it may inspect values. The base class
        checks that outputs and targets hold the same number of examples; subclasses add more.
        """
        _check_batch(outputs, targets, type(self).__name__)

    def regularizer(self, theta: Tensor) -> Tensor:
        """(λ/2)·‖θ‖² for the flat vector of tracked parameters θ."""
        return 0.5 * self.weight_decay * theta.pow(2).sum()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight_decay={self.weight_decay})"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ObjectiveMismatchError(message)


def _check_batch(outputs: Tensor, targets: Tensor, name: str) -> None:
    _require(
        outputs.ndim >= 1 and targets.ndim >= 1 and outputs.shape[0] == targets.shape[0],
        f"{name}: the model output and the targets must have the same number of examples "
        f"(first dimension); got output shape {tuple(outputs.shape)} and targets shape "
        f"{tuple(targets.shape)}.",
    )
    _require(
        outputs.is_floating_point(),
        f"{name}: the model output must be floating point, got dtype {outputs.dtype}.",
    )


class CrossEntropyObjective(Objective):
    """Multiclass cross-entropy: ℓ = −log softmax(f(x))_y.

    Shapes: outputs ``(b, C)`` logits, targets ``(b,)`` integer class indices in ``[0, C)``.
    """

    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        name = "CrossEntropyObjective"
        _check_batch(outputs, targets, name)
        _require(
            outputs.ndim == 2,
            f"{name} expects logits of shape (batch, num_classes), got model output shape "
            f"{tuple(outputs.shape)}. For a single logit per example use BinaryLogisticObjective.",
        )
        _require(
            targets.ndim == 1 and not targets.is_floating_point() and not targets.is_complex(),
            f"{name} expects integer class indices of shape (batch,), got targets of shape "
            f"{tuple(targets.shape)} and dtype {targets.dtype}. Convert with y.long().",
        )
        num_classes = outputs.shape[1]
        _require(
            bool(((targets >= 0) & (targets < num_classes)).all()),
            f"{name}: class indices must lie in [0, {num_classes}) for a model with "
            f"{num_classes} outputs; got values from {int(targets.min())} to {int(targets.max())}.",
        )


def _signed_labels(targets: Tensor, dtype: torch.dtype) -> Tensor:
    """Map labels in {0, 1} or {−1, +1} to ±1 (0 → −1)."""
    targets = targets.to(dtype)
    return torch.where(targets == 0, -torch.ones_like(targets), targets)


def _scores(outputs: Tensor) -> Tensor:
    return outputs.reshape(outputs.shape[0])


def _check_binary(outputs: Tensor, targets: Tensor, name: str) -> None:
    _check_batch(outputs, targets, name)
    _require(
        outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1),
        f"{name} expects one score per example, model output of shape (batch,) or (batch, 1); "
        f"got {tuple(outputs.shape)}. For several classes use CrossEntropyObjective.",
    )
    _require(
        targets.ndim == 1 or (targets.ndim == 2 and targets.shape[1] == 1),
        f"{name} expects targets of shape (batch,), got {tuple(targets.shape)}.",
    )
    values = set(torch.unique(targets.detach().to("cpu", torch.float64)).tolist())
    _require(
        values <= {0.0, 1.0} or values <= {-1.0, 1.0},
        f"{name} expects labels in {{0, 1}} or {{-1, +1}}, got values {sorted(values)[:10]}.",
    )


class BinaryLogisticObjective(Objective):
    """Binary logistic loss on a score s = f(x): ℓ = log(1 + exp(−y·s)), y ∈ {−1, +1}.

    Labels may be given as {0, 1} (0 is read as −1) or {−1, +1}. Shapes: outputs ``(b,)`` or
    ``(b, 1)``, targets ``(b,)``.
    """

    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        s = _scores(outputs)
        y = _signed_labels(targets.reshape(s.shape), s.dtype)
        return F.softplus(-y * s)

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        _check_binary(outputs, targets, "BinaryLogisticObjective")


class SmoothHingeObjective(Objective):
    """Smooth hinge on the margin m = y·f(x): ℓ = t·log(1 + exp((1 − m)/t)); t = 0 is max(0, 1 − m).

    As t → 0 it tends to the hinge loss (Koh & Liang 2017, §4.1). Labels in {0, 1} or {−1, +1};
    outputs ``(b,)`` or ``(b, 1)``.

    Args:
        temperature: t ≥ 0.
        weight_decay: λ of the L2 term.
    """

    def __init__(self, temperature: float = 0.001, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        if not (isinstance(temperature, int | float) and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number ≥ 0, got {temperature!r}.")
        if temperature < 0:
            raise ValueError(f"temperature must be ≥ 0 (0 is the plain hinge), got {temperature}.")
        self.temperature = float(temperature)

    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        s = _scores(outputs)
        margin = _signed_labels(targets.reshape(s.shape), s.dtype) * s
        if self.temperature == 0.0:
            return torch.relu(1.0 - margin)
        t = self.temperature
        return t * F.softplus((1.0 - margin) / t)

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        _check_binary(outputs, targets, "SmoothHingeObjective")

    def __repr__(self) -> str:
        return (
            f"SmoothHingeObjective(temperature={self.temperature}, "
            f"weight_decay={self.weight_decay})"
        )


class MSEObjective(Objective):
    """Squared error, averaged over output dimensions: ℓ = mean_k (f_k(x) − y_k)².

    This is ``torch.nn.MSELoss`` per example. Shapes: outputs ``(b, ...)`` and targets of the
    same shape (targets ``(b,)`` are accepted for outputs ``(b, 1)``).
    """

    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        targets = targets.reshape(outputs.shape).to(outputs.dtype)
        return (outputs - targets).pow(2).reshape(outputs.shape[0], -1).mean(dim=1)

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        name = "MSEObjective"
        _check_batch(outputs, targets, name)
        _require(
            outputs.numel() == targets.numel(),
            f"{name} expects targets with the shape of the model output {tuple(outputs.shape)}; "
            f"got {tuple(targets.shape)}.",
        )
        _require(
            targets.is_floating_point() or not targets.is_complex(),
            f"{name} expects real-valued targets, got dtype {targets.dtype}.",
        )
