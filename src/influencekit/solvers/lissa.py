"""LiSSA: the stochastic Neumann-series recursion of Agarwal et al. (2016), as Koh & Liang used it.

For each right-hand side v, starting from s₀ = v, with a fresh mini-batch A_j of the damped
Hessian at every step:

    s_j = v + (1 − d)·s_{j−1} − A_j·s_{j−1} / scale,        j = 1 … depth,

then the estimate is s_depth / scale, averaged over ``repeats`` independent runs. Its fixed point
is (A + scale·d·I)⁻¹ v: the solver's own damping d adds scale·d to the Influence damping λ_d
(d = 0 by default, so all solvers answer the same question). The recursion converges only if the
eigenvalues of (A + scale·d·I)/scale lie in (0, 2); by default ``scale`` is set from a Lanczos
estimate of the largest eigenvalue of A and of its mini-batch versions, so that it does.

Its error shrinks like (1 − μ_min/scale)^j: with a condition number of 10⁴ (damping 1e-3 on a
network) that takes tens of thousands of steps. With a ``preconditioner`` M ≈ A⁻¹ (a linear
solver such as ``"ekfac"``) the same recursion runs on the equivalent system M A x = M v,

    s₀ = M v,   s_j = M v + (1 − d)·s_{j−1} − M A_j s_{j−1} / scale,

whose fixed point is unchanged while the rate is set by the eigenvalues of M A, which cluster near
1; ``scale`` is then estimated by power iteration on M A.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ..curvature import HessianOperator
from ..errors import ConvergenceWarning, SolverDivergedError
from ..spectrum import lanczos_ritz_values
from .base import Solver, SolveReport, _max_ratio


class LiSSA(Solver):
    """Stochastic inverse-HVP by the LiSSA recursion.

    Args:
        scale: divides the Hessian in the recursion; must exceed λ_max(A)/2 for every mini-batch.
            ``None``: 1.2 × the largest eigenvalue estimated over the full Hessian and a few
            mini-batch Hessians.
        depth: recursion steps per run (the error shrinks like (1 − μ_min/scale)^depth).
        repeats: independent runs averaged.
        batch_size: training examples per stochastic Hessian-vector product, drawn with
            replacement; ``batch_size ≥ n`` uses every training point at every step (then the
            recursion is deterministic and ``repeats`` is 1).
        damping: d of the recursion's (1 − d) factor (adds scale·d to the effective damping).
        seed: seeds the mini-batch sampling; the same seed gives the same answer.
        warn_residual: warn when the final relative residual exceeds this.
        tail: the estimate averages the iterates of this final fraction of the steps (Polyak
            averaging, which cuts the noise of the stochastic recursion many-fold at no cost);
            0 returns the last iterate, as in the paper.
        preconditioner: ``None`` or a linear solver (``"ekfac"``, ``"kfac"``, ``"arnoldi"`` or an
            object) whose approximate inverse M turns the recursion into one on M A x = M v.
    """

    name = "lissa"

    def __init__(self, scale: float | None = None, depth: int = 1000, repeats: int = 4,
                 batch_size: int = 64, damping: float = 0.0, seed: int = 0,
                 warn_residual: float = 0.05, tail: float = 0.5,
                 preconditioner: str | Solver | None = None) -> None:
        super().__init__()
        if scale is not None and not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        for label, value in (("depth", depth), ("repeats", repeats), ("batch_size", batch_size)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{label} must be a positive integer, got {value!r}.")
        if not 0 <= tail <= 1:
            raise ValueError(
                f"tail must lie in (0, 1] (the fraction of final steps averaged), or 0 for the "
                f"paper's last iterate; got {tail}."
            )
        if not 0 <= damping < 1:
            raise ValueError(f"damping (the recursion's d) must lie in [0, 1), got {damping}.")
        self.scale = scale
        self.depth = depth
        self.repeats = repeats
        self.batch_size = batch_size
        self.damping = damping
        self.seed = seed
        self.warn_residual = warn_residual
        self.tail = tail
        self.preconditioner = preconditioner
        self._precondition: Callable[[Tensor], Tensor] = _identity
        self.scale_: float | None = None
        self.max_eigenvalue_: float | None = None

    def prepare(self, operator: HessianOperator) -> LiSSA:
        super().prepare(operator)
        self._precondition = _identity
        if self.preconditioner is not None:
            from . import make_solver  # the registry imports this module

            inner = make_solver(self.preconditioner)
            if not inner.linear:
                raise TypeError(f"{type(inner).__name__} is not a fixed linear map and cannot "
                                "precondition LiSSA; use 'ekfac', 'kfac' or 'arnoldi'.")
            self._precondition = inner.prepare(operator).apply_inverse
        if self.scale is not None:
            self.scale_ = float(self.scale)
            return self
        self.max_eigenvalue_ = self._estimate_max_eigenvalue(operator)
        self.scale_ = 1.2 * self.max_eigenvalue_
        return self

    def _estimate_max_eigenvalue(self, op: HessianOperator, batches: int = 4,
                                 iters: int = 20) -> float:
        """Largest eigenvalue of A (or of M·A), over the full data and a few mini-batches."""
        M = self._precondition
        start = torch.randn(1, op.dim, generator=torch.Generator().manual_seed(self.seed))
        start = start.to(op.device, op.dtype)

        def largest(matvec: Callable[[Tensor], Tensor]) -> float:
            if self.preconditioner is not None:  # M·A: real positive eigenvalues, not symmetric
                return power_iteration(lambda v: M(matvec(v)), start, 2 * iters)
            return float(lanczos_ritz_values(matvec, op.dim, iters, self.seed, op.dtype,
                                             op.device)[-1])

        estimates = [largest(op.matvec)]
        generator = torch.Generator().manual_seed(self.seed + 1)
        b = min(self.batch_size, op.num_train)
        if self.batch_size >= op.num_train:
            batches = 0  # full batches only: their Hessian is the full one
        for _ in range(batches):
            idx = torch.randint(op.num_train, (1, b), generator=generator)

            def batch_matvec(v: Tensor, idx: Tensor = idx) -> Tensor:
                return op.sampled_matvec(v.unsqueeze(0), idx)[0]

            estimates.append(largest(batch_matvec))
        return max(estimates)

    def _solve(self, V: Tensor) -> Tensor:
        op = self.operator
        scale = self.scale_
        assert scale is not None
        k, p = V.shape
        full_batch = self.batch_size >= op.num_train  # deterministic: every point, every step
        R, b = (1, op.num_train) if full_batch else (self.repeats, self.batch_size)
        generator = torch.Generator().manual_seed(self.seed)
        M = self._precondition
        V_rep = M(V).unsqueeze(0).expand(R, k, p)
        S = V_rep.clone()
        limit = 1e12 * float(V_rep[0].norm()) + 1e-300
        first_averaged = self.depth - max(1, round(self.tail * self.depth)) + 1
        total = torch.zeros_like(S)
        for step in range(1, self.depth + 1):
            if full_batch:  # every point: the chunked full product, memory bounded
                product = op.matvec(S[0]).unsqueeze(0)
            else:
                product = op.sampled_matvec(S, torch.randint(op.num_train, (R, b),
                                                             generator=generator))
            if self.preconditioner is not None:
                product = M(product.reshape(R * k, p)).reshape(R, k, p)
            S = V_rep + (1.0 - self.damping) * S - product / scale
            if step >= first_averaged:
                total += S
            if step % 25 == 0 or step == self.depth:
                norm = float(S.norm())
                if not math.isfinite(norm) or norm > limit:
                    raise SolverDivergedError(self._divergence_message(step, norm))
        X = total.mean(dim=0) / (scale * (self.depth - first_averaged + 1))
        effective_damping = op.damping + scale * self.damping
        extra = scale * self.damping  # the recursion solves (A + scale·d·I) X = V
        residual = _max_ratio(op.matvec(X) + extra * X - V, V)
        self.last_report = SolveReport(
            solver=self.name, relative_residual=residual, iterations=self.depth,
            converged=not residual > self.warn_residual, damping=effective_damping,
            max_eigenvalue=self.max_eigenvalue_,
            details={"scale": scale, "repeats": R, "batch_size": b,
                     "preconditioned": float(self.preconditioner is not None)},
        )
        if residual > 1.0:
            raise SolverDivergedError(
                f"LiSSA's estimate is worse than zero: relative residual {residual:.3g} after "
                f"{self.depth} steps. {self._advice()}"
            )
        if residual > self.warn_residual:
            warnings.warn(
                f"LiSSA's relative residual is {residual:.3g} (> {self.warn_residual}) after depth="
                f"{self.depth}, repeats={R}, batch_size={b}, scale={scale:.4g}. Increase depth "
                "(slow convergence: the damped Hessian has small eigenvalues relative to scale), "
                "or batch_size/repeats (noise), or add damping.",
                ConvergenceWarning, stacklevel=3,
            )
        return X

    def _divergence_message(self, step: int, norm: float) -> str:
        what = "became NaN/inf" if not math.isfinite(norm) else f"grew to norm {norm:.3g}"
        return (f"LiSSA diverged: the estimate {what} at step {step} of {self.depth}. "
                f"{self._advice()}")

    def _advice(self) -> str:
        return (
            f"The recursion converges only when the eigenvalues of (H + damping·I)/scale lie in "
            f"(0, 2): increase scale (now {self.scale_:.4g}; scale=None estimates it), or add "
            f"damping (now {self.operator.damping:g}) if H has negative eigenvalues."
        )


def _identity(V: Tensor) -> Tensor:
    return V


def power_iteration(matvec: Callable[[Tensor], Tensor], start: Tensor, iterations: int) -> float:
    """Largest eigenvalue of a matrix with real, positive eigenvalues (e.g. M·A with M, A SPD).

    ``matvec`` maps ``(1, p)`` to ``(1, p)``; the estimate ‖B v‖ after ``iterations`` steps
    approaches λ_max from below.
    """
    v = start / start.norm()
    estimate = 0.0
    for _ in range(iterations):
        w = matvec(v)
        estimate = float(w.norm())
        if estimate == 0.0 or not math.isfinite(estimate):
            break
        v = w / estimate
    return estimate
