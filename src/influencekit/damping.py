"""``damping="auto"``: the damping λ_d chosen from the curvature's own spectrum, with the reason.

The influence of the paper needs A = C + λ_d·I positive definite, and in floating point also
well enough conditioned that its inverse is not round-off. Given estimates of the extreme
eigenvalues of the undamped curvature C (weight decay included) — exact from Direct's
eigendecomposition, from K-FAC's factors, or from 30 seeded Lanczos steps otherwise — the rule
is, with ρ = 1e-6 in float64 and 1e-3 in float32 (the largest condition number 1/ρ each
precision solves to its default tolerance):

- λ_min ≥ ρ·λ_max: no damping (λ_d = 0). A convex model with weight decay lands here, and its
  scores stay the exact influence of the paper.
- otherwise: λ_d = ρ·λ_max + 3·max(−λ_min, 0), rounded up to two significant digits. The damped
  curvature is then positive definite with condition number about 1/ρ even if the true λ_min is
  twice as negative as the estimate (a Lanczos Ritz value bounds λ_min from above).

A Lanczos estimate of λ_min is only an upper bound, so it cannot show that no damping is needed.
Where a lower bound is known — the Gauss-Newton matrix of a loss convex in the model output is
positive semi-definite, so its λ_min is at least the smallest weight decay λ_min(diag(λ)) — the
first case is decided on that bound, and λ_d = ρ·λ_max − that bound otherwise (a rank-deficient
Gauss-Newton matrix without weight decay gets ρ·λ_max). For the Hessian, whose data part can be
indefinite, no such bound exists: when the Ritz values are all above ρ·λ_max the curvature only
*appears* positive definite, λ_d = 0, and the reason says so; CG refuses the solve if it then
meets non-positive curvature.

The chosen value and the reason are reported (``Influence.damping_``, ``Influence.damping_reason_``
and every :class:`~influencekit.solvers.SolveReport`). A trained network's Hessian is usually
indefinite; a damping chosen this way makes it solvable, but the scores are then those of the
damped curvature (see the README's recipe for networks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import IndefiniteHessianError
from .spectrum import SpectrumEstimate

#: the smallest λ_min/λ_max solved without damping, per dtype
RELATIVE_FLOOR = {torch.float64: 1e-6, torch.float32: 1e-3}
#: how many times the estimated negative part of the spectrum is added
NEGATIVE_MARGIN = 3.0


@dataclass(frozen=True)
class DampingChoice:
    """The damping picked by ``damping="auto"``, and why.

    Attributes:
        value: λ_d.
        reason: one sentence with the figures it was decided on.
        estimate: the spectrum estimate it came from.
    """

    value: float
    reason: str
    estimate: SpectrumEstimate


def _round_up(value: float) -> float:
    """``value`` rounded up to two significant digits (0.001234 → 0.0013)."""
    step = 10.0 ** (math.floor(math.log10(value)) - 1)
    return float(f"{math.ceil(value / step) * step:.12g}")


def choose_damping(estimate: SpectrumEstimate, dtype: torch.dtype,
                   lower_bound: float | None = None) -> DampingChoice:
    """λ_d by the rule of the module docstring from ``estimate`` of C's extreme eigenvalues and,
    if known, a proven ``lower_bound`` of λ_min(C)."""
    rho = RELATIVE_FLOOR.get(dtype, 1e-2)
    low, high = estimate.low, estimate.high
    span = f"[{low:.3g}, {high:.3g}] ({estimate.method})"
    if not (math.isfinite(low) and math.isfinite(high)):
        raise IndefiniteHessianError(
            f"damping='auto' cannot choose a damping: the curvature's eigenvalue estimates are "
            f"not finite, {span}. Check the model and data for overflow, or pass damping=...")
    if high <= 0:
        raise IndefiniteHessianError(
            f"damping='auto' found no positive curvature: eigenvalues in {span}. The loss does "
            "not curve around θ̂ (a model that does not depend on the tracked parameters, or "
            "one far from a minimum); pass damping=... explicitly or check params=...")
    floor = rho * high
    if not estimate.exact and lower_bound is not None:
        if lower_bound >= floor:
            return DampingChoice(0.0, f"no damping needed: the curvature is positive definite, "
                                      f"λ_min ≥ {lower_bound:.3g} (the weight decay; the data "
                                      f"part is positive semi-definite) ≥ {rho:g}·λ_max, "
                                      f"eigenvalues in {span}", estimate)
        value = _round_up(floor - lower_bound)
        return DampingChoice(value, f"damping {value:g}: λ_min is only known to be ≥ "
                                    f"{lower_bound:.3g} (the weight decay), below {rho:g}·λ_max; "
                                    f"eigenvalues in {span}; λ_d = {rho:g}·λ_max − "
                                    f"{lower_bound:.3g}", estimate)
    if low >= floor:
        verdict = ("positive definite" if estimate.exact else
                   "apparently positive definite (a Ritz value bounds λ_min only from above)")
        return DampingChoice(0.0, f"no damping needed: the curvature is {verdict} with "
                                  f"eigenvalues in {span}, condition number "
                                  f"{high / low:.3g} ≤ {1 / rho:g}", estimate)
    value = _round_up(floor + NEGATIVE_MARGIN * max(-low, 0.0))
    why = ("indefinite" if low < 0 else "too ill-conditioned for its dtype")
    return DampingChoice(
        value, f"damping {value:g}: the curvature is {why}, eigenvalues in {span}; "
               f"λ_d = {rho:g}·λ_max + {NEGATIVE_MARGIN:g}·max(−λ_min, 0)", estimate)
