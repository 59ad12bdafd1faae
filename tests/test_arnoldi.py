"""The Arnoldi (Lanczos) low-rank solver against dense eigendecompositions."""

from __future__ import annotations

import pytest
import torch

import influencekit as ik

from conftest import Problem, make_operator, relative_error


def test_full_rank_is_the_exact_inverse(mlp: Problem) -> None:
    p = mlp.theta().numel()
    solver = ik.solvers.Arnoldi(rank=p, block=5).prepare(make_operator(mlp, damping=0.01))
    V = torch.randn(4, p, dtype=torch.float64)
    assert relative_error(solver.solve(V), torch.linalg.solve(mlp.dense_hessian(0.01), V.T).T) \
        < 1e-8


def test_top_eigenpairs_match_the_dense_spectrum(mlp: Problem) -> None:
    A = mlp.dense_hessian(0.01)
    exact, vectors = torch.linalg.eigh(A)
    solver = ik.solvers.Arnoldi(rank=5, iterations=30, block=3).prepare(make_operator(mlp, 0.01))
    torch.testing.assert_close(solver.eigenvalues_, exact.flip(0)[:5], rtol=1e-6, atol=1e-9)
    overlap = (solver.eigenvectors_ @ vectors[:, -5:]).abs().max(dim=1).values
    assert bool((overlap > 1 - 1e-6).all())


@pytest.mark.parametrize("remainder", ["trace", "last", "none"])
def test_the_remainder_acts_on_the_complement_only(mlp: Problem, remainder: str) -> None:
    A = mlp.dense_hessian(0.01)
    eigenvalues = torch.linalg.eigvalsh(A)
    solver = ik.solvers.Arnoldi(rank=6, iterations=30, block=3, remainder=remainder,
                                probes=4000).prepare(make_operator(mlp, 0.01))
    U = solver.eigenvectors_
    V = torch.randn(3, A.shape[0], dtype=torch.float64)
    inside = (V @ U.T) @ U
    X = solver.solve(V)
    torch.testing.assert_close((X @ U.T) @ U, ((V @ U.T) / solver.eigenvalues_) @ U)
    outside = X - (X @ U.T) @ U
    if remainder == "none":
        assert float(outside.norm()) < 1e-10
    else:
        torch.testing.assert_close(outside, (V - inside) / solver.sigma_)
    if remainder == "trace":  # the mean of the other eigenvalues, estimated with 4,000 probes
        assert solver.sigma_ == pytest.approx(float(eigenvalues[:-6].mean()), rel=0.1)
    if remainder == "last":
        assert solver.sigma_ == pytest.approx(float(eigenvalues[-6]), rel=1e-6)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="at least rank"):
        ik.solvers.Arnoldi(rank=10, iterations=5)
    with pytest.raises(ValueError, match="remainder must be"):
        ik.solvers.Arnoldi(remainder="drop")  # type: ignore[arg-type]
