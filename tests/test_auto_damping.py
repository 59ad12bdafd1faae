"""Networks work from the README's first example: damping="auto" picks λ_d from the spectrum the
solver estimates anyway, says why, and keeps convex models exact; long steps show progress."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.damping import RELATIVE_FLOOR

from conftest import Problem, _classification_data, relative_error


def _adam_trained_network() -> Problem:
    """A tanh MLP after a few hundred Adam steps: its Hessian is indefinite."""
    X, y = _classification_data(66, 4, 3, seed=11)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    objective = ik.CrossEntropyObjective(weight_decay=1e-3)
    ik.training.train_steps(model, objective, (X[:60], y[:60]), steps=300, lr=0.02,
                            batch_size=20)
    problem = Problem(model, objective, X[:60], y[:60], X[60:], y[60:],
                      [n for n, _ in model.named_parameters()])
    assert float(torch.linalg.eigvalsh(problem.dense_hessian())[0]) < 0
    return problem


def test_the_default_works_on_a_trained_network_and_reports_its_choice() -> None:
    problem = _adam_trained_network()
    eigenvalues = torch.linalg.eigvalsh(problem.dense_hessian())
    with pytest.raises(ik.IndefiniteHessianError):  # what the default used to do
        ik.Influence(problem.model, problem.objective, problem.train,
                     damping=0.0).fit().influence(problem.test)
    inf = ik.Influence(problem.model, problem.objective, problem.train).fit()  # solver="cg"
    scores = inf.influence(problem.test)
    report = inf.last_solve_report
    assert inf.damping_ > -float(eigenvalues[0])  # positive definite after damping
    assert "indefinite" in inf.damping_reason_ and "Lanczos" in inf.damping_reason_
    assert report.damping == inf.damping_ and report.converged is True
    assert relative_error(scores, problem.reference_influence(inf.damping_)) < 1e-7


def test_direct_chooses_from_its_exact_spectrum() -> None:
    problem = _adam_trained_network()
    eigenvalues = torch.linalg.eigvalsh(problem.dense_hessian())
    low, high = float(eigenvalues[0]), float(eigenvalues[-1])
    inf = ik.Influence(problem.model, problem.objective, problem.train, solver="direct").fit()
    rule = RELATIVE_FLOOR[torch.float64] * high + 3 * max(-low, 0.0)
    assert rule <= inf.damping_ <= rule * 1.1  # rounded up to two significant digits
    assert "eigendecomposition" in inf.damping_reason_
    assert inf.last_solve_report is None
    scores = inf.influence(problem.test)
    assert inf.last_solve_report.min_eigenvalue == pytest.approx(low + inf.damping_, rel=1e-8)
    assert relative_error(scores, problem.reference_influence(inf.damping_)) < 1e-9


@pytest.mark.parametrize("solver", ["direct", "cg", "lissa", "ekfac", "arnoldi"])
def test_a_convex_model_keeps_the_exact_influence(logreg: Problem, solver: str) -> None:
    inf = ik.Influence(logreg.model, logreg.objective, logreg.train, solver=solver).fit()
    assert inf.damping_ == 0.0 and "no damping needed" in inf.damping_reason_
    if solver in ("direct", "cg"):
        assert relative_error(inf.influence(logreg.test), logreg.reference_influence()) < 1e-8


def test_an_explicit_damping_is_used_as_given(logreg: Problem) -> None:
    inf = ik.Influence(logreg.model, logreg.objective, logreg.train, damping=0.25).fit()
    assert inf.damping_ == 0.25 and inf.damping_reason_ == "damping 0.25 as given"


@pytest.mark.parametrize(("solver", "bar"), [
    ("cg", "block CG iterations"), (ik.CG(block=False), "CG iterations"),
    (ik.LiSSA(depth=20), "LiSSA steps"), ("ekfac", "Kronecker factors"),
    ("arnoldi", "Krylov vectors"), (ik.Deflated(rank=3, iterations=10), "Krylov vectors")])
def test_progress_shows_every_long_step(mlp: Problem, capsys: pytest.CaptureFixture,
                                        solver: object, bar: str) -> None:
    inf = ik.Influence(mlp.model, mlp.objective, mlp.train, solver=solver, damping=0.01,
                       progress=True).fit()
    inf.influence(mlp.test)
    assert bar in capsys.readouterr().err
    quiet = ik.Influence(mlp.model, mlp.objective, mlp.train, solver=solver, damping=0.01).fit()
    quiet.influence(mlp.test)
    assert bar not in capsys.readouterr().err


def test_minimize_shows_progress_and_logs_its_figures(logreg: Problem,
                                                      capsys: pytest.CaptureFixture,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Linear(5, 3, bias=False).double()
    with caplog.at_level(logging.INFO, logger="influencekit.training"):
        report = ik.training.minimize(model, logreg.objective, logreg.train, tol=1e-10,
                                      progress=True)
    assert "minimize (newton)" in capsys.readouterr().err
    assert f"‖∇R‖ = {report.gradient_norm:.3g}" in caplog.text and "converged" in caplog.text


def test_solver_figures_are_logged(mlp: Problem, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="influencekit"):
        inf = ik.Influence(mlp.model, mlp.objective, mlp.train, damping=0.01).fit()
        inf.influence(mlp.test)
    report = inf.last_solve_report
    assert f"{report.iterations} iterations" in caplog.text
    assert f"recomputed residual {report.relative_residual:.2e}" in caplog.text
    assert not math.isnan(report.relative_residual)


def test_a_rank_deficient_gauss_newton_matrix_without_weight_decay_gets_damping() -> None:
    """p = 115 parameters, 12 examples × 3 outputs: G has rank ≤ 36. Lanczos cannot see its zero
    eigenvalues; the rule decides on the proven bound λ_min ≥ λ = 0 instead."""
    X, y = _classification_data(12, 4, 3, seed=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    inf = ik.Influence(model, ik.CrossEntropyObjective(), (X, y), curvature="gauss-newton",
                       stationarity_tol=None).fit()
    assert inf.damping_ > 0 and "only known to be ≥ 0" in inf.damping_reason_
    inf.influence((X[:2], y[:2]))
    assert inf.last_solve_report.converged is True
    decayed = ik.Influence(model, ik.CrossEntropyObjective(weight_decay=0.1), (X, y),
                           curvature="gauss-newton", stationarity_tol=None).fit()
    assert decayed.damping_ == 0.0 and "(the weight decay" in decayed.damping_reason_


def test_lissas_own_damping_is_part_of_the_reported_damping(logreg: Problem) -> None:
    solver = ik.LiSSA(depth=300, batch_size=1000, damping=0.01)
    inf = ik.Influence(logreg.model, logreg.objective, logreg.train, solver=solver,
                       damping=0.02).fit()
    extra = inf.solver.scale_ * 0.01
    assert inf.damping_ == pytest.approx(0.02 + extra)
    assert "LiSSA's own damping adds" in inf.damping_reason_
    inf.influence(logreg.test)
    assert inf.last_solve_report.damping == pytest.approx(inf.damping_)
