"""Conjugate gradients on A·X = V for many right-hand sides at once.

Two variants, both forming the products A·P of a whole block in one batched pass over the data:

- ``block=True`` (default): block CG with one Krylov space shared by all right-hand sides, in the
  breakdown-free form of Ji & Li (2017, "A breakdown-free block conjugate gradient method"):

      R = V − A·X,  Z = M·S(R),  P = orth(Z)
      repeat:  Q = A·P;  α = (PᵀQ)⁻¹ PᵀR;  X += P·α;  R −= Q·α
               Z = M·S(R);  β = −(PᵀQ)⁻¹ QᵀZ;  P = orth(Z + P·β)

  ``orth`` keeps an orthonormal basis of the columns and drops (numerically) dependent ones, so
  the block shrinks instead of breaking down. Each right-hand side sees the search directions of
  all the others, so the iteration count falls far below that of independent CG.

  S(R) picks what to search next. Each column is scaled by its right-hand side's norm,
  N = R·diag(‖v_j‖)⁻¹, so that a small right-hand side counts as much as a large one (the stopping
  rule is relative per column). N = U Σ Wᵀ; only the directions u_i whose singular value σ_i
  exceeds ``truncate`` × tol are searched, S(R) = U_kept. Every column's residual outside them is
  at most σ_(r+1) ≤ truncate·tol, so they cannot keep a column from converging; once the residual
  is nearly converged it is numerically low-rank and the block narrows, e.g. from 100 to 69 to 27
  directions on the benchmark MLP: 596 Hessian-vector products instead of 700 at the same
  tolerance. Directions dropped once come back if their share grows: S is recomputed from the
  true recurrence residual every iteration, and the stopping rule is unchanged.
- ``block=False``: one classic CG recurrence per right-hand side, batched.

M is an optional preconditioner (another prepared solver whose ``solve`` approximates A⁻¹, e.g.
``"ekfac"``). A right-hand side is done when its recurrence residual ‖R_j‖/‖V_j‖ ≤ ``tol``; the
reported residual is then recomputed as ‖A·X − V‖ (``verify=True``, the default), and
``converged`` says whether that recomputed residual meets ``tol``. Non-positive curvature means
A is not positive definite and is refused with advice.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import arguments, distributed
from ..curvature import HessianOperator
from ..errors import ConvergenceWarning, IndefiniteHessianError, SolverDivergedError
from ..linalg import orthonormal_columns
from .base import (
    Solver,
    make_preconditioner,
    max_ratio,
    preconditioner_state,
    restore_preconditioner,
)

logger = logging.getLogger(__name__)

DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


class CG(Solver):
    """Conjugate gradients, block (shared Krylov space) or independent, optionally preconditioned.

    Args:
        tol: relative residual ‖A·x − v‖/‖v‖ to reach; ``None`` picks 1e-10 in float64 and 1e-5
            in float32 (lower precisions: 1e-3).
        max_iter: iteration cap; a warning reports the residual if it is hit.
        block: share one Krylov space across the right-hand sides (see the module docstring).
        preconditioner: ``None``, a solver name (``"ekfac"``, ``"kfac"``, ``"arnoldi"``) or a
            solver object; it is prepared on the same operator and its ``solve`` is used as M.
        verify: recompute the true residual ‖A·X − V‖ at the end (one more batched product);
            ``converged`` is judged on it. ``False`` reports it as NaN and ``converged=None``
            (the recurrence's estimate stays in ``details``).
        truncate: block CG searches only the residual's directions with singular value above
            ``truncate`` × tol (module docstring); 0 searches all of them. In [0, 1].
    """

    name = "cg"

    def __init__(self, tol: float | None = None, max_iter: int = 1000, block: bool = True,
                 preconditioner: str | Solver | None = None, verify: bool = True,
                 truncate: float = 0.3) -> None:
        super().__init__()
        self.tol = arguments.optional_positive("tol", tol)
        self.max_iter = arguments.positive_integer("max_iter", max_iter)
        self.block = arguments.flag("block", block)
        self.verify = arguments.flag("verify", verify)
        self.truncate = arguments.real("truncate", truncate, minimum=0.0, maximum=1.0)
        make_preconditioner(preconditioner, "CG")  # checked now, prepared with the operator
        self.preconditioner = preconditioner
        self._precondition: Callable[[Tensor], Tensor] | None = None
        self._inner: Solver | None = None
        self._products = 0  # Hessian-vector products of the last solve

    def prepare(self, operator: HessianOperator) -> CG:
        super().prepare(operator)
        self._precondition, self._inner = None, make_preconditioner(self.preconditioner, "CG")
        if self._inner is not None:
            self._inner.progress = self.progress
            self._precondition = self._inner.prepare(operator).apply_inverse
        return self

    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        return preconditioner_state(self._inner)

    def restore(self, operator: HessianOperator, tensors: dict[str, Tensor],
                values: dict) -> CG:
        super().restore(operator, tensors, values)
        self._inner = restore_preconditioner(self.preconditioner, "CG", operator, tensors,
                                             values)
        self._precondition = None if self._inner is None else self._inner.apply_inverse
        return self

    def _tolerance(self) -> float:
        return self.tol if self.tol is not None else DEFAULT_TOL.get(self.operator.dtype, 1e-3)

    def _solve(self, V: Tensor) -> Tensor:
        tol = self._tolerance()
        solve = self._block_cg if self.block else self._independent_cg
        self._products = 0
        X, iterations, recurrence = solve(V, tol)
        self._check_output(X)
        residual = self._relative_residual(X, V) if self.verify else float("nan")
        # unverified: a recurrence above tol is a known failure; below it, nothing was checked
        converged = residual <= tol if self.verify else (False if recurrence > tol else None)
        details = {"block": float(self.block),
                   "preconditioned": float(self._precondition is not None),
                   "products": float(self._products), "recurrence_residual": recurrence}
        self.last_report = self._report(
            residual, converged, iterations=iterations, tolerance=tol, details=details,
            notes=() if self.verify else ("residual not recomputed (verify=False); the "
                                          "recurrence's estimate is in details",))
        logger.info("CG: %d iterations, %d products, recurrence residual %.2e, recomputed "
                    "residual %.2e (tol %g).", iterations, self._products, recurrence, residual,
                    tol)
        self._warn(recurrence <= tol, residual, tol, recurrence)
        return X

    def _warn(self, recurrence_converged: bool, residual: float, tol: float,
              recurrence: float) -> None:
        if not recurrence_converged:
            shown = residual if residual == residual else recurrence
            warnings.warn(
                f"CG stopped at max_iter={self.max_iter} with relative residual {shown:.2e} "
                f"above tol={tol:g}. Raise max_iter, add damping (faster convergence), use a "
                "preconditioner (preconditioner='ekfac'), or accept the looser solve.",
                ConvergenceWarning, stacklevel=4,
            )
        elif residual > tol:
            warnings.warn(
                f"CG's recurrence reached tol={tol:g}, but the recomputed relative residual is "
                f"{residual:.2e}, so the solve is reported as not converged: the system is "
                f"ill-conditioned for {self.operator.dtype}. Use float64, more damping, or a "
                "looser tol.",
                ConvergenceWarning, stacklevel=4,
            )

    def _progress_bar(self, description: str) -> tqdm:
        return tqdm(total=self.max_iter, desc=description, leave=False,
                    disable=not self.progress)

    def _apply_m(self, R: Tensor) -> Tensor:
        """The preconditioner on the rows of R (under torch.distributed each process applies
        it to a share of the rows)."""
        if self._precondition is None:
            return R
        return distributed.split_rows(self._precondition, R)

    # --------------------------------------------------------------- block CG (Ji & Li 2017)

    def _block_cg(self, V: Tensor, tol: float) -> tuple[Tensor, int, float]:
        B = V.T  # (p, k): columns are right-hand sides
        v_norm = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
        X = torch.zeros_like(B)
        R = B.clone()
        ratio = float((R.norm(dim=0) / v_norm).max())
        if ratio <= tol:
            return X.T, 0, ratio
        P = orthonormal_columns(self._apply_m(self._search_space(R, v_norm, tol).T).T)
        iterations = 0
        with self._progress_bar("block CG iterations") as bar:
            while iterations < self.max_iter:
                iterations += 1
                ratio = self._block_step(B, X, R, P, v_norm, iterations)
                bar.update(1)
                bar.set_postfix(residual=f"{ratio:.1e}", directions=P.shape[1])
                logger.debug("block CG iteration %d: %d directions, residual %.3e", iterations,
                             P.shape[1], ratio)
                if ratio <= tol:
                    break
                P = self._next_directions(R, v_norm, tol)
                if P.shape[1] == 0:
                    break
        return X.T, iterations, ratio

    def _block_step(self, B: Tensor, X: Tensor, R: Tensor, P: Tensor, v_norm: Tensor,
                    iteration: int) -> float:
        """One block CG update of X and R (in place) along the directions P; the new ratio."""
        op = self.operator
        Q = op.matvec(P.T).T
        self._products += P.shape[1]
        PtQ = (P.T @ Q).double()
        PtQ = 0.5 * (PtQ + PtQ.T)
        _check_curvature(PtQ, iteration, op.damping)
        alpha = torch.linalg.solve(PtQ, (P.T @ R).double()).to(B.dtype)
        X.addmm_(P, alpha)
        R.addmm_(Q, alpha, alpha=-1.0)
        ratio = float((R.norm(dim=0) / v_norm).max())
        if not math.isfinite(ratio):
            raise SolverDivergedError(_nan_message(iteration))
        self._last_block = (P, Q, PtQ)
        return ratio

    def _next_directions(self, R: Tensor, v_norm: Tensor, tol: float) -> Tensor:
        """P = orth(Z − P·(PᵀQ)⁻¹QᵀZ) with Z = M·S(R) (module docstring)."""
        P, Q, PtQ = self._last_block
        Z = self._apply_m(self._search_space(R, v_norm, tol).T).T
        beta = torch.linalg.solve(PtQ, (Q.T @ Z).double()).to(Z.dtype)
        return orthonormal_columns(Z.addmm_(P, beta, alpha=-1.0))

    def _search_space(self, R: Tensor, v_norm: Tensor, tol: float) -> Tensor:
        """S(R): the column-scaled residual N = R·diag(‖v_j‖)⁻¹, ``(p, k)``, restricted to its
        singular directions above ``truncate`` × tol: the orthonormal left singular vectors
        U_kept = N·W_kept·Σ_kept⁻¹, ``(p, r)`` (module docstring). Only the span matters to
        block CG; unit columns keep the rank-revealing orthonormalisation from dropping a
        direction for being small."""
        N = R / v_norm
        if self.truncate == 0:
            return N
        squared, W = torch.linalg.eigh((N.T @ N).double())  # σ², ascending
        keep = squared > (self.truncate * tol) ** 2
        return N @ (W[:, keep] / squared[keep].sqrt()).to(N.dtype)

    # --------------------------------------------------------------- independent CG

    def _independent_cg(self, V: Tensor, tol: float) -> tuple[Tensor, int, float]:
        op = self.operator
        X = torch.zeros_like(V)
        R = V.clone()
        Z = self._apply_m(R)
        P = Z.clone()
        rz = (R * Z).sum(dim=1)
        v_norm = V.norm(dim=1)
        active = torch.nonzero(R.norm(dim=1) > tol * v_norm).flatten()
        iterations = 0
        bar = self._progress_bar("CG iterations")
        while active.numel() and iterations < self.max_iter:
            iterations += 1
            bar.update(1)
            bar.set_postfix(active=int(active.numel()))
            P_a = P[active]
            AP = op.matvec(P_a)
            self._products += P_a.shape[0]
            curvature = (P_a * AP).sum(dim=1)
            if not bool(torch.isfinite(curvature).all()):
                raise SolverDivergedError(_nan_message(iterations))
            if bool((curvature <= 0).any()):
                raise IndefiniteHessianError(_indefinite_message(
                    float(curvature.min()), iterations, op.damping))
            alpha = rz[active] / curvature
            X[active] += alpha[:, None] * P_a
            R[active] -= alpha[:, None] * AP
            Z_a = self._apply_m(R[active])
            rz_new = (R[active] * Z_a).sum(dim=1)
            beta = rz_new / rz[active]
            P[active] = Z_a + beta[:, None] * P_a
            rz[active] = rz_new
            active = active[R[active].norm(dim=1) > tol * v_norm[active]]
        bar.close()
        ratio = max_ratio(R, V) if V.numel() else 0.0
        return X, iterations, ratio


def _check_curvature(PtQ: Tensor, iteration: int, damping: float) -> None:
    if not bool(torch.isfinite(PtQ).all()):
        raise SolverDivergedError(_nan_message(iteration))
    smallest = float(torch.linalg.eigvalsh(PtQ)[0])
    if smallest <= 0:
        raise IndefiniteHessianError(_indefinite_message(smallest, iteration, damping))


def _nan_message(iteration: int) -> str:
    return (f"CG produced NaN/inf at iteration {iteration}: the curvature-vector products are not "
            "finite. Check the model and data for overflow (float64 may help).")


def _indefinite_message(curvature: float, iteration: int, damping: float) -> str:
    return (
        f"CG met non-positive curvature pᵀ(H + {damping:g}·I)p = {curvature:.3g} at iteration "
        f"{iteration}: the damped Hessian is not positive definite (the model may not be at a "
        "minimum, or the objective is not convex). Increase damping (e.g. by factors of 10 from "
        "1e-3), use curvature='gauss-newton', or train the model further."
    )
