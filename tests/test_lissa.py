"""LiSSA solves the system it documents, (A + scale·d·I) x = v, with and without a
preconditioner, against a dense float64 solve."""

from __future__ import annotations

import warnings

import pytest
import torch

import influencekit as ik

from conftest import Problem, make_operator, relative_error

PRECONDITIONERS = [None, "direct", "kfac", "ekfac", ik.Arnoldi(rank=6, remainder="last")]


@pytest.mark.parametrize("preconditioner", PRECONDITIONERS,
                         ids=["none", "direct", "kfac", "ekfac", "arnoldi"])
@pytest.mark.parametrize("d", [0.0, 0.002])
def test_every_preconditioner_and_damping_solve_the_documented_system(
        logreg: Problem, preconditioner: object, d: float) -> None:
    """Full batches make the recursion deterministic; its fixed point must be
    (A + c·I)⁻¹v with c = scale·d, the damping the report states, whatever M is. (Before the
    fix, a preconditioned recursion with d > 0 converged to (A + c·M⁻¹)x = v instead.)"""
    damping = 0.01
    A = logreg.dense_hessian(damping)
    V = torch.randn(3, A.shape[0], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    solver = ik.LiSSA(depth=600, batch_size=1000, damping=d, tail=0.0, tol=1e-8,
                      preconditioner=preconditioner)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ik.ConvergenceWarning)  # it must reach tol 1e-8
        X = solver.prepare(make_operator(logreg, damping=damping)).solve(V)
    c = solver.scale_ * d
    expected = torch.linalg.solve(A + c * torch.eye(A.shape[0], dtype=A.dtype), V.T).T
    assert relative_error(X, expected) < 1e-7
    report = solver.last_report
    assert report.damping == pytest.approx(damping + c)
    assert report.converged is True and report.exact
    dense_residual = float(((X @ (A + c * torch.eye(A.shape[0], dtype=A.dtype)) - V).norm(dim=1)
                            / V.norm(dim=1)).max())
    assert report.relative_residual == pytest.approx(dense_residual, rel=1e-3, abs=1e-12)


def test_a_recursion_damping_no_scale_can_converge_with_is_refused(mlp: Problem) -> None:
    """With M = A⁻¹, d enters as d·M, whose largest eigenvalue is 1/λ_min(A)."""
    with pytest.raises(ik.InvalidSettingError, match=r"cannot converge.*Influence\(damping"):
        ik.LiSSA(damping=0.5, batch_size=1000, preconditioner="direct").prepare(
            make_operator(mlp, damping=0.01))


def test_converged_only_within_the_tolerance_asked_for(logreg: Problem) -> None:
    V = torch.randn(2, logreg.theta().numel(), dtype=torch.float64)
    op = make_operator(logreg)
    loose = ik.LiSSA(depth=40, batch_size=1000, tol=0.5)
    loose.prepare(op).solve(V)
    residual = loose.last_report.relative_residual
    assert 1e-6 < residual <= 0.5 and loose.last_report.converged is True
    strict = ik.LiSSA(depth=40, batch_size=1000, tol=residual / 2)
    with pytest.warns(ik.ConvergenceWarning, match="tol="):
        strict.prepare(op).solve(V)
    assert strict.last_report.converged is False
    assert strict.last_report.tolerance == pytest.approx(residual / 2)
