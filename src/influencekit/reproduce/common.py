"""Pieces the experiments share: choosing the data, fitting convex models, picking test points."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..datasets import Split, digits, mnist
from ..objective import Objective
from ..training import minimize
from .base import RunSettings


def image_data(settings: RunSettings, classes: tuple[int, ...] | None = None,
               max_train: int | None = None) -> Split:
    """Digits (8×8, bundled) by default; MNIST from ``settings.data`` (IDX files) if given."""
    if settings.data is not None:
        return mnist(settings.data, classes=classes, max_train=max_train)
    return digits(seed=settings.seed, classes=classes)


def zero_linear(inputs: int, outputs: int, bias: bool = False) -> nn.Linear:
    """``nn.Linear(inputs, outputs, bias)`` (float32) with all parameters zero.

    Built without its default random initialisation (:func:`torch.nn.utils.skip_init`), so it
    never draws from, or advances, the global random number generator.
    """
    layer = nn.utils.skip_init(nn.Linear, inputs, outputs, bias=bias)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.zero_()
    return layer


def fit_linear(objective: Objective, split: Split, outputs: int, bias: bool = False,
               tol: float = 1e-10) -> nn.Linear:
    """A linear model (logistic regression, SVM) fitted to ‖∇R‖ ≤ tol in float64 by Newton.

    Newton's method starts from zero weights: nothing random is drawn.
    """
    model = zero_linear(split.X_train.shape[1], outputs, bias=bias).double()
    report = minimize(model, objective, split.train, tol=tol)
    if not report.converged:
        raise RuntimeError(f"fitting the linear model stopped at ‖∇R‖ = {report.gradient_norm:.2e}")
    return model


def hardest_misclassified(model: nn.Module, objective: Objective, X: Tensor, y: Tensor) -> int:
    """Index of the misclassified test point with the highest loss (the highest loss if none)."""
    with torch.no_grad():
        outputs = model(X)
        losses = objective.test_loss(outputs, y)
        if outputs.ndim == 2 and outputs.shape[1] > 1:
            wrong = torch.nonzero(outputs.argmax(dim=1) != y).flatten()
        else:  # one score per example, labels {0, 1} or {−1, +1}: wrong when y±·f(x) ≤ 0
            signed = torch.where(y == 0, -torch.ones_like(y), y).to(outputs.dtype)
            wrong = torch.nonzero(signed * outputs.reshape(-1) <= 0).flatten()
    pool = wrong if wrong.numel() else torch.arange(len(y))
    return int(pool[losses[pool].argmax()])
