"""Tiny problems and independent references (dense float64 Hessians, not via influencekit)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import influencekit as ik
from influencekit.curvature import HessianOperator
from influencekit.data import ExampleSet
from influencekit.gradients import GradientComputer
from influencekit.parameters import TrackedParameters
from influencekit.training import minimize

import jobs


@dataclass
class Problem:
    """A trained tiny model with its data and an independent flat-θ view of its objective."""

    model: nn.Module
    objective: ik.Objective
    X: Tensor
    y: Tensor
    X_test: Tensor
    y_test: Tensor
    names: list[str]

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        return self.X, self.y

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        return self.X_test, self.y_test

    def theta(self) -> Tensor:
        named = dict(self.model.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.names])

    def params_of(self, theta: Tensor) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        out, offset = {}, 0
        for n in self.names:
            size = named[n].numel()
            out[n] = theta[offset : offset + size].reshape(named[n].shape)
            offset += size
        return out

    def outputs(self, theta: Tensor, X: Tensor) -> Tensor:
        return functional_call(self.model, self.params_of(theta), (X,))

    def decay(self) -> float | Tensor:
        """λ per coordinate of θ (a float when uniform), from the objective's own rule."""
        named = dict(self.model.named_parameters())
        return self.objective.decay_vector([(n, named[n]) for n in self.names])

    def risk(self) -> Callable[[Tensor], Tensor]:
        """R(θ) = mean ℓ + (1/2)Σ λ_j θ_j² over the training set, as a function of flat θ."""
        wd = self.decay()

        def risk(theta: Tensor) -> Tensor:
            losses = self.objective.train_loss(self.outputs(theta, self.X), self.y)
            return losses.mean() + 0.5 * (wd * theta.pow(2)).sum()

        return risk

    def dense_hessian(self, damping: float = 0.0) -> Tensor:
        H = torch.func.hessian(self.risk())(self.theta())
        return H + damping * torch.eye(H.shape[0], dtype=H.dtype)

    def train_grad(self, i: int) -> Tensor:
        """∇_θ L(z_i) by plain autograd (regulariser included)."""
        theta = self.theta().requires_grad_(True)
        loss = self.objective.train_loss(self.outputs(theta, self.X[i : i + 1]), self.y[i : i + 1])
        loss = loss.sum() + 0.5 * (self.decay() * theta.pow(2)).sum()
        return torch.autograd.grad(loss, theta)[0]

    def test_grad(self, X: Tensor, y: Tensor) -> Tensor:
        theta = self.theta().requires_grad_(True)
        loss = self.objective.test_loss(self.outputs(theta, X[None]), y[None]).sum()
        return torch.autograd.grad(loss, theta)[0]

    def reference_perturbation(self, train_indices: list[int], damping: float = 0.0) -> Tensor:
        """(m, k, *x) I_pert,loss by double backward through the dense-Hessian solve."""
        H = self.dense_hessian(damping)
        rows = []
        for xt, yt in zip(self.X_test, self.y_test, strict=True):
            s_test = torch.linalg.solve(H, self.test_grad(xt, yt))
            row = []
            for i in train_indices:
                x = self.X[i].clone().requires_grad_(True)
                theta = self.theta().requires_grad_(True)
                loss = self.objective.train_loss(self.outputs(theta, x[None]),
                                                 self.y[i : i + 1]).sum()
                (g,) = torch.autograd.grad(loss, theta, create_graph=True)
                row.append(torch.autograd.grad(-(s_test @ g), x)[0])
            rows.append(torch.stack(row))
        return torch.stack(rows)

    def reference_influence(self, damping: float = 0.0) -> Tensor:
        """(m, n) I_up,loss from the dense Hessian and autograd gradients."""
        return self._influence_through(self.dense_hessian(damping))

    def reference_gauss_newton_influence(self, damping: float = 0.0) -> Tensor:
        """(m, n) I_up,loss from the dense damped Gauss-Newton matrix and autograd gradients."""
        return self._influence_through(dense_gauss_newton(self, damping))

    def _influence_through(self, A: Tensor) -> Tensor:
        """−∇L_test A⁻¹ ∇L_trainᵀ, (m, n), with every gradient by plain autograd."""
        G_train = torch.stack([self.train_grad(i) for i in range(self.X.shape[0])])
        pairs = zip(self.X_test, self.y_test, strict=True)
        G_test = torch.stack([self.test_grad(x, t) for x, t in pairs])
        return -G_test @ torch.linalg.solve(A, G_train.T)


def _classification_data(n: int, d: int, classes: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(classes, d, generator=g, dtype=torch.float64)
    y = torch.randint(classes, (n,), generator=g)
    X = centers[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
    return X, y


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_logreg(n: int = 60, d: int = 5, classes: int = 3, weight_decay: float = 0.05,
                seed: int = 0) -> Problem:
    X, y = _classification_data(n + 10, d, classes, seed)
    torch.manual_seed(seed)
    model = nn.Linear(d, classes, bias=False).double()
    objective = ik.CrossEntropyObjective(weight_decay=weight_decay)
    minimize(model, objective, (X[:n], y[:n]), tol=1e-12)
    return Problem(model, objective, X[:n], y[:n], X[n:], y[n:], ["weight"])


def make_binary_logreg(n: int = 50, d: int = 4, weight_decay: float = 0.0,
                       seed: int = 1) -> Problem:
    X, y = _classification_data(n + 8, d, 2, seed)
    torch.manual_seed(seed)
    model = nn.Linear(d, 1, bias=False).double()
    objective = ik.BinaryLogisticObjective(weight_decay=weight_decay if weight_decay else 0.05)
    minimize(model, objective, (X[:n], y[:n]), tol=1e-12)
    return Problem(model, ik.BinaryLogisticObjective(weight_decay=weight_decay), X[:n], y[:n],
                   X[n:], y[n:], ["weight"])


def make_mlp(n: int = 40, d: int = 4, hidden: int = 5, classes: int = 3,
             weight_decay: float = 0.01, seed: int = 2) -> Problem:
    """A tanh MLP trained by Adam then polished by Newton to a strict local minimum."""
    X, y = _classification_data(n + 6, d, classes, seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double()
    objective = ik.CrossEntropyObjective(weight_decay=weight_decay)
    ik.training.train_steps(model, objective, (X[:n], y[:n]), steps=300, lr=0.05, batch_size=n)
    minimize(model, objective, (X[:n], y[:n]), tol=1e-11)
    names = [name for name, _ in model.named_parameters()]
    return Problem(model, objective, X[:n], y[:n], X[n:], y[n:], names)


@pytest.fixture(scope="session")
def logreg() -> Problem:
    return make_logreg()


@pytest.fixture(scope="session")
def binary_logreg() -> Problem:
    return make_binary_logreg()


@pytest.fixture(scope="session")
def mlp() -> Problem:
    return make_mlp()


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def pearson(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]).double())[0, 1])


def dense_gauss_newton(problem: Problem, damping: float = 0.0) -> Tensor:
    """G = (1/n) Σ J_iᵀ ∇²_f ℓ_i J_i + (λ + damping)·I from jacrev and torch.func.hessian."""
    theta = problem.theta()
    total = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for x, t in zip(problem.X, problem.y, strict=True):
        J = torch.func.jacrev(lambda th, x=x: problem.outputs(th, x[None])[0])(theta)
        out = problem.outputs(theta, x[None])[0]
        H_out = torch.func.hessian(
            lambda f, t=t: problem.objective.train_loss(f[None], t[None]).sum())(out)
        J = J.reshape(out.numel(), -1)
        total += J.T @ H_out.reshape(out.numel(), out.numel()) @ J
    shift = problem.objective.weight_decay + damping
    return total / problem.X.shape[0] + shift * torch.eye(theta.numel(), dtype=theta.dtype)


def make_operator(problem: Problem, damping: float = 0.0, chunk_size: int = 16,
                  **options: object) -> HessianOperator:
    """The library's curvature operator for a problem (options: mode, curvature, ...)."""
    tracked = TrackedParameters(problem.model)
    return HessianOperator(GradientComputer(tracked, problem.objective),
                           ExampleSet(problem.train), tracked.flat(), damping, chunk_size,
                           **options)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The job script and an uninterrupted run of it per kind."""
    folder = tmp_path_factory.mktemp("job")
    script = folder / "job.py"
    script.write_text(jobs.SCRIPT)
    references = {}
    for kind in ("loo_change", "self_influence", "index"):
        references[kind] = folder / kind
        assert jobs._run(script, references[kind], kind) == 0
    return script, references


