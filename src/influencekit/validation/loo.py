"""Ground truth by retraining: the actual change of test losses when training points are removed.

For each chosen training point i, the model is retrained on the other n − 1 points starting from
the trained weights, and the change of each test measurement is recorded:

    actual[j, i] = L_test(z_j; θ̂_{−i}) − L_test(z_j; θ̂_base).

Two ways to retrain:

- :class:`ConvexRefit` (convex objectives, e.g. logistic regression): minimise to a tight gradient
  tolerance in float64 (L-BFGS or Newton); θ̂_base is the same refit on all n points, so the
  baseline carries no optimisation error of its own.
- :class:`ContinuedTraining` (networks, as in the paper's Fig. 2 right): a fixed number of
  optimiser steps from the trained weights without the point; by default θ̂_base is the same
  continued training with the point kept and the same seed, which cancels the drift of training on.

:func:`validate` puts these next to ``Influence.loo_change`` and reports Pearson and Spearman R.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import ExampleSet
from ..huggingface import model_output
from ..influence import Influence
from ..inputs import call_arguments
from ..objective import Objective
from ..parameters import TrackedParameters, evaluation_mode
from ..training import hessian_matrix, minimize, train_steps


@dataclass(frozen=True)
class ConvexRefit:
    """Refit to ‖∇R‖ ≤ ``tol`` from the trained weights, in ``dtype``."""

    method: Literal["lbfgs", "newton"] = "newton"
    tol: float = 1e-10
    max_iter: int = 200
    dtype: torch.dtype = torch.float64


@dataclass(frozen=True)
class ContinuedTraining:
    """``steps`` more optimiser steps from the trained weights (batches drawn with ``seed``)."""

    steps: int
    lr: float = 1e-3
    batch_size: int = 128
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: int = 0
    baseline: Literal["continued", "original"] = "continued"


Retraining = ConvexRefit | ContinuedTraining


@dataclass
class ValidationResult:
    """Predicted vs actual leave-one-out changes of the test losses.

    Attributes:
        indices: ``(k,)`` training points removed, one at a time.
        predicted: ``(m, k)`` ``loo_change`` (−I_up,loss / n).
        actual: ``(m, k)`` change of the test measurement after retraining without the point.
        pearson: Pearson R over all (test, removed point) pairs.
        spearman: Spearman R over the same pairs.
    """

    indices: Tensor
    predicted: Tensor
    actual: Tensor
    pearson: float
    spearman: float


def correlations(predicted: Tensor, actual: Tensor) -> tuple[float, float]:
    """Pearson and Spearman R between two equally shaped arrays (flattened)."""
    a = predicted.detach().cpu().double().numpy().ravel()
    b = actual.detach().cpu().double().numpy().ravel()
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    return float(stats.pearsonr(a, b)[0]), float(stats.spearmanr(a, b)[0])


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def measured_test_losses(model: nn.Module, objective: Objective, test: ExampleSet) -> Tensor:
    """The test measurement of every test point, ``(m,)``, in evaluation mode without gradients
    (``objective.test_loss``: no regulariser)."""
    parameter = next(model.parameters())
    out = []
    with evaluation_mode(model), torch.no_grad():
        for _, X, y in test.batches(4096, parameter.device, parameter.dtype):
            args, kwargs = call_arguments(X)
            out.append(objective.test_loss(model_output(model(*args, **kwargs)), y))
    return torch.cat(out)


def _retrain(model: nn.Module, objective: Objective, data: ExampleSet, retraining: Retraining,
             params: Sequence[str] | str | None, hessian: Tensor | None = None) -> None:
    if isinstance(retraining, ConvexRefit):
        report = minimize(model, objective, data, params, retraining.method, retraining.tol,
                          retraining.max_iter, hessian=hessian)
        if not report.converged:
            raise RuntimeError(
                f"The leave-one-out refit did not reach ‖∇R‖ ≤ {retraining.tol:g} (got "
                f"{report.gradient_norm:.3g} after {report.iterations} iterations); the actual "
                "changes would carry optimisation error. Raise max_iter, try method='newton', or "
                "loosen tol."
            )
    else:
        train_steps(model, objective, data, retraining.steps, params, retraining.optimizer,
                    retraining.lr, retraining.batch_size, retraining.seed)


def actual_loo_changes(model: nn.Module, objective: Objective, train: Any, test: Any,
                       remove: Tensor | Sequence[int], retraining: Retraining = ConvexRefit(),
                       params: Sequence[str] | str | None = None,
                       progress: bool = False) -> Tensor:
    """Actual change of each test measurement when each training point in ``remove`` is dropped.

    The model is copied (never modified). Returns ``(m, k)`` for m test points and k removals.
    """
    train_set = ExampleSet(train, "training data")
    test_set = ExampleSet(test, "test data")
    work = copy.deepcopy(model)
    if isinstance(retraining, ConvexRefit):
        work = work.to(retraining.dtype)
    tracked = TrackedParameters(work, params)
    start = _snapshot(work)  # parameters and buffers (batch-norm statistics) alike
    if isinstance(retraining, ConvexRefit) or retraining.baseline == "continued":
        _retrain(work, objective, train_set, retraining, params)
    hessian = None
    if isinstance(retraining, ConvexRefit):
        start = _snapshot(work)  # refit baseline: every removal starts from the optimum
        if retraining.method == "newton" and tracked.dim <= 4096:
            hessian = hessian_matrix(work, objective, train_set, params)
    baseline = measured_test_losses(work, objective, test_set)
    indices = torch.as_tensor(remove, dtype=torch.long).reshape(-1)
    columns = []
    for i in tqdm(indices.tolist(), desc="leave-one-out retraining", disable=not progress):
        work.load_state_dict(start)
        _retrain(work, objective, train_set.without([i]), retraining, params, hessian)
        columns.append(measured_test_losses(work, objective, test_set) - baseline)
    return torch.stack(columns, dim=1)


def validate(influence: Influence, test: Any, indices: Tensor | Sequence[int] | None = None,
             num_points: int = 50, retraining: Retraining = ConvexRefit(),
             progress: bool = False) -> ValidationResult:
    """Check ``influence.loo_change(test)`` against actual retraining.

    Args:
        influence: a fitted :class:`Influence`.
        test: the test points.
        indices: training points to remove; by default the ``num_points`` with the largest
            |influence| on any of the test points (the paper's choice).
        retraining: how to retrain (:class:`ConvexRefit` or :class:`ContinuedTraining`).
    """
    predicted_all = influence.loo_change(test)
    if indices is None:
        k = min(num_points, predicted_all.shape[1])
        indices = predicted_all.abs().amax(dim=0).topk(k).indices
    indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    predicted = predicted_all[:, indices.to(predicted_all.device)]
    actual = actual_loo_changes(influence.model, influence.objective, influence.train_data, test,
                                indices, retraining, influence.params, progress)
    actual = actual.to(predicted.device, predicted.dtype)
    pearson, spearman = correlations(predicted, actual)
    return ValidationResult(indices, predicted, actual, pearson, spearman)
