"""Deflation of a base approximate inverse by Lanczos on M^½ A M^½."""

from __future__ import annotations

import pytest
import torch

import influencekit as ik

from conftest import Problem, make_operator, relative_error


@pytest.mark.parametrize("base", ["ekfac", "kfac", "direct"])
def test_square_roots_square_to_the_inverse(mlp: Problem, base: str) -> None:
    solver = ik.solvers.make_solver(base).prepare(make_operator(mlp, damping=0.01))
    V = torch.randn(3, mlp.theta().numel(), dtype=torch.float64)
    root = solver.apply_inverse_sqrt
    torch.testing.assert_close(root(root(V)), solver.apply_inverse(V), rtol=1e-10, atol=1e-12)


def test_deflating_every_direction_gives_the_exact_inverse(mlp: Problem) -> None:
    p = mlp.theta().numel()
    solver = ik.solvers.Deflated(rank=p, iterations=p, block=5).prepare(make_operator(mlp, 0.01))
    V = torch.randn(4, p, dtype=torch.float64)
    expected = torch.linalg.solve(mlp.dense_hessian(0.01), V.T).T
    assert relative_error(solver.solve(V), expected) < 1e-7


def test_partial_deflation_is_symmetric_positive_definite_and_closer(mlp: Problem) -> None:
    op = make_operator(mlp, damping=0.01)
    eye = torch.eye(op.dim, dtype=torch.float64)
    base = ik.solvers.EKFAC().prepare(op).apply_inverse(eye)
    deflated = ik.solvers.Deflated(rank=8, iterations=20, block=4).prepare(op).apply_inverse(eye)
    torch.testing.assert_close(deflated, deflated.T, rtol=1e-9, atol=1e-12)
    assert float(torch.linalg.eigvalsh(deflated)[0]) > 0
    A = mlp.dense_hessian(0.01)
    condition = [torch.linalg.cond(M @ A) for M in (base, deflated)]
    assert condition[1] < condition[0]


def test_deflated_preconditioning_cuts_cg_iterations(mlp: Problem) -> None:
    op = make_operator(mlp, damping=0.01)
    V = torch.randn(5, op.dim, dtype=torch.float64)
    runs = {}
    for name, pre in (("ekfac", "ekfac"),
                      ("deflated", ik.solvers.Deflated(rank=10, iterations=20, block=5))):
        solver = ik.CG(tol=1e-10, preconditioner=pre, block=False).prepare(op)
        X = solver.solve(V)
        assert relative_error(X, torch.linalg.solve(mlp.dense_hessian(0.01), V.T).T) < 1e-8
        runs[name] = solver.last_report.iterations
    assert runs["deflated"] < runs["ekfac"]


def test_a_base_without_a_square_root_is_refused_at_construction() -> None:
    with pytest.raises(ik.InputTypeError, match=r"symmetric square root.*CG keeps no eigenbasis"):
        ik.solvers.Deflated(base="cg")


def test_a_lanczos_run_on_the_heaviest_examples_still_preconditions_exactly(
        mlp: Problem) -> None:
    """subset=m builds the deflation from A_S (the m examples with the largest curvature
    weights): still symmetric positive definite, so CG converges to the dense solution; with
    m = n it is the full run."""
    op = make_operator(mlp, damping=0.01)
    eye = torch.eye(op.dim, dtype=torch.float64)
    sampled = ik.solvers.Deflated(rank=8, iterations=20, block=4, subset=10).prepare(op)
    M = sampled.apply_inverse(eye)
    torch.testing.assert_close(M, M.T, rtol=1e-9, atol=1e-12)
    assert float(torch.linalg.eigvalsh(M)[0]) > 0
    V = torch.randn(4, op.dim, dtype=torch.float64)
    X = ik.CG(tol=1e-10, preconditioner=sampled).prepare(op).solve(V)
    assert relative_error(X, torch.linalg.solve(mlp.dense_hessian(0.01), V.T).T) < 1e-8
    every = ik.solvers.Deflated(rank=8, iterations=20, block=4, subset=op.num_train)
    full = ik.solvers.Deflated(rank=8, iterations=20, block=4)
    torch.testing.assert_close(every.prepare(op).apply_inverse(eye),
                               full.prepare(op).apply_inverse(eye), rtol=1e-9, atol=1e-12)


def test_subset_must_be_a_positive_count(mlp: Problem) -> None:
    with pytest.raises(ValueError, match="subset must be a positive integer"):
        ik.solvers.Deflated(subset=0)


def _spd(p: int, decades: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, dtype=torch.float64, generator=generator))
    return Q @ torch.diag(torch.logspace(0, decades, p, dtype=torch.float64)) @ Q.T


def test_the_preconditioned_run_finds_the_pairs_of_the_root_form_without_a_root() -> None:
    """Over the whole space the Ritz values are the eigenvalues of M^½ A M^½ (dense eigh, the
    root by eigendecomposition) and each returned z = M^½u solves M A z = θ z; over part of it
    the Ritz values lie inside that spectrum and the z are M⁻¹-orthonormal (u orthonormal)."""
    from influencekit.spectrum import preconditioned_krylov_eigenpairs

    p = 40
    A, M = _spd(p, 4, 0), _spd(p, 2, 1)
    values, vectors = torch.linalg.eigh(M)
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T
    exact = torch.linalg.eigvalsh(root @ A @ root)
    start = torch.randn(4, p, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    theta, Z = preconditioned_krylov_eigenpairs(lambda V: V @ A, lambda V: V @ M, start, p)
    torch.testing.assert_close(theta, exact, rtol=1e-8, atol=0)
    residual = (Z @ A @ M - theta[:, None] * Z).norm(dim=1) / (theta * Z.norm(dim=1))
    assert float(residual.max()) < 1e-6
    theta, Z = preconditioned_krylov_eigenpairs(lambda V: V @ A, lambda V: V @ M, start, 16)
    assert theta.shape == (16,)
    assert float(theta.min()) >= float(exact.min()) * (1 - 1e-10)
    assert float(theta.max()) <= float(exact.max()) * (1 + 1e-10)
    torch.testing.assert_close(Z @ torch.linalg.solve(M, Z.T), torch.eye(16, dtype=torch.float64),
                               rtol=0, atol=1e-8)


def test_an_exhausted_krylov_space_ends_the_run_without_ghost_pairs() -> None:
    """With A = M⁻¹ + a rank-3 term, M^½ A M^½ = I + rank 3, and the space from a block of 2
    closes at dimension 3 + 2: the run stops there (the emptied block is dropped, not normalised
    from its rounding), every Ritz value is an eigenvalue, and none but 1 (the block's two
    directions in the eigenvalue-1 space) repeats."""
    from influencekit.spectrum import preconditioned_krylov_eigenpairs

    p = 30
    M = _spd(p, 2, 3)
    W = torch.randn(3, p, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    A = torch.linalg.inv(M) + W.T @ W
    start = torch.randn(2, p, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    theta, _ = preconditioned_krylov_eigenpairs(lambda V: V @ A, lambda V: V @ M, start, p)
    values, vectors = torch.linalg.eigh(M)
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T
    exact = torch.linalg.eigvalsh(root @ A @ root)
    assert theta.numel() == 5
    torch.testing.assert_close(theta[:2], torch.ones(2, dtype=torch.float64), rtol=1e-8, atol=0)
    assert torch.all(theta[2:] > 1 + 1e-6) and torch.all(theta[2:].diff() > 1e-6)
    distance = (theta[:, None] - exact[None, :]).abs().min(dim=1).values
    assert float(distance.max()) < 1e-8 * float(exact.max())
