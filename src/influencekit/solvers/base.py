"""The interface every inverse-Hessian-vector-product method implements.

A solver is prepared once on the damped Hessian operator A = H + λ_d·I (factorising it, estimating
its spectrum, ...) and then maps blocks of right-hand sides V, ``(k, p)``, to X ≈ A⁻¹V row by row.
After each solve it leaves a :class:`SolveReport` saying how well it solved.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..curvature import HessianOperator
from ..errors import NonFiniteError, NotFittedError


@dataclass
class SolveReport:
    """How well the last solve went.

    Attributes:
        solver: the solver's name.
        relative_residual: max over right-hand sides of ‖A·x − v‖ / ‖v‖ (NaN where a fast
            approximate solver was not asked to verify).
        iterations: iterations run (iterative solvers), else ``None``.
        converged: whether the solver reached its own stopping criterion.
        damping: the damping λ_d the solution includes (LiSSA adds scale × its own damping).
        min_eigenvalue: smallest eigenvalue of A, when known (Direct).
        max_eigenvalue: largest eigenvalue of A, when known (Direct, LiSSA's estimate).
        details: solver-specific figures.
    """

    solver: str
    relative_residual: float
    iterations: int | None = None
    converged: bool = True
    damping: float = 0.0
    min_eigenvalue: float | None = None
    max_eigenvalue: float | None = None
    details: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [f"{self.solver}: relative residual {self.relative_residual:.2e}"]
        if self.iterations is not None:
            parts.append(f"{self.iterations} iterations")
        if not self.converged:
            parts.append("NOT converged")
        if self.min_eigenvalue is not None:
            parts.append(f"λ_min(A) {self.min_eigenvalue:.3g}")
        if self.max_eigenvalue is not None:
            parts.append(f"λ_max(A) {self.max_eigenvalue:.3g}")
        parts.append(f"damping {self.damping:g}")
        parts.extend(f"{k} {v:.4g}" for k, v in self.details.items())
        return ", ".join(parts)


class Solver(ABC):
    """Computes A⁻¹V for the damped Hessian A = H + λ_d·I."""

    name: str = "solver"
    #: whether ``solve`` is one fixed linear map of V (then it can precondition CG)
    linear: bool = False

    def __init__(self) -> None:
        self._operator: HessianOperator | None = None
        self.last_report: SolveReport | None = None

    def unprepared_copy(self) -> Solver:
        """A copy with the same settings and nothing bound (``prepare`` rebinds all state)."""
        duplicate = copy.copy(self)
        duplicate._operator = None
        duplicate.last_report = None
        return duplicate

    def prepare(self, operator: HessianOperator) -> Solver:
        """Bind to the operator and do any one-off work (factorisation, spectrum estimates)."""
        self._operator = operator
        return self

    @property
    def operator(self) -> HessianOperator:
        if self._operator is None:
            raise NotFittedError(f"{type(self).__name__} is not prepared; call prepare(operator).")
        return self._operator

    def solve(self, V: Tensor) -> Tensor:
        """X with rows x_j = A⁻¹ v_j, for ``V`` of shape ``(k, p)`` (or ``(p,)``)."""
        single = V.ndim == 1
        op = self.operator
        V = V.reshape(-1, op.dim).to(device=op.device, dtype=op.dtype)
        bad = ~torch.isfinite(V).all(dim=1)
        if bool(bad.any()):
            rows = torch.nonzero(bad).flatten().tolist()[:10]
            raise NonFiniteError(
                f"{type(self).__name__}.solve got right-hand sides with NaN or infinite entries "
                f"(rows: {rows}); A⁻¹v is undefined for them. Check the gradients behind them.")
        X = self._solve(V) if V.shape[0] else V.clone()
        return X[0] if single else X

    def apply_inverse(self, V: Tensor) -> Tensor:
        """The solver's (approximate) A⁻¹ applied to the rows of ``V``, without a report.

        Only for ``linear`` solvers, whose answer is a fixed linear map (used as a preconditioner).
        """
        if not self.linear:
            raise TypeError(
                f"{type(self).__name__} is not a fixed linear map of its input and cannot serve "
                "as a preconditioner; use 'ekfac', 'kfac', 'arnoldi' or 'direct'."
            )
        return self._apply(V.to(device=self.operator.device, dtype=self.operator.dtype))

    def apply_inverse_sqrt(self, V: Tensor) -> Tensor:
        """The symmetric square root of the solver's approximate A⁻¹ applied to the rows of V.

        Solvers whose approximation is kept in an eigenbasis provide it (Direct, K-FAC, EK-FAC,
        Arnoldi); :class:`~influencekit.solvers.Deflated` needs it of its base.
        """
        raise TypeError(
            f"{type(self).__name__} keeps no eigenbasis and has no symmetric square root of its "
            "inverse; use 'ekfac', 'kfac', 'arnoldi' or 'direct' as the base."
        )

    def _apply(self, V: Tensor) -> Tensor:
        """A⁻¹V for linear solvers (they override it); ``_solve`` adds the report."""
        raise TypeError(f"{type(self).__name__} does not implement _apply.")

    @abstractmethod
    def _solve(self, V: Tensor) -> Tensor:
        """Solve for a non-empty ``(k, p)`` block; set ``self.last_report``."""

    def _relative_residual(self, X: Tensor, V: Tensor) -> float:
        R = self.operator.matvec(X) - V
        return _max_ratio(R, V)


def _max_ratio(R: Tensor, V: Tensor) -> float:
    norms = V.norm(dim=1)
    ratio = R.norm(dim=1) / torch.where(norms > 0, norms, torch.ones_like(norms))
    return float(ratio.max())
