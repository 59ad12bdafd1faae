"""Solve reports claim nothing that was not checked; guards where the mathematics needs them."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.training import minimize

from conftest import Problem, make_logreg, make_operator

APPROXIMATIONS = [ik.KFAC(), ik.EKFAC(), ik.Arnoldi(rank=10), ik.Deflated(rank=5, iterations=20)]


def _rhs(problem: Problem, k: int = 3) -> torch.Tensor:
    return torch.randn(k, problem.theta().numel(), dtype=torch.float64,
                       generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("solver", APPROXIMATIONS, ids=lambda s: s.name)
def test_approximations_say_so_unless_a_residual_was_measured(mlp: Problem,
                                                              solver: ik.solvers.Solver) -> None:
    op = make_operator(mlp, damping=0.01)
    A = mlp.dense_hessian(0.01)
    V = _rhs(mlp)
    unverified = make_solver_copy(solver)
    X = unverified.prepare(op).solve(V)
    report = unverified.last_report
    assert report.exact is False and report.converged is None
    assert math.isnan(report.relative_residual)
    assert "not measured" in str(report)
    verified = make_solver_copy(solver, verify=True, tol=1e-3)
    X = verified.prepare(op).solve(V)
    dense = float(((X @ A - V).norm(dim=1) / V.norm(dim=1)).max())
    report = verified.last_report
    assert report.relative_residual == pytest.approx(dense, rel=1e-6)
    assert report.exact is False and report.converged is (dense <= 1e-3)


def make_solver_copy(solver: ik.solvers.Solver, **settings: object) -> ik.solvers.Solver:
    copy = solver.unprepared_copy()
    for name, value in settings.items():
        setattr(copy, name, value)
    return copy


def test_kfac_under_the_hessian_reports_that_it_approximates_the_gauss_newton(
        mlp: Problem) -> None:
    inf = ik.Influence(mlp.model, mlp.objective, mlp.train, solver="ekfac", damping=0.01).fit()
    inf.influence(mlp.test)
    report = inf.last_solve_report
    assert inf.operator_.curvature == "hessian"
    assert report.curvature == "gauss-newton"
    assert any("gauss-newton matrix, not the hessian" in note for note in report.notes)
    exact = ik.Influence(mlp.model, mlp.objective, mlp.train, solver="cg", damping=0.01,
                         curvature="gauss-newton").fit()
    exact.influence(mlp.test)
    assert exact.last_solve_report.curvature == "gauss-newton"
    assert exact.last_solve_report.notes == ()


def test_direct_measures_its_residual_against_the_curvature_products(logreg: Problem) -> None:
    """A decomposition that no longer matches A (here: eigenvalues off by 10%) shows in the
    residual, which was computed from the decomposition itself before."""
    solver = ik.Direct().prepare(make_operator(logreg, damping=0.01))
    V = _rhs(logreg)
    solver.solve(V)
    assert solver.last_report.relative_residual < 1e-12 and solver.last_report.converged
    solver.eigenvalues_ = solver.eigenvalues_ * 1.1
    with pytest.warns(ik.ConvergenceWarning, match="relative residual"):
        X = solver.solve(V)
    A = logreg.dense_hessian(0.01)
    dense = float(((X @ A - V).norm(dim=1) / V.norm(dim=1)).max())
    assert dense > 0.05
    assert solver.last_report.relative_residual == pytest.approx(dense, rel=1e-6)
    assert solver.last_report.converged is False


def _ill_conditioned_float32() -> Problem:
    """Softmax regression in float32 with weak weight decay: condition number ~1e5."""
    problem = make_logreg(n=200, d=12, classes=4, weight_decay=1e-5, seed=3)
    model = problem.model.float()
    objective = ik.CrossEntropyObjective(weight_decay=1e-5)
    return Problem(model, objective, problem.X.float(), problem.y, problem.X_test.float(),
                   problem.y_test, problem.names)


def test_cg_judges_convergence_on_the_recomputed_residual() -> None:
    problem = _ill_conditioned_float32()
    solver = ik.CG(tol=1e-6, max_iter=500)
    V = torch.randn(4, problem.theta().numel(), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solver.prepare(make_operator(problem)).solve(V)
    report = solver.last_report
    recurrence = report.details["recurrence_residual"]
    assert recurrence <= 1e-6 < report.relative_residual  # the recurrence drifted from the truth
    assert report.converged is False
    assert any("recomputed relative residual" in str(w.message) for w in caught)
    unverified = ik.CG(tol=1e-6, max_iter=500, verify=False)
    unverified.prepare(make_operator(problem)).solve(V)
    assert unverified.last_report.converged is None
    assert math.isnan(unverified.last_report.relative_residual)


@pytest.mark.parametrize("solver", ["direct", "cg", "lissa", "kfac", "ekfac", "arnoldi",
                                    "deflated"])
def test_every_solver_output_is_checked_for_nan(logreg: Problem, solver: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    prepared = ik.solvers.make_solver(solver).prepare(make_operator(logreg, damping=0.01))
    original = prepared.operator.matvec
    if solver in ("cg", "lissa"):  # iterative: poison the curvature products after preparing
        monkeypatch.setattr(prepared.operator, "matvec",
                            lambda V: original(V) * float("nan"))
    else:
        monkeypatch.setattr(prepared, "_apply", lambda V, *a: V * float("nan"))
    with pytest.raises(ik.SolverDivergedError, match="NaN"):
        prepared.solve(_rhs(logreg))


# ------------------------------------------------------------------ guards


def _dead_input_logreg() -> Problem:
    """Softmax regression without weight decay whose last input feature is always 0: K-FAC's
    activation factor has a zero eigenvalue, so without damping its inverse is infinite."""
    problem = make_logreg(n=60, d=5, classes=3, weight_decay=0.05)
    X, X_test = problem.X.clone(), problem.X_test.clone()
    X[:, -1] = 0.0
    X_test[:, -1] = 0.0
    model = nn.Linear(5, 3, bias=False).double()
    model.load_state_dict(problem.model.state_dict())
    minimize(model, ik.CrossEntropyObjective(weight_decay=0.05), (X, problem.y), tol=1e-12)
    return Problem(model, ik.CrossEntropyObjective(), X, problem.y, X_test, problem.y_test,
                   ["weight"])


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_kronecker_factors_without_weight_decay_or_damping_are_refused(solver: str) -> None:
    problem = _dead_input_logreg()
    with pytest.raises(ik.IndefiniteHessianError, match=r"singular.*Set damping > 0"):
        ik.Influence(problem.model, problem.objective, problem.train, solver=solver,
                     damping=0.0, stationarity_tol=None).fit()
    auto = ik.Influence(problem.model, problem.objective, problem.train, solver=solver,
                        stationarity_tol=None).fit()
    assert auto.damping_ > 0 and "damping" in auto.damping_reason_
    assert bool(torch.isfinite(auto.influence(problem.test)).all())


def _saddle() -> Problem:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(30, 3, dtype=torch.float64)
    y = torch.randint(3, (30,))
    problem = Problem(model, ik.CrossEntropyObjective(), X, y, X[:2], y[:2],
                      [n for n, _ in model.named_parameters()])
    assert float(torch.linalg.eigvalsh(problem.dense_hessian())[0]) < 0
    return problem


def test_arnoldi_refuses_non_positive_ritz_values() -> None:
    problem = _saddle()
    p = problem.theta().numel()
    with pytest.raises(ik.IndefiniteHessianError, match=r"Ritz value .*Raise damping"):
        ik.Arnoldi(rank=p, iterations=p).prepare(make_operator(problem))


def test_deflated_refuses_an_indefinite_curvature_instead_of_dropping_its_ritz_values() -> None:
    problem = _saddle()
    with pytest.raises(ik.IndefiniteHessianError, match="indefinite or singular"):
        ik.Deflated(base="ekfac", rank=5, iterations=30).prepare(
            make_operator(problem, damping=1e-3))


def test_deflated_refuses_a_singular_base(mlp: Problem) -> None:
    """Arnoldi without its remainder is singular off its 3 kept directions."""
    base = ik.Arnoldi(rank=3, remainder="none")
    with pytest.raises(ik.IndefiniteHessianError, match="indefinite or singular"):
        ik.Deflated(base=base, rank=5, iterations=20).prepare(make_operator(mlp, damping=0.01))


def test_unverified_cg_that_stopped_early_is_reported_as_not_converged(mlp: Problem) -> None:
    solver = ik.CG(tol=1e-12, max_iter=2, verify=False)
    with pytest.warns(ik.ConvergenceWarning, match=r"max_iter=2 with relative residual \d"):
        solver.prepare(make_operator(mlp, damping=0.01)).solve(_rhs(mlp))
    report = solver.last_report
    assert report.converged is False and math.isnan(report.relative_residual)
    assert report.details["recurrence_residual"] > 1e-12


def test_a_verified_approximation_worse_than_zero_warns(mlp: Problem) -> None:
    """An Arnoldi inverse of an indefinite Hessian whose kept Ritz values are all positive: the
    guard cannot see it, the measured residual can."""
    problem = _saddle()
    solver = ik.Arnoldi(rank=10, remainder="trace", verify=True)
    with pytest.warns(ik.ConvergenceWarning, match="worse than x = 0"):
        solver.prepare(make_operator(problem)).solve(_rhs(problem))
    assert solver.last_report.relative_residual > 1


def test_self_influence_reports_every_block_it_solved(mlp: Problem) -> None:
    inf = ik.Influence(mlp.model, mlp.objective, mlp.train, solver=ik.CG(tol=1e-12),
                       damping=0.01, chunk_size=7).fit()
    inf.self_influence()
    report = inf.last_solve_report
    assert report.details["solves"] == 6  # 40 points in blocks of 7
    assert report.converged is True and report.relative_residual <= 1e-12
