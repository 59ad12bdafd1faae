"""LiSSA: the stochastic Neumann-series recursion of Agarwal et al. (2016), as Koh & Liang used it.

For each right-hand side v, starting from s₀ = v, with a fresh mini-batch A_j of the damped
curvature at every step:

    s_j = v + (1 − d)·s_{j−1} − A_j·s_{j−1} / scale,        j = 1 … depth,

then the estimate is s_depth / scale, averaged over ``repeats`` independent runs. Its fixed point
is x = (A + scale·d·I)⁻¹ v: the solver's own damping d adds c = scale·d to the Influence damping
λ_d (d = 0 by default, so all solvers answer the same question). The recursion converges only if
the eigenvalues of (A + c·I)/scale lie in (0, 2); by default ``scale`` is set from a Lanczos
estimate of the largest eigenvalue of A and of its mini-batch versions, so that it does.

Its error shrinks like (1 − μ_min/scale)^j: with a condition number of 10⁴ (damping 1e-3 on a
network) that takes tens of thousands of steps. With a ``preconditioner`` M ≈ A⁻¹ (a linear
solver such as ``"ekfac"``) the recursion runs on the equivalent system M (A + c·I) x = M v,

    s₀ = M v,   s_j = M v + s_{j−1} − M (A_j + c·I) s_{j−1} / scale,

which reduces to the plain recursion for M = I and has the same fixed point, (A + c·I)⁻¹ v, for
every M: the damping is applied inside M, never as c·M⁻¹. The rate is set by the eigenvalues of
M (A + c·I), which cluster near 1. By default ``scale`` = 1.2 μ / (1 − 1.2·d·m), with μ the
largest eigenvalue of M·A (power iteration, over the full data and mini-batches) and m that of M:
then M(A + scale·d·I)/scale, whose eigenvalues are at most (μ + scale·d·m)/scale, stays below
1/1.2. That needs 1.2·d·m < 1, and as it nears 1 the scale, and scale·d with it, grows without
bound; d with 1.2·d·m > 0.5 is refused (M ≈ A⁻¹ makes m as large as 1/λ_min(A)).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import arguments
from ..curvature import HessianOperator
from ..errors import ConvergenceWarning, InvalidSettingError, SolverDivergedError, warn
from ..spectrum import lanczos_ritz_values
from .base import (
    Solver,
    make_preconditioner,
    max_ratio,
    preconditioner_state,
    restore_preconditioner,
)

logger = logging.getLogger(__name__)

#: largest 1.2·d·λ_max(M) accepted with a preconditioner: the scale at most doubles
MAX_GROWTH = 0.5


class LiSSA(Solver):
    """Stochastic inverse-HVP by the LiSSA recursion.

    Args:
        scale: divides the curvature in the recursion; must exceed λ_max(A + c·I)/2 for every
            mini-batch (with a preconditioner: of M(A + c·I)). ``None``: estimated (module
            docstring).
        depth: recursion steps per run (the error shrinks like (1 − μ_min/scale)^depth).
        repeats: independent runs averaged.
        batch_size: training examples per stochastic Hessian-vector product, drawn with
            replacement; ``batch_size ≥ n`` uses every training point at every step (then the
            recursion is deterministic and ``repeats`` is 1).
        damping: d of the recursion's (1 − d) factor, in [0, 1): adds c = scale·d to the
            effective damping, with or without a preconditioner.
        seed: seeds the mini-batch sampling and the spectrum estimates; the same seed gives the
            same answer.
        tol: the relative residual ‖(A + c·I)x − v‖/‖v‖ the estimate must reach to be reported
            as converged; a larger one warns, one above 1 (worse than x = 0) raises.
        tail: the estimate averages the iterates of this final fraction of the steps (Polyak
            averaging, which cuts the noise of the stochastic recursion many-fold at no cost);
            0 returns the last iterate, as in the paper.
        preconditioner: ``None`` or a linear solver (``"ekfac"``, ``"kfac"``, ``"arnoldi"`` or an
            object) whose approximate inverse M turns the recursion into one on
            M (A + c·I) x = M v.
    """

    name = "lissa"

    def __init__(self, scale: float | None = None, depth: int = 1000, repeats: int = 4,
                 batch_size: int = 64, damping: float = 0.0, seed: int = 0,
                 tol: float = 0.05, tail: float = 0.5,
                 preconditioner: str | Solver | None = None) -> None:
        super().__init__()
        self.scale = arguments.optional_positive("scale", scale)
        self.depth = arguments.positive_integer("depth", depth)
        self.repeats = arguments.positive_integer("repeats", repeats)
        self.batch_size = arguments.positive_integer("batch_size", batch_size)
        self.damping = arguments.real("damping (the recursion's d, in [0, 1))", damping,
                                      minimum=0.0, maximum=1.0, strict_maximum=True)
        self.seed = arguments.seed("seed", seed)
        self.tol = arguments.positive("tol", tol)
        self.tail = arguments.real("tail (the fraction of final steps averaged; 0 is the "
                                   "paper's last iterate)", tail, minimum=0.0, maximum=1.0)
        make_preconditioner(preconditioner, "LiSSA")  # checked now, prepared with the operator
        self.preconditioner = preconditioner
        self._precondition: Callable[[Tensor], Tensor] = _identity
        self._inner: Solver | None = None
        self.scale_: float | None = None
        self.max_eigenvalue_: float | None = None

    @property
    def extra_damping(self) -> float:
        """c = scale·d, added to the operator's damping by the recursion."""
        return (self.scale_ or 0.0) * self.damping

    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        tensors, values = preconditioner_state(self._inner)
        return tensors, {**values, "scale": self.scale_, "max_eigenvalue": self.max_eigenvalue_}

    def restore(self, operator: HessianOperator, tensors: dict[str, Tensor],
                values: dict) -> LiSSA:
        super().restore(operator, tensors, values)
        self._inner = restore_preconditioner(self.preconditioner, "LiSSA", operator, tensors,
                                             values)
        self._precondition = _identity if self._inner is None else self._inner.apply_inverse
        self.scale_, self.max_eigenvalue_ = values["scale"], values["max_eigenvalue"]
        return self

    def prepare(self, operator: HessianOperator) -> LiSSA:
        super().prepare(operator)
        self._precondition = _identity
        inner = self._inner = make_preconditioner(self.preconditioner, "LiSSA")
        if inner is not None:
            inner.progress = self.progress
            self._precondition = inner.prepare(operator).apply_inverse
        if self.scale is not None:
            self.scale_ = float(self.scale)
            return self
        self.max_eigenvalue_ = self._estimate_max_eigenvalue(operator)
        growth = 0.0
        if inner is not None and self.damping > 0:
            growth = 1.2 * self.damping * self._largest_preconditioner_eigenvalue(operator)
            if growth > MAX_GROWTH:
                raise InvalidSettingError(
                    f"LiSSA(damping={self.damping:g}) with a preconditioner cannot converge "
                    f"usefully: the recursion's damping enters as d·M with λ_max(M) ≈ "
                    f"{growth / (1.2 * self.damping):.3g}, and the scale that keeps it stable, "
                    "1.2·λ_max(M·A)/(1 − 1.2·d·λ_max(M)), would grow without bound (and scale·d "
                    f"with it); d must stay below {MAX_GROWTH * self.damping / growth:.3g}. Put "
                    "the damping into A instead (Influence(damping=...), applied exactly), or "
                    "lower d."
                )
        self.scale_ = 1.2 * self.max_eigenvalue_ / (1.0 - growth)
        return self

    def _largest_preconditioner_eigenvalue(self, op: HessianOperator, iters: int = 40) -> float:
        """λ_max(M) by power iteration (M is symmetric positive definite)."""
        start = torch.randn(1, op.dim, generator=torch.Generator().manual_seed(self.seed + 2),
                            dtype=torch.float64).to(op.device, op.dtype)
        return power_iteration(self._precondition, start, iters)

    def _estimate_max_eigenvalue(self, op: HessianOperator, batches: int = 4,
                                 iters: int = 20) -> float:
        """Largest eigenvalue of A (or of M·A), over the full data and a few mini-batches."""
        M = self._precondition
        start = torch.randn(1, op.dim, generator=torch.Generator().manual_seed(self.seed),
                            dtype=torch.float64).to(op.device, op.dtype)

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
        preconditioned = self.preconditioner is not None
        extra = self.extra_damping  # c: the recursion solves (A + c·I) X = V
        V_rep = M(V).unsqueeze(0).expand(R, k, p)
        S = V_rep.clone()
        limit = 1e12 * float(V_rep[0].norm()) + 1e-300
        first_averaged = self.depth - max(1, round(self.tail * self.depth)) + 1
        total = torch.zeros_like(S)
        bar = tqdm(range(1, self.depth + 1), desc="LiSSA steps", leave=False,
                   disable=not self.progress)
        for step in bar:
            if full_batch:  # every point: the chunked full product, memory bounded
                product = op.matvec(S[0]).unsqueeze(0)
            else:
                product = op.sampled_matvec(S, torch.randint(op.num_train, (R, b),
                                                             generator=generator))
            if extra:
                product = product + extra * S
            if preconditioned:
                product = M(product.reshape(R * k, p)).reshape(R, k, p)
            S = V_rep + S - product / scale
            if step >= first_averaged:
                total += S
            if step % 25 == 0 or step == self.depth:
                norm = float(S.norm())
                bar.set_postfix(norm=f"{norm:.3g}")
                logger.debug("LiSSA step %d: ‖s‖ = %.4g", step, norm)
                if not math.isfinite(norm) or norm > limit:
                    raise SolverDivergedError(self._divergence_message(step, norm))
        X = total.mean(dim=0) / (scale * (self.depth - first_averaged + 1))
        self._check_output(X)
        residual = max_ratio(op.matvec(X) + extra * X - V, V)
        converged = residual <= self.tol
        details = {"scale": scale, "repeats": R, "batch_size": b,
                   "preconditioned": float(preconditioned), "recursion_damping": extra}
        if self.max_eigenvalue_ is not None:  # over the full data and mini-batches
            key = "largest_eigenvalue_of_MA" if preconditioned else "largest_eigenvalue_estimate"
            details[key] = self.max_eigenvalue_
        self.last_report = self._report(
            residual, converged, iterations=self.depth, tolerance=self.tol,
            damping=op.damping + extra, details=details)
        logger.info("LiSSA: %d steps, relative residual %.3e (tol %g).", self.depth, residual,
                    self.tol)
        if residual > 1.0:
            raise SolverDivergedError(
                f"LiSSA's estimate is worse than zero: relative residual {residual:.3g} after "
                f"{self.depth} steps. {self._advice()}"
            )
        if not converged:
            warn(
                f"LiSSA's relative residual is {residual:.3g} (> tol={self.tol}) after depth="
                f"{self.depth}, repeats={R}, batch_size={b}, scale={scale:.4g}. Increase depth "
                "(slow convergence: the damped curvature has small eigenvalues relative to "
                "scale), or batch_size/repeats (noise), add damping"
                + (", or use a preconditioner (preconditioner='ekfac')."
                   if self.preconditioner is None else "."),
                ConvergenceWarning,
            )
        return X

    def _divergence_message(self, step: int, norm: float) -> str:
        what = "became NaN/inf" if not math.isfinite(norm) else f"grew to norm {norm:.3g}"
        return (f"LiSSA diverged: the estimate {what} at step {step} of {self.depth}. "
                f"{self._advice()}")

    def _advice(self) -> str:
        return (
            f"The recursion converges only when the eigenvalues of (A + scale·d·I)/scale (with a "
            f"preconditioner M: of M(A + scale·d·I)/scale) lie in "
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
