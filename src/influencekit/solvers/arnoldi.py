"""Arnoldi: a low-rank eigendecomposition of A from its products, plus the rest of the spectrum.

A block Krylov space is grown from ``block`` random vectors with full reorthogonalisation — the
symmetric (Lanczos) form of the Arnoldi process, in blocks so that each pass over the training
data multiplies many vectors at once:

    Q₀ = orth(Ω),   Q_{j+1} = orth((I − Q Qᵀ) A Q_j),   Q = [Q₀ … Q_s]   (m = (s+1)·block columns)

Rayleigh-Ritz on the space gives T = Qᵀ A Q = S Θ Sᵀ; the ``rank`` largest Ritz pairs
(θ_i, u_i = Q s_i) approximate the top of the spectrum. The inverse is

    A⁻¹ v ≈ U Θ⁻¹ Uᵀ v + (v − U Uᵀ v) / σ,

where σ stands in for the eigenvalues left out (the peers' Arnoldi drops this term, σ = ∞):

- ``remainder="last"`` (default): σ = θ_r, the smallest kept eigenvalue, as in Nyström
  preconditioners: the complement is treated as if it sat just below the kept spectrum;
- ``remainder="trace"``: σ = (tr A − Σ θ_i) / (p − r), the mean of the remaining eigenvalues, with
  tr A from Hutchinson's estimator over ``probes`` random sign vectors (one batched product);
- ``remainder="none"``: the complement is dropped, as in most libraries.

Measured on the benchmark MLP (85k parameters, damping 1e-3, rank 50, 100 Krylov vectors; Pearson
of the 100 × 1,257 scores against the exact solve): "last" 0.936, "trace" 0.825, "none" 0.620 —
the peers' Arnoldi results (0.72–0.80) correspond to dropping the complement.

Cost: m products with A (in blocks), an m×m eigendecomposition, and U (r×p) in memory; every
later solve is two thin matrix products, so many queries cost almost nothing.

The kept Ritz values must be positive: a value at or below round-off level means A is
indefinite or singular along that direction, and its inverse would be wrong or infinite; that is
refused with the damping that would clear it. The trace estimate of the remainder can come out
below the damped weight decay λ + λ_d, a floor every eigenvalue of a positive semi-definite data
curvature sits above (without weight decay or damping: 1e-6 of the smallest kept eigenvalue); it
is then raised to that floor, and the report says so.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .. import arguments
from ..curvature import HessianOperator
from ..errors import IndefiniteHessianError, InvalidSettingError
from ..spectrum import krylov_eigenpairs
from .base import ApproximateInverse

Remainder = Literal["trace", "last", "none"]


class Arnoldi(ApproximateInverse):
    """Low-rank (Lanczos/Arnoldi) inverse with the rest of the spectrum handled.

    Args:
        rank: eigenpairs kept (r).
        iterations: Krylov dimension m ≥ rank (default 2·rank, rounded up to whole blocks).
        block: vectors multiplied per pass over the data.
        remainder: how the eigenvalues beyond the kept ones are treated (module docstring).
        probes: random vectors of the trace estimate (``remainder="trace"``).
        seed: seeds the start block and the probes.
        verify: report the true relative residual (one more batched product); else NaN.
        tol: with ``verify``, the residual ``converged`` is judged by (``None``: not judged).
    """

    name = "arnoldi"

    def __init__(self, rank: int = 50, iterations: int | None = None, block: int = 10,
                 remainder: Remainder = "last", probes: int = 10, seed: int = 0,
                 verify: bool = False, tol: float | None = None) -> None:
        super().__init__(verify=verify, tol=tol)
        self.rank = arguments.positive_integer("rank", rank)
        self.iterations = arguments.optional_positive_integer("iterations", iterations)
        if self.iterations is not None and self.iterations < self.rank:
            raise InvalidSettingError(
                f"iterations ({self.iterations}) must be at least rank ({self.rank}).")
        self.block = arguments.positive_integer("block", block)
        self.remainder = arguments.choice("remainder", remainder, ("trace", "last", "none"))
        self.probes = arguments.positive_integer("probes", probes)
        self.seed = arguments.seed("seed", seed)
        self.eigenvalues_: Tensor | None = None
        self.eigenvectors_: Tensor | None = None
        self.sigma_: float = float("inf")
        self._clamped_from: float | None = None

    def prepare(self, operator: HessianOperator) -> Arnoldi:
        super().prepare(operator)
        p = operator.dim
        rank = min(self.rank, p)
        size = min(p, max(rank, self.iterations or 2 * rank))
        block = min(self.block, size)
        generator = torch.Generator().manual_seed(self.seed)
        start = torch.randn(block, p, generator=generator, dtype=torch.float64)
        theta, vectors = krylov_eigenpairs(operator.matvec,
                                           start.to(operator.device, operator.dtype), size,
                                           progress=self.progress)
        top = torch.argsort(theta, descending=True)[:rank]
        self.eigenvalues_ = theta[top].to(operator.dtype)
        self.eigenvectors_ = vectors[top]  # (r, p)
        self._check_positive(theta)
        self.sigma_ = self._remainder_value(generator)
        return self

    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {"eigenvalues": self.eigenvalues_, "eigenvectors": self.eigenvectors_,
                   "remainder": torch.tensor(self.sigma_, dtype=torch.float64)}
        return tensors, {"clamped_from": self._clamped_from}

    def restore(self, operator: HessianOperator, tensors: dict[str, Tensor],
                values: dict) -> Arnoldi:
        super().restore(operator, tensors, values)
        self.eigenvalues_ = tensors["eigenvalues"].to(operator.device)
        self.eigenvectors_ = tensors["eigenvectors"].to(operator.device)
        self.sigma_ = float(tensors["remainder"])
        self._clamped_from = values["clamped_from"]
        return self

    def _check_positive(self, theta: Tensor) -> None:
        kept = self.eigenvalues_
        floor = 10 * torch.finfo(self.operator.dtype).eps * float(theta.abs().max())
        smallest = float(kept.min())
        if smallest <= floor:
            damping = self.operator.damping
            needed = damping + max(-smallest, 0.0) * 2 + 10 * floor
            raise IndefiniteHessianError(
                f"Arnoldi kept a Ritz value {smallest:.3g} ≤ {floor:.3g} (round-off level) among "
                f"its {kept.numel()} largest: the damped curvature is indefinite or singular "
                f"along that direction, and inverting it would give wrong or infinite scores. "
                f"Raise damping (now {damping:g}) to {needed:.2g} or more (or damping='auto'), "
                "use curvature='gauss-newton', or keep fewer pairs (rank).")

    def _remainder_value(self, generator: torch.Generator) -> float:
        op = self.operator
        p, r = op.dim, self.eigenvalues_.numel()
        if self.remainder == "none" or r >= p:
            return float("inf")
        if self.remainder == "last":
            return float(self.eigenvalues_[-1])
        probes = (torch.randint(0, 2, (self.probes, p), generator=generator) * 2 - 1)
        probes = probes.to(op.device, op.dtype)
        trace = float((probes * op.matvec(probes)).sum(dim=1).mean())
        rest = (trace - float(self.eigenvalues_.sum())) / (p - r)
        floor = op.min_shift if op.min_shift > 0 else float(self.eigenvalues_[-1]) * 1e-6
        self._clamped_from = rest if rest < floor else None
        return max(rest, floor)

    def _apply(self, V: Tensor, power: float = 1.0) -> Tensor:
        U, theta = self.eigenvectors_, self.eigenvalues_
        coefficients = V @ U.T  # (k, r)
        X = (coefficients / theta**power) @ U
        if self.sigma_ != float("inf"):
            X = X + (V - coefficients @ U) / self.sigma_**power
        return X

    def _apply_sqrt(self, V: Tensor) -> Tensor:
        return self._apply(V, 0.5)

    def _details(self) -> dict[str, float]:
        return {"rank": int(self.eigenvalues_.numel()), "remainder_eigenvalue": self.sigma_,
                "smallest_kept_eigenvalue": float(self.eigenvalues_[-1])}

    def _notes(self) -> tuple[str, ...]:
        notes = super()._notes()
        if self._clamped_from is not None:
            notes += (f"trace estimate of the remainder {self._clamped_from:.3g} raised to the "
                      f"floor {self.sigma_:.3g}",)
        return notes

    def _report_fields(self) -> dict[str, float]:
        return {"max_eigenvalue": float(self.eigenvalues_[0])}
