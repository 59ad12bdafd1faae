"""Every solver against a dense float64 solve; their diagnostics on bad problems."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.solvers import make_solver

from conftest import Problem, make_logreg, make_operator, pearson, relative_error


@pytest.mark.parametrize("name", ["logreg", "mlp"])
@pytest.mark.parametrize("solver", [ik.Direct(), ik.CG(tol=1e-13)])
def test_exact_solvers_match_a_dense_solve(name: str, solver: ik.solvers.Solver,
                                           request: pytest.FixtureRequest) -> None:
    problem: Problem = request.getfixturevalue(name)
    A = problem.dense_hessian(damping=0.001)
    V = torch.randn(5, A.shape[0], dtype=torch.float64)
    X = solver.prepare(make_operator(problem, damping=0.001)).solve(V)
    assert relative_error(X, torch.linalg.solve(A, V.T).T) < 1e-9
    report = solver.last_report
    assert report is not None and report.relative_residual < 1e-10 and report.converged


def test_direct_reports_the_extreme_eigenvalues(logreg: Problem) -> None:
    solver = ik.Direct().prepare(make_operator(logreg, damping=0.5))
    solver.solve(torch.ones(logreg.theta().numel(), dtype=torch.float64))
    eigenvalues = torch.linalg.eigvalsh(logreg.dense_hessian(0.5))
    assert solver.last_report.min_eigenvalue == pytest.approx(float(eigenvalues[0]), rel=1e-10)
    assert solver.last_report.max_eigenvalue == pytest.approx(float(eigenvalues[-1]), rel=1e-10)
    assert solver.last_report.damping == 0.5


def _saddle_problem() -> Problem:
    """An MLP at random initial weights: its Hessian has negative eigenvalues."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(30, 3, dtype=torch.float64)
    y = torch.randint(3, (30,))
    problem = Problem(model, ik.CrossEntropyObjective(), X, y, X[:2], y[:2],
                      [n for n, _ in model.named_parameters()])
    assert float(torch.linalg.eigvalsh(problem.dense_hessian())[0]) < 0
    return problem


def test_direct_refuses_an_indefinite_hessian_and_suggests_damping() -> None:
    with pytest.raises(ik.IndefiniteHessianError, match=r"not positive definite.*damping=\d"):
        ik.Direct().prepare(make_operator(_saddle_problem()))


def test_cg_refuses_negative_curvature() -> None:
    op = make_operator(_saddle_problem())
    V = torch.randn(8, op.dim, dtype=torch.float64)
    with pytest.raises(ik.IndefiniteHessianError, match="Increase damping"):
        ik.CG().prepare(op).solve(V)


def test_cg_warns_when_it_stops_before_its_tolerance(mlp: Problem) -> None:
    solver = ik.CG(tol=1e-12, max_iter=2).prepare(make_operator(mlp))
    with pytest.warns(ik.ConvergenceWarning, match="max_iter=2"):
        solver.solve(torch.randn(3, mlp.theta().numel(), dtype=torch.float64))
    assert not solver.last_report.converged
    assert solver.last_report.iterations == 2
    assert solver.last_report.relative_residual > 1e-12


def test_cg_block_solves_right_hand_sides_independently(logreg: Problem) -> None:
    solver = ik.CG(tol=1e-12).prepare(make_operator(logreg))
    V = torch.randn(6, logreg.theta().numel(), dtype=torch.float64)
    V[2] = 0.0
    block = solver.solve(V)
    torch.testing.assert_close(block[2], torch.zeros_like(V[2]))
    torch.testing.assert_close(block[4], solver.solve(V[4]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_lissa_with_default_settings_agrees_with_the_dense_solve(
        name: str, request: pytest.FixtureRequest) -> None:
    problem: Problem = request.getfixturevalue(name)
    damping = 0.01 if name == "mlp" else 0.0
    inf = ik.Influence(problem.model, problem.objective, problem.train, solver="lissa",
                       damping=damping).fit()
    estimate = inf.influence(problem.test)
    reference = problem.reference_influence(damping)
    for row, ref in zip(estimate, reference, strict=True):
        assert pearson(row, ref) >= 0.99


def test_lissa_is_deterministic_given_its_seed(logreg: Problem) -> None:
    V = torch.randn(2, logreg.theta().numel(), dtype=torch.float64)
    op = make_operator(logreg)
    # mini-batches smaller than the 60 training points, so the seed picks which are sampled
    first = ik.LiSSA(depth=200, seed=5, batch_size=16).prepare(op).solve(V)
    second = ik.LiSSA(depth=200, seed=5, batch_size=16).prepare(op).solve(V)
    third = ik.LiSSA(depth=200, seed=6, batch_size=16).prepare(op).solve(V)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.equal(first, third)


def test_lissa_with_too_small_a_scale_diverges_with_advice() -> None:
    problem = make_logreg(weight_decay=0.05)
    solver = ik.LiSSA(scale=0.01, depth=500).prepare(make_operator(problem))
    with pytest.raises(ik.SolverDivergedError, match=r"increase scale \(now 0.01"):
        solver.solve(torch.randn(2, problem.theta().numel(), dtype=torch.float64))


def test_lissa_paper_damping_adds_scale_times_d(logreg: Problem) -> None:
    solver = ik.LiSSA(scale=10.0, depth=1200, damping=0.01, batch_size=1000, tail=0.0)
    V = torch.randn(2, logreg.theta().numel(), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ik.ConvergenceWarning)
        X = solver.prepare(make_operator(logreg)).solve(V)
    expected = torch.linalg.solve(logreg.dense_hessian(damping=10.0 * 0.01), V.T).T
    assert relative_error(X, expected) < 1e-6
    assert solver.last_report.damping == pytest.approx(0.1)


def test_lissa_tail_average_and_paper_last_iterate_share_the_fixed_point(logreg: Problem) -> None:
    V = torch.randn(1, logreg.theta().numel(), dtype=torch.float64)
    expected = torch.linalg.solve(logreg.dense_hessian(), V.T).T
    op = make_operator(logreg)
    for tail in (0.0, 0.5):  # full batches: the recursion is deterministic
        X = ik.LiSSA(depth=1000, batch_size=1000, tail=tail).prepare(op).solve(V)
        assert relative_error(X, expected) < 1e-6


def test_unknown_solver_name_lists_the_known_ones() -> None:
    with pytest.raises(ik.UnknownSolverError, match=r"Unknown solver 'newton'.*'cg'"):
        make_solver("newton")


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: ik.CG(tol=0), "tol must be a finite number > 0"),
        (lambda: ik.CG(max_iter=0), "max_iter must be a positive integer"),
        (lambda: ik.CG(truncate=1.5), "truncate must be a finite number ≥ 0 and ≤ 1"),
        (lambda: ik.LiSSA(scale=-1), "scale must be a finite number > 0"),
        (lambda: ik.LiSSA(depth=0), "depth must be a positive integer"),
        (lambda: ik.LiSSA(damping=1.5), r"recursion's d, in \[0, 1\)\) must be .* < 1"),
        (lambda: ik.LiSSA(tail=1.5), r"tail .* must be a finite number ≥ 0 and ≤ 1"),
    ],
)
def test_solver_settings_are_checked_at_construction(factory: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()  # type: ignore[operator]


def test_solver_must_be_prepared_before_solving() -> None:
    with pytest.raises(ik.NotFittedError, match="not prepared"):
        ik.CG().solve(torch.ones(3))


@pytest.mark.parametrize("block", [True, False])
def test_block_and_independent_cg_both_match_the_dense_solve(mlp: Problem, block: bool) -> None:
    A = mlp.dense_hessian(damping=0.01)
    V = torch.randn(7, A.shape[0], dtype=torch.float64)
    X = ik.CG(tol=1e-12, block=block).prepare(make_operator(mlp, damping=0.01)).solve(V)
    assert relative_error(X, torch.linalg.solve(A, V.T).T) < 1e-9


def test_block_cg_shares_its_krylov_space_and_needs_fewer_iterations() -> None:
    problem = make_logreg(n=200, d=12, classes=4, weight_decay=1e-3)
    op = make_operator(problem)
    V = torch.randn(12, op.dim, dtype=torch.float64)
    block, independent = ik.CG(tol=1e-10, block=True), ik.CG(tol=1e-10, block=False)
    torch.testing.assert_close(block.prepare(op).solve(V), independent.prepare(op).solve(V),
                               rtol=1e-7, atol=1e-9)
    assert block.last_report.iterations * 3 <= independent.last_report.iterations


def test_block_cg_searches_only_the_residual_directions_that_matter() -> None:
    """20 right-hand sides sharing 3 directions plus independent parts 1e-6 their size: at
    tol 1e-4 those parts never need searching. truncate=0.3 leaves them out, every column still
    meets tol (checked against the dense matrix), and the products drop fourfold."""
    problem = make_logreg(n=300, d=40, classes=5, weight_decay=1e-3)
    op, A = make_operator(problem), problem.dense_hessian()
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(3, op.dim, generator=generator, dtype=torch.float64)
    V = (torch.randn(20, 3, generator=generator, dtype=torch.float64) @ shared
         + 1e-6 * torch.randn(20, op.dim, generator=generator, dtype=torch.float64))
    products = {}
    for truncate in (0.0, 0.3):
        solver = ik.CG(tol=1e-4, truncate=truncate).prepare(op)
        X = solver.solve(V)
        assert float(((X @ A - V).norm(dim=1) / V.norm(dim=1)).max()) <= 1e-4
        products[truncate] = solver.last_report.details["products"]
    assert products[0.3] * 4 <= products[0.0]


def test_block_cg_solves_a_tiny_right_hand_side_as_accurately_as_a_large_one(
        logreg: Problem) -> None:
    """Each column is scaled by its own norm before the search space is chosen, so a
    right-hand side 1e-12 the size of the others still meets the relative tolerance."""
    A = logreg.dense_hessian()
    V = torch.randn(4, A.shape[0], dtype=torch.float64)
    V[2] *= 1e-12
    X = ik.CG(tol=1e-8).prepare(make_operator(logreg)).solve(V)
    assert float(((X @ A - V).norm(dim=1) / V.norm(dim=1)).max()) <= 1e-8


def test_block_cg_with_dependent_right_hand_sides_does_not_break_down(logreg: Problem) -> None:
    A = logreg.dense_hessian()
    v = torch.randn(A.shape[0], dtype=torch.float64)
    V = torch.stack([v, 2 * v, -v, torch.randn_like(v)])
    X = ik.CG(tol=1e-12).prepare(make_operator(logreg)).solve(V)
    assert relative_error(X, torch.linalg.solve(A, V.T).T) < 1e-9


@pytest.mark.parametrize("block", [True, False])
def test_an_exact_preconditioner_converges_in_one_iteration(mlp: Problem, block: bool) -> None:
    V = torch.randn(3, mlp.theta().numel(), dtype=torch.float64)
    solver = ik.CG(tol=1e-10, block=block, preconditioner="direct")
    X = solver.prepare(make_operator(mlp, damping=0.01)).solve(V)
    assert solver.last_report.iterations == 1
    assert relative_error(X, torch.linalg.solve(mlp.dense_hessian(0.01), V.T).T) < 1e-9


def test_stochastic_solvers_cannot_precondition(logreg: Problem) -> None:
    with pytest.raises(TypeError, match="cannot serve as a preconditioner"):
        ik.CG(preconditioner="lissa").prepare(make_operator(logreg))


@pytest.mark.parametrize("case", ["saddle", "singular"])
def test_following_directs_damping_advice_clears_the_refusal(case: str, logreg: Problem) -> None:
    """Softmax regression without weight decay is singular (logits shifted together)."""
    problem = _saddle_problem() if case == "saddle" else Problem(
        logreg.model, ik.CrossEntropyObjective(), logreg.X, logreg.y, logreg.X_test,
        logreg.y_test, logreg.names)
    with pytest.raises(ik.IndefiniteHessianError) as refusal:
        ik.Direct().prepare(make_operator(problem))
    suggestion = float(re.search(r"damping=([0-9.e+-]+) or more", str(refusal.value)).group(1))
    ik.Direct().prepare(make_operator(problem, damping=suggestion))


def test_lissa_reports_its_residual_with_its_own_damping_too(logreg: Problem) -> None:
    solver = ik.LiSSA(scale=10.0, depth=3, damping=0.01)
    with pytest.warns(ik.ConvergenceWarning, match="relative residual"):
        solver.prepare(make_operator(logreg)).solve(torch.randn(2, 15, dtype=torch.float64))
    assert solver.last_report.relative_residual > 0.05 and not solver.last_report.converged


def test_preconditioned_lissa_has_the_same_fixed_point_and_converges_faster(mlp: Problem) -> None:
    """With M = the exact inverse, M·A = I: full-batch LiSSA is exact after a handful of steps."""
    A = mlp.dense_hessian(0.01)
    V = torch.randn(2, A.shape[0], dtype=torch.float64)
    expected = torch.linalg.solve(A, V.T).T
    op = make_operator(mlp, damping=0.01)
    fast = ik.LiSSA(depth=20, batch_size=1000, preconditioner="direct", tail=0.0)
    assert relative_error(fast.prepare(op).solve(V), expected) < 1e-10
    assert fast.scale_ == pytest.approx(1.2, rel=1e-6)  # λ_max(M·A) = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ik.ConvergenceWarning)
        slow = ik.LiSSA(depth=20, batch_size=1000, tail=0.0).prepare(op).solve(V)
    assert relative_error(slow, expected) > 1e-3


def test_preconditioned_lissa_with_ekfac_agrees_with_the_dense_solve(mlp: Problem) -> None:
    A = mlp.dense_hessian(0.01)
    V = torch.randn(2, A.shape[0], dtype=torch.float64)
    X = ik.LiSSA(depth=400, preconditioner="ekfac").prepare(make_operator(mlp, 0.01)).solve(V)
    expected = torch.linalg.solve(A, V.T).T
    for row, ref in zip(X, expected, strict=True):
        assert pearson(row, ref) > 0.99
