"""Direct solve with the explicit Hessian (small models: p up to a few thousand).

Forms A = H + λ_d·I column block by column block, takes its symmetric eigendecomposition
A = Q·diag(μ)·Qᵀ in float64 once, and answers every solve as X = ((V·Q)/μ)·Qᵀ. A matrix whose
smallest eigenvalue μ_min is not clearly positive is refused, with the damping that would fix it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..curvature import HessianOperator
from ..errors import IndefiniteHessianError
from .base import Solver, SolveReport, _max_ratio


class Direct(Solver):
    """Exact solve through the eigendecomposition of the explicit damped Hessian.

    Args:
        max_dim: refuse models with more tracked parameters than this (the p×p matrix and its
            eigendecomposition cost O(p²) memory and O(p³) time).
        block: Hessian columns formed per pass over the training data.
    """

    name = "direct"
    linear = True

    def __init__(self, max_dim: int = 20_000, block: int = 256) -> None:
        super().__init__()
        self.max_dim = max_dim
        self.block = block
        self.eigenvalues_: Tensor | None = None

    def prepare(self, operator: HessianOperator) -> Direct:
        super().prepare(operator)
        p = operator.dim
        if p > self.max_dim:
            raise ValueError(
                f"Direct forms the explicit {p}×{p} Hessian, above max_dim={self.max_dim}. Use "
                "solver='cg' (or 'lissa'), track fewer parameters, or raise Direct(max_dim=...)."
            )
        mu, Q = torch.linalg.eigh(operator.dense(self.block).to(torch.float64))
        mu_min, mu_max = float(mu[0]), float(mu[-1])
        floor = p * torch.finfo(operator.dtype).eps * max(abs(mu_max), 1e-300)
        if mu_min <= floor:
            raise IndefiniteHessianError(
                _indefinite_message(mu_min, mu_max, operator.damping, floor))
        self._Q, self.eigenvalues_ = Q, mu  # A = Q·diag(μ)·Qᵀ; nothing else p×p is kept
        return self

    def _apply(self, V: Tensor, power: float = 1.0) -> Tensor:
        V64 = V.to(torch.float64)
        return (((V64 @ self._Q) / self.eigenvalues_**power) @ self._Q.T).to(V.dtype)

    def apply_inverse_sqrt(self, V: Tensor) -> Tensor:
        return self._apply(V.to(device=self.operator.device, dtype=self.operator.dtype), 0.5)

    def _solve(self, V: Tensor) -> Tensor:
        V64 = V.to(torch.float64)
        X64 = self._apply(V64)
        mu = self.eigenvalues_
        self.last_report = SolveReport(
            solver=self.name,
            relative_residual=_max_ratio(((X64 @ self._Q) * mu) @ self._Q.T - V64, V64),
            damping=self.operator.damping,
            min_eigenvalue=float(mu[0]),
            max_eigenvalue=float(mu[-1]),
            details={"condition_number": float(mu[-1] / mu[0])},
        )
        return X64.to(V.dtype)


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
    return (f"The damped Hessian H + {damping:g}·I {problem}. Use damping={suggestion:g} or more "
            f"(it must exceed {needed:.3g}), add weight decay, use curvature='gauss-newton', or "
            "train the model further.")
