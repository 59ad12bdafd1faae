"""Direct solve with the explicit Hessian (small models: p up to a few thousand).

Forms the curvature column block by column block, takes its symmetric eigendecomposition
C = Q·diag(μ)·Qᵀ in float64 once, and answers every solve as X = ((V·Q)/(μ + λ_d))·Qᵀ. A matrix
whose smallest eigenvalue μ_min + λ_d is not clearly positive is refused, with the damping that
would fix it. The eigendecomposition is of the undamped C, so the exact spectrum also serves
``damping="auto"`` at no extra cost. The reported residual is measured against A through
curvature-vector products (``verify=True``, the default), not against the decomposition itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import arguments
from ..curvature import HessianOperator
from ..errors import ConvergenceWarning, IndefiniteHessianError, InvalidSettingError, warn
from ..spectrum import SpectrumEstimate
from .base import Solver

DEFAULT_TOL = {torch.float64: 1e-8, torch.float32: 1e-3}


class Direct(Solver):
    """Exact solve through the eigendecomposition of the explicit damped curvature.

    Args:
        max_dim: refuse models with more tracked parameters than this (the p×p matrix and its
            eigendecomposition cost O(p²) memory and O(p³) time).
        block: curvature columns formed per pass over the training data.
        verify: measure ‖A·x − v‖/‖v‖ through curvature-vector products after each solve (one
            more batched product); ``False`` reports NaN and ``converged=None``.
        tol: the residual ``converged`` is judged by (``None``: 1e-8 in float64, 1e-3 in
            float32); a larger one warns (ill-conditioned for the dtype).
    """

    name = "direct"
    linear = True

    def __init__(self, max_dim: int = 20_000, block: int = 256, verify: bool = True,
                 tol: float | None = None) -> None:
        super().__init__()
        self.max_dim = arguments.positive_integer("max_dim", max_dim)
        self.block = arguments.positive_integer("block", block)
        self.verify = arguments.flag("verify", verify)
        self.tol = arguments.optional_positive("tol", tol)
        self.eigenvalues_: Tensor | None = None
        self._decomposed: tuple[HessianOperator, Tensor, Tensor] | None = None

    def _decomposition(self, operator: HessianOperator) -> tuple[Tensor, Tensor]:
        """(μ of the undamped C, Q), computed once per operator."""
        if self._decomposed is not None and self._decomposed[0] is operator:
            return self._decomposed[1], self._decomposed[2]
        p = operator.dim
        if p > self.max_dim:
            raise InvalidSettingError(
                f"Direct forms the explicit {p}×{p} curvature, above max_dim={self.max_dim}. Use "
                "solver='cg' (or 'lissa'), track fewer parameters, or raise Direct(max_dim=...)."
            )
        mu, Q = torch.linalg.eigh(operator.dense(self.block).to(torch.float64))
        mu, Q = mu - operator.damping, Q.contiguous()
        self._decomposed = (operator, mu, Q)
        return mu, Q

    def spectrum_estimate(self, operator: HessianOperator) -> SpectrumEstimate:
        """The exact extreme eigenvalues of C, from the eigendecomposition (kept for prepare)."""
        mu, _ = self._decomposition(operator)
        return SpectrumEstimate(float(mu[0]), float(mu[-1]), "eigendecomposition", True)

    def unprepared_copy(self) -> Direct:
        duplicate = super().unprepared_copy()
        duplicate._decomposed = None
        duplicate.eigenvalues_ = None
        return duplicate

    def prepare(self, operator: HessianOperator) -> Direct:
        super().prepare(operator)
        return self._bind(*self._decomposition(operator))

    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        mu_c, Q = self._decomposition(self.operator)
        return {"undamped_eigenvalues": mu_c, "eigenvectors": Q}, {}

    def restore(self, operator: HessianOperator, tensors: dict[str, Tensor],
                values: dict) -> Direct:
        super().restore(operator, tensors, values)
        mu_c = tensors["undamped_eigenvalues"].to(operator.device, torch.float64)
        Q = tensors["eigenvectors"].to(operator.device, torch.float64)
        self._decomposed = (operator, mu_c, Q)
        return self._bind(mu_c, Q)

    def _bind(self, mu_c: Tensor, Q: Tensor) -> Direct:
        """Keep A = Q·diag(μ_c + λ_d)·Qᵀ, or refuse it if not clearly positive definite."""
        operator = self.operator
        mu = mu_c + operator.damping
        p = operator.dim
        mu_min, mu_max = float(mu[0]), float(mu[-1])
        floor = p * torch.finfo(operator.dtype).eps * max(abs(mu_max), 1e-300)
        if mu_min <= floor:
            raise IndefiniteHessianError(
                _indefinite_message(mu_min, mu_max, operator.damping, floor))
        # A = Q·diag(μ)·Qᵀ; nothing else p×p is kept. Row-major, as a saved fit reloads it, so
        # that the products (and the scores) are bit-identical after a load
        self._Q, self.eigenvalues_ = Q.contiguous(), mu
        return self

    def _apply(self, V: Tensor, power: float = 1.0) -> Tensor:
        V64 = V.to(torch.float64)
        return (((V64 @ self._Q) / self.eigenvalues_**power) @ self._Q.T).to(V.dtype)

    def _apply_sqrt(self, V: Tensor) -> Tensor:
        return self._apply(V, 0.5)

    def _tolerance(self) -> float:
        return self.tol if self.tol is not None else DEFAULT_TOL.get(self.operator.dtype, 1e-2)

    def _solve(self, V: Tensor) -> Tensor:
        X = self._apply(V)
        self._check_output(X)
        mu = self.eigenvalues_
        tol = self._tolerance()
        residual = self._relative_residual(X, V) if self.verify else float("nan")
        converged = residual <= tol if self.verify else None
        self.last_report = self._report(
            residual, converged, tolerance=tol if self.verify else None,
            min_eigenvalue=float(mu[0]), max_eigenvalue=float(mu[-1]),
            details={"condition_number": float(mu[-1] / mu[0])},
            notes=() if self.verify else ("residual not measured (verify=False)",))
        if converged is False:
            warn(
                f"Direct's answer has relative residual {residual:.2e} against the curvature "
                f"products, above tol={tol:g}: the damped curvature (condition number "
                f"{float(mu[-1] / mu[0]):.3g}) is ill-conditioned for {self.operator.dtype}. Use "
                "float64 or more damping.", ConvergenceWarning)
        return X


def _indefinite_message(mu_min: float, mu_max: float, damping: float, floor: float) -> str:
    """Why A was refused and a damping that clears the refusal threshold."""
    hessian_min = mu_min - damping
    needed = max(2.0 * max(-hessian_min, 0.0), 10.0 * floor)
    suggestion = 10.0 ** math.ceil(math.log10(needed + damping))
    if mu_min > 0:
        problem = (f"is numerically singular: its smallest eigenvalue {mu_min:.3g} is below the "
                   f"round-off threshold {floor:.3g} (p·eps·λ_max), so H⁻¹ would amplify noise")
    else:
        problem = (f"is not positive definite: its smallest eigenvalue is {mu_min:.3g} (largest "
                   f"{mu_max:.3g}), so H⁻¹ does not describe a minimum; the model may not be "
                   "trained to convergence, or the objective is not convex")
    return (f"The damped curvature C + {damping:g}·I {problem}. Use damping={suggestion:g} or "
            f"more (it must exceed {needed:.3g}), or damping='auto', add weight decay, use "
            "curvature='gauss-newton', or train the model further.")
