"""Training the tracked parameters on an objective: the fits the paper uses and its ground truths.

- :func:`minimize` fits a convex objective R(θ) = (1/n) Σ ℓ_i + (λ/2)‖θ‖² to a tight gradient
  tolerance, full batch, by L-BFGS (strong Wolfe line search) or Newton's method with exact
  Hessian-vector products and conjugate gradients.
- :func:`train_steps` runs a fixed number of mini-batch optimiser steps (Adam or SGD), the way a
  network is (re)trained.

Both change only the tracked parameters of the model, in place, and return a :class:`FitReport`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import arguments
from .curvature import HessianOperator
from .data import ExampleSet
from .errors import ConvergenceWarning, IndefiniteHessianError
from .gradients import GradientComputer
from .objective import Objective
from .parameters import TrackedParameters, evaluation_mode
from .randomness import seeded
from .solvers.cg import CG

logger = logging.getLogger(__name__)


@dataclass
class FitReport:
    """Outcome of a fit: final objective value, gradient norm ‖∇R(θ)‖ and iterations.

    ``converged`` says whether ‖∇R‖ reached the tolerance; it is ``None`` for fixed-step
    training (:func:`train_steps`), which has no tolerance.
    """

    objective_value: float
    gradient_norm: float
    iterations: int
    converged: bool | None


def objective_and_gradient(tracked: TrackedParameters, objective: Objective, data: ExampleSet,
                           theta: Tensor, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """R(θ) = (1/n) Σ_i ℓ(z_i, θ) + (1/2)Σ_j λ_j θ_j² and its gradient, over all of ``data``."""
    n = len(data)
    decay = objective.decay_vector(tracked.named_tensors(),
                                           tracked.all_names())
    value = torch.zeros((), dtype=theta.dtype, device=theta.device)
    gradient = torch.zeros_like(theta)
    with torch.enable_grad():
        leaf = theta.detach().requires_grad_(True)
        for _, X, y in data.batches(chunk_size, theta.device, theta.dtype):
            loss = objective.train_loss(tracked.forward(leaf, X), y).sum() / n
            (g,) = torch.autograd.grad(loss, leaf)
            value += loss.detach()
            gradient += g
    value += objective.regularizer(theta.detach(), decay)
    gradient += decay * theta.detach()
    return value, gradient


def minimize(model: nn.Module, objective: Objective, train: Any,
             params: Sequence[str] | str | None = None,
             method: Literal["lbfgs", "newton"] = "newton",
             tol: float = 1e-10, max_iter: int = 2000, chunk_size: int = 4096,
             hessian: Tensor | None = None, progress: bool = False) -> FitReport:
    """Fit the tracked parameters to ‖∇R(θ)‖ ≤ ``tol``, starting from their current values.

    Args:
        method: ``"newton"`` (exact Hessian — a Cholesky factor for p ≤ 4096, else CG on
            Hessian-vector products — kept while it makes progress; a line search; reaches
            round-off level gradients; meant for convex objectives, where it takes a handful of
            steps) or ``"lbfgs"`` (cheap iterations, many of them; the choice for networks, far
            faster there; its function-value line search stalls near ‖∇R‖ ~ 1e-9 in float64).
        tol: target Euclidean norm of the full gradient (use float64 to go below ~1e-6).
        max_iter: cap on L-BFGS function evaluations / Newton steps.
        hessian: for ``"newton"``, a Hessian of R to start with (e.g. at a nearby optimum).
        progress: show a progress bar over the iterations (with ‖∇R‖); the final figures are
            logged either way.
    """
    arguments.choice("method", method, ("lbfgs", "newton"))
    tol = arguments.positive("tol", tol)
    max_iter = arguments.positive_integer("max_iter", max_iter)
    chunk_size = arguments.positive_integer("chunk_size", chunk_size)
    arguments.flag("progress", progress)
    data = ExampleSet(train, "training data")
    tracked = TrackedParameters(model, params)
    theta = tracked.flat()
    bar = tqdm(total=max_iter, desc=f"minimize ({method})", leave=False, disable=not progress)
    with evaluation_mode(model), bar:
        if method == "newton":
            theta, report = _newton(tracked, objective, data, theta, tol, max_iter, chunk_size,
                                    hessian, bar)
        else:
            theta, report = _lbfgs(tracked, objective, data, theta, tol, max_iter, chunk_size,
                                   bar)
    tracked.assign(theta)
    logger.info("minimize (%s): ‖∇R‖ = %.3g after %d iterations (tol %g, %s).", method,
                report.gradient_norm, report.iterations, tol,
                "converged" if report.converged else "NOT converged")
    return report


def _lbfgs(tracked: TrackedParameters, objective: Objective, data: ExampleSet, theta: Tensor,
           tol: float, max_iter: int, chunk_size: int, bar: tqdm) -> tuple[Tensor, FitReport]:
    leaf = theta.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([leaf], lr=1.0, max_iter=max_iter, history_size=50,
                                  tolerance_grad=tol / max(1.0, leaf.numel() ** 0.5),
                                  tolerance_change=0.0, line_search_fn="strong_wolfe")
    evaluations = 0

    def closure() -> Tensor:
        nonlocal evaluations
        evaluations += 1
        value, gradient = objective_and_gradient(tracked, objective, data, leaf.detach(),
                                                 chunk_size)
        leaf.grad = gradient
        bar.update(1)
        bar.set_postfix(gradient=f"{float(gradient.norm()):.2e}")
        return value

    for _ in range(10):  # L-BFGS stops on its inf-norm test; restart until the 2-norm test holds
        optimizer.step(closure)
        value, gradient = objective_and_gradient(tracked, objective, data, leaf.detach(),
                                                 chunk_size)
        if float(gradient.norm()) <= tol or evaluations >= max_iter:
            break
    norm = float(gradient.norm())
    return leaf.detach(), FitReport(float(value), norm, evaluations, norm <= tol)


def _newton(tracked: TrackedParameters, objective: Objective, data: ExampleSet, theta: Tensor,
            tol: float, max_iter: int, chunk_size: int,
            hessian: Tensor | None, bar: tqdm) -> tuple[Tensor, FitReport]:
    """Newton's method that keeps its Hessian while it works (a chord iteration).

    A step θ ← θ − t·A⁻¹∇R with the last Hessian A is accepted when it passes the Armijo test or,
    once R changes below round-off, halves ‖∇R‖. When the kept Hessian stops doing that, it is
    recomputed at the current θ (also when it shrinks ‖∇R‖ by less than 4×). Warm starts
    (leave-one-out refits, where H changes by O(1/n)) converge in a few gradient evaluations
    with no new Hessian at all.
    """
    gradients = GradientComputer(tracked, objective)
    value, gradient = objective_and_gradient(tracked, objective, data, theta, chunk_size)
    newton = _NewtonSystem(gradients, data, chunk_size, hessian)
    steps = 0
    fresh = hessian is None
    while float(gradient.norm()) > tol and steps < max_iter:
        steps += 1
        if newton.stale:
            newton.refresh(theta)
            fresh = True
        direction = newton.solve(gradient)
        step = 1.0
        while True:
            candidate = theta - step * direction
            new_value, new_gradient = objective_and_gradient(tracked, objective, data,
                                                             candidate, chunk_size)
            decreased = new_value <= value - 1e-4 * step * torch.dot(gradient, direction)
            if decreased or new_gradient.norm() <= 0.5 * gradient.norm() or step < 1e-8:
                break
            step *= 0.5
        ratio = float(new_gradient.norm()) / float(gradient.norm())
        if step < 1e-8 or (ratio > 0.5 and not decreased):
            if fresh:
                break  # even a Newton step at this point makes no progress: round-off floor
            newton.stale = True
            continue
        newton.stale = ratio > 0.25  # a kept Hessian must shrink ‖∇R‖ fast to stay
        theta, value, gradient = candidate, new_value, new_gradient
        fresh = False
        bar.update(1)
        bar.set_postfix(gradient=f"{float(gradient.norm()):.2e}")
        logger.debug("Newton step %d: ‖∇R‖ = %.3e, step length %g", steps,
                     float(gradient.norm()), step)
    norm = float(gradient.norm())
    return theta, FitReport(float(value), norm, steps, norm <= tol)


class _NewtonSystem:
    """Solves with the Hessian of R at some θ: Cholesky for p ≤ ``dense_limit``, else CG.

    Where the Hessian is not positive definite (a network away from a minimum), μ·I is added with
    μ raised tenfold from 1e-8·max|H_ii| until it is (Levenberg–Marquardt); at a strict local
    minimum μ is 0 and the steps are exact Newton steps.
    """

    dense_limit = 4096

    def __init__(self, gradients: GradientComputer, data: ExampleSet, chunk_size: int,
                 hessian: Tensor | None) -> None:
        self.gradients, self.data, self.chunk_size = gradients, data, chunk_size
        self.factor: Tensor | None = None
        self.operator: HessianOperator | None = None
        self.shift = 0.0
        self.stale = hessian is None
        if hessian is not None:
            self._factorise(hessian)

    def _factorise(self, hessian: Tensor) -> None:
        eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
        floor = 1e-8 * float(hessian.diagonal().abs().max().clamp_min(1e-30))
        self.shift = 0.0
        while True:
            factor, info = torch.linalg.cholesky_ex(hessian + self.shift * eye)
            if int(info) == 0:
                self.factor = factor
                return
            self.shift = max(10.0 * self.shift, floor)

    def refresh(self, theta: Tensor) -> None:
        self.operator = HessianOperator(self.gradients, self.data, theta, 0.0, self.chunk_size)
        self.factor = None
        if theta.numel() <= self.dense_limit:
            self._factorise(self.operator.dense())
        self.stale = False

    def solve(self, gradient: Tensor) -> Tensor:
        if self.factor is not None:
            return torch.cholesky_solve(gradient[:, None], self.factor)[:, 0]
        assert self.operator is not None
        self.operator.damping = self.shift
        while True:
            cg = CG(tol=1e-12, max_iter=10 * gradient.numel()).prepare(self.operator)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    return cg.solve(gradient)
            except IndefiniteHessianError:
                self.shift = max(10.0 * self.shift, 1e-8)
                self.operator.damping = self.shift


def hessian_matrix(model: nn.Module, objective: Objective, train: Any,
                   params: Sequence[str] | str | None = None, chunk_size: int = 4096) -> Tensor:
    """The explicit Hessian ∇²R(θ) of the training objective at the current parameters, (p, p)."""
    data = ExampleSet(train, "training data")
    tracked = TrackedParameters(model, params)
    with evaluation_mode(model):
        operator = HessianOperator(GradientComputer(tracked, objective), data, tracked.flat(),
                                   0.0, chunk_size)
        return operator.dense()


def train_steps(model: nn.Module, objective: Objective, train: Any, steps: int,
                params: Sequence[str] | str | None = None,
                optimizer: Literal["adam", "sgd"] = "adam",
                lr: float = 1e-3, batch_size: int = 128, seed: int = 0) -> FitReport:
    """Run ``steps`` mini-batch steps on R (with its L2 term), in training mode.

    Batches are drawn by reshuffling the data every epoch. ``seed`` seeds both the batch order and
    everything random inside the model (dropout), in a forked generator that leaves the caller's
    random state alone: the same seed gives the same steps.
    """
    steps = arguments.integer("steps", steps, minimum=0)
    batch_size = arguments.positive_integer("batch_size", batch_size)
    lr = arguments.positive("lr", lr)
    seed = arguments.seed("seed", seed)
    arguments.choice("optimizer", optimizer, ("adam", "sgd"))
    data = ExampleSet(train, "training data")
    tracked = TrackedParameters(model, params)
    decay = objective.decay_vector(tracked.named_tensors(),
                                           tracked.all_names())
    leaf = tracked.flat().clone().requires_grad_(True)
    opt: torch.optim.Optimizer = (torch.optim.Adam([leaf], lr=lr) if optimizer == "adam"
                                  else torch.optim.SGD([leaf], lr=lr))
    generator = torch.Generator().manual_seed(seed)
    n = len(data)
    b = min(batch_size, n)
    order = torch.randperm(n, generator=generator)
    position = 0
    was_training = model.training
    model.train()
    try:
        with seeded(seed, [tracked.device]):  # dropout draws from the (forked) global RNG
            for _ in range(steps):
                if position + b > n:
                    order, position = torch.randperm(n, generator=generator), 0
                X, y = data.take(order[position : position + b], tracked.device, tracked.dtype)
                position += b
                opt.zero_grad()
                loss = objective.train_loss(tracked.forward(leaf, X), y).mean()
                (loss + objective.regularizer(leaf, decay)).backward()
                opt.step()
    finally:
        model.train(was_training)
    tracked.assign(leaf.detach())
    with evaluation_mode(model):
        value, gradient = objective_and_gradient(tracked, objective, data, leaf.detach())
    return FitReport(float(value), float(gradient.norm()), steps, None)
