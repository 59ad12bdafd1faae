"""Attention models with every solver: nn.TransformerEncoderLayer and nn.MultiheadAttention.

Two things break naive influence code on these models. PyTorch's fused attention kernels have
no second derivative, so Hessian-vector products fail unless the math kernel is used; and
nn.MultiheadAttention uses its ``out_proj`` weight through ``F.linear`` without calling the
module, so hooks on it see nothing and layer-structured methods (K-FAC, layer scoring, Kronecker
projections) would drop that weight's share silently. The references here are dense float64
matrices built with ``torch.func`` independently of the library.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import influencekit as ik

from conftest import Problem, dense_gauss_newton, relative_error

DAMPING = 0.05


class Classifier(nn.Module):
    """Tokens (B, T, 3) → a linear embedding → attention → mean over T → 3 classes."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Linear(3, 8)
        if kind == "encoder":
            self.body = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                                   batch_first=True)
        else:
            self.body = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h = self.body(h) if self.kind == "encoder" else self.body(h, h, h, need_weights=False)[0]
        return self.head(h.mean(dim=1))


def _problem(kind: str) -> Problem:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 5, 3, generator=g, dtype=torch.float64)
    y = (X[:, :, 0].sum(dim=1) > 0).long() + (X[:, 0, 1] > 1).long()
    torch.manual_seed(0)
    model = Classifier(kind).double()
    objective = ik.CrossEntropyObjective(weight_decay=0.01)
    ik.training.train_steps(model, objective, (X[:24], y[:24]), steps=100, lr=0.01,
                            batch_size=24)
    model.eval()
    return Problem(model, objective, X[:24], y[:24], X[24:], y[24:],
                   [name for name, _ in model.named_parameters()])


@pytest.fixture(scope="module", params=["encoder", "attention"])
def problem(request: pytest.FixtureRequest) -> Problem:
    return _problem(request.param)


def _reference(problem: Problem) -> Tensor:
    """I_up,loss from the dense damped Gauss-Newton matrix, (m, n), float64."""
    with sdpa_kernel(SDPBackend.MATH):
        return problem.reference_gauss_newton_influence(DAMPING)


def _influence(problem: Problem, solver: object, **options: object) -> ik.Influence:
    return ik.Influence(problem.model, problem.objective, problem.train, solver=solver,
                        damping=DAMPING, curvature="gauss-newton", stationarity_tol=None,
                        **options).fit()


SOLVERS = {
    "direct": lambda: ik.solvers.Direct(),
    "cg": lambda: ik.CG(tol=1e-10),
    "cg+ekfac": lambda: ik.CG(tol=1e-10, preconditioner="ekfac"),
    "lissa": lambda: ik.solvers.LiSSA(depth=200, repeats=1, batch_size=24,
                                      preconditioner="ekfac"),
    "kfac": lambda: ik.solvers.KFAC(),
    "ekfac": lambda: ik.solvers.EKFAC(samples=2),
    "arnoldi": lambda: ik.solvers.Arnoldi(rank=20),
    "deflated": lambda: ik.solvers.Deflated(rank=10, iterations=30),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_every_solver_runs_and_the_exact_ones_equal_the_dense_reference(
        problem: Problem, name: str) -> None:
    inf = _influence(problem, SOLVERS[name]())
    with warnings.catch_warnings():  # LiSSA's 200 steps do not reach its tol here; it says so
        warnings.simplefilter("ignore", ik.ConvergenceWarning)
        scores = inf.influence(problem.test)
    reference = _reference(problem)
    report = inf.last_solve_report
    assert bool(torch.isfinite(scores).all())
    if name in ("direct", "cg", "cg+ekfac"):
        assert relative_error(scores, reference) < 1e-7
    else:  # approximations: finite, reported as such, and correlated with the exact scores
        if name == "lissa":
            assert report.converged == (report.relative_residual <= 0.05)
        else:
            assert report.exact is False
        correlation = torch.corrcoef(torch.stack([scores.flatten(), reference.flatten()]))[0, 1]
        assert float(correlation) > 0.5


def test_hessian_vector_products_through_attention_equal_the_dense_hessian(
        problem: Problem) -> None:
    """The fused attention kernels have no double backward; the library's passes use math.

    The reference is classic autograd's double backward, one row at a time. Not
    ``torch.func.hessian``: in torch 2.13 on the CPU it returns a wrong, asymmetric Hessian
    through ``F.layer_norm`` with an affine weight (off by 1.8 on a 12-parameter example, where
    finite differences and double backward agree to 1e-9), which would make this test fail
    for the reference's sake. The library's products agree with double backward to 1e-14.
    """
    inf = ik.Influence(problem.model, problem.objective, problem.train, solver="cg",
                       damping=0.0, curvature="hessian", stationarity_tol=None).fit()
    theta = problem.theta().clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        losses = problem.objective.train_loss(problem.outputs(theta, problem.X), problem.y)
        objective = losses.mean() + 0.5 * problem.objective.weight_decay * theta.pow(2).sum()
        gradient, = torch.autograd.grad(objective, theta, create_graph=True)
        V = torch.randn(3, theta.numel(), generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
        reference = torch.stack([torch.autograd.grad(gradient, theta, v, retain_graph=True)[0]
                                 for v in V])
    torch.testing.assert_close(inf.operator_.matvec(V), reference, rtol=1e-9, atol=1e-11)


def test_multihead_attention_out_proj_is_treated_as_another_parameter(
        problem: Problem) -> None:
    """Its weight is used through F.linear, never by calling the module: K-FAC gives it the
    exact Gauss-Newton diagonal instead of a Kronecker block of zeros."""
    inf = _influence(problem, "kfac")
    out_proj = "body.self_attn.out_proj" if problem.model.kind == "encoder" else "body.out_proj"
    assert inf.tracked_.indirect_layers == {out_proj}
    solver = inf.solver
    assert out_proj not in {block.name for block in solver.blocks_}
    names = problem.names
    start = sum(p.numel() for n, p in problem.model.named_parameters()
                if names.index(n) < names.index(f"{out_proj}.weight"))
    size = problem.model.get_submodule(out_proj).weight.numel()
    with sdpa_kernel(SDPBackend.MATH):
        G = dense_gauss_newton(problem, 0.0)
    exact = G.diagonal() - problem.objective.weight_decay
    position = {int(i): k for k, i in enumerate(solver.fallback_)}
    for index in range(start, start + size):
        assert float(solver.fallback_diagonal_[position[index]]) == pytest.approx(
            float(exact[index]), rel=1e-9, abs=1e-12)


def test_layer_scoring_equals_per_example_gradients(problem: Problem) -> None:
    layers = _influence(problem, "ekfac", scoring="layers")
    gradients = _influence(problem, "ekfac", scoring="gradients")
    assert relative_error(layers.influence(problem.test),
                          gradients.influence(problem.test)) < 1e-10
