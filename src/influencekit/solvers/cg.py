"""Conjugate gradients on A·x = v for many right-hand sides at once.

Each right-hand side runs its own CG recurrence, but the products A·P of all still-active ones
are formed together in one batched pass over the training data. A right-hand side stops when its
recurrence residual ‖r‖/‖v‖ falls below ``tol``; the reported residual is recomputed exactly.
Negative curvature pᵀA·p ≤ 0 means A is not positive definite and is refused with advice.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..errors import ConvergenceWarning, IndefiniteHessianError, SolverDivergedError
from .base import Solver, SolveReport

DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


class CG(Solver):
    """Batched conjugate gradients.

    Args:
        tol: relative residual ‖A·x − v‖/‖v‖ to reach; ``None`` picks 1e-10 in float64 and 1e-5
            in float32 (lower precisions: 1e-3).
        max_iter: iteration cap; a warning reports the residual if it is hit.
    """

    name = "cg"

    def __init__(self, tol: float | None = None, max_iter: int = 1000) -> None:
        super().__init__()
        if tol is not None and not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}.")
        if max_iter < 1:
            raise ValueError(f"max_iter must be ≥ 1, got {max_iter}.")
        self.tol = tol
        self.max_iter = max_iter

    def _tolerance(self) -> float:
        return self.tol if self.tol is not None else DEFAULT_TOL.get(self.operator.dtype, 1e-3)

    def _solve(self, V: Tensor) -> Tensor:
        op, tol = self.operator, self._tolerance()
        X = torch.zeros_like(V)
        R = V.clone()
        P = R.clone()
        rs = (R * R).sum(dim=1)
        v_norm = rs.sqrt()
        active = torch.nonzero(rs.sqrt() > tol * v_norm).flatten()
        iterations = 0
        while active.numel() and iterations < self.max_iter:
            iterations += 1
            P_a = P[active]
            AP = op.matvec(P_a)
            curvature = (P_a * AP).sum(dim=1)
            if not bool(torch.isfinite(curvature).all()):
                raise SolverDivergedError(
                    f"CG produced NaN/inf at iteration {iterations}: the Hessian-vector products "
                    "are not finite. Check the model and data for overflow (float64 may help)."
                )
            if bool((curvature <= 0).any()):
                raise IndefiniteHessianError(
                    f"CG met non-positive curvature pᵀ(H + {op.damping:g}·I)p = "
                    f"{float(curvature.min()):.3g} at iteration {iterations}: the damped Hessian "
                    "is not positive definite (the model may not be at a minimum, or the objective "
                    "is not convex). Increase damping (e.g. by factors of 10 from 1e-3) or train "
                    "the model further."
                )
            alpha = rs[active] / curvature
            X[active] += alpha[:, None] * P_a
            R[active] -= alpha[:, None] * AP
            rs_new = (R[active] * R[active]).sum(dim=1)
            beta = rs_new / rs[active]
            P[active] = R[active] + beta[:, None] * P_a
            rs[active] = rs_new
            active = active[rs_new.sqrt() > tol * v_norm[active]]
        converged = active.numel() == 0
        residual = self._relative_residual(X, V)
        self.last_report = SolveReport(
            solver=self.name, relative_residual=residual, iterations=iterations,
            converged=converged, damping=op.damping, details={"tol": tol},
        )
        if not converged:
            warnings.warn(
                f"CG stopped at max_iter={self.max_iter} with relative residual {residual:.2e} "
                f"above tol={tol:g} for {active.numel()} of {V.shape[0]} right-hand sides. Raise "
                "max_iter, add damping (faster convergence), or accept the looser solve.",
                ConvergenceWarning, stacklevel=3,
            )
        elif residual > 100 * tol:
            warnings.warn(
                f"CG's recurrence reached tol={tol:g}, but the recomputed relative residual is "
                f"{residual:.2e}: the system is ill-conditioned for {op.dtype}. Use float64 or "
                "more damping.",
                ConvergenceWarning, stacklevel=3,
            )
        return X
