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
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..curvature import HessianOperator
from ..spectrum import krylov_eigenpairs
from .base import Solver, SolveReport

Remainder = Literal["trace", "last", "none"]


class Arnoldi(Solver):
    """Low-rank (Lanczos/Arnoldi) inverse with the rest of the spectrum handled.

    Args:
        rank: eigenpairs kept (r).
        iterations: Krylov dimension m ≥ rank (default 2·rank, rounded up to whole blocks).
        block: vectors multiplied per pass over the data.
        remainder: how the eigenvalues beyond the kept ones are treated (module docstring).
        probes: random vectors of the trace estimate (``remainder="trace"``).
        seed: seeds the start block and the probes.
        verify: report the true relative residual (one more batched product); else NaN.
    """

    name = "arnoldi"
    linear = True

    def __init__(self, rank: int = 50, iterations: int | None = None, block: int = 10,
                 remainder: Remainder = "last", probes: int = 10, seed: int = 0,
                 verify: bool = False) -> None:
        super().__init__()
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"rank must be a positive integer, got {rank!r}.")
        if iterations is not None and iterations < rank:
            raise ValueError(f"iterations ({iterations}) must be at least rank ({rank}).")
        if remainder not in ("trace", "last", "none"):
            raise ValueError(f"remainder must be 'trace', 'last' or 'none', got {remainder!r}.")
        self.rank = rank
        self.iterations = iterations
        self.block = block
        self.remainder = remainder
        self.probes = probes
        self.seed = seed
        self.verify = verify
        self.eigenvalues_: Tensor | None = None
        self.eigenvectors_: Tensor | None = None
        self.sigma_: float = float("inf")

    def prepare(self, operator: HessianOperator) -> Arnoldi:
        super().prepare(operator)
        p = operator.dim
        rank = min(self.rank, p)
        size = min(p, max(rank, self.iterations or 2 * rank))
        block = min(self.block, size)
        generator = torch.Generator().manual_seed(self.seed)
        start = torch.randn(block, p, generator=generator, dtype=torch.float64)
        theta, vectors = krylov_eigenpairs(operator.matvec,
                                           start.to(operator.device, operator.dtype), size)
        top = torch.argsort(theta, descending=True)[:rank]
        self.eigenvalues_ = theta[top].to(operator.dtype)
        self.eigenvectors_ = vectors[top]  # (r, p)
        self.sigma_ = self._remainder_value(generator)
        return self

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
        return max(rest, op.shift) if op.shift > 0 else max(rest, 1e-12)

    def _apply(self, V: Tensor, power: float = 1.0) -> Tensor:
        U, theta = self.eigenvectors_, self.eigenvalues_
        coefficients = V @ U.T  # (k, r)
        X = (coefficients / theta**power) @ U
        if self.sigma_ != float("inf"):
            X = X + (V - coefficients @ U) / self.sigma_**power
        return X

    def apply_inverse_sqrt(self, V: Tensor) -> Tensor:
        return self._apply(V.to(device=self.operator.device, dtype=self.operator.dtype), 0.5)

    def _solve(self, V: Tensor) -> Tensor:
        X = self._apply(V)
        self.last_report = SolveReport(
            solver=self.name,
            relative_residual=self._relative_residual(X, V) if self.verify else float("nan"),
            damping=self.operator.damping,
            max_eigenvalue=float(self.eigenvalues_[0]),
            details={"rank": int(self.eigenvalues_.numel()), "remainder_eigenvalue": self.sigma_,
                     "smallest_kept_eigenvalue": float(self.eigenvalues_[-1])},
        )
        return X
