"""CG's ``preconditioner="auto"``: no preconditioner, EK-FAC, or EK-FAC deflated, chosen from
the solve itself.

Block CG over many right-hand sides builds a Krylov space of (right-hand sides × iterations)
dimensions, and that space finds a Hessian's outlying eigenvalues by itself: on all four
benchmark problems (``benchmarks/compare_problems.py``, damping 1e-3 on the mean loss, 100
right-hand sides) plain block CG converged in fewer products than with EK-FAC (digits MLP 562
against 683–755, CNN 486 against 651, GELU MLP 209 against 211, SiLU MLP 1,372 against 1,761), and
an EK-FAC application costs about a sixth of a product on top. Where plain CG is slow, EK-FAC
helps, and a deflated EK-FAC (:class:`~influencekit.solvers.Deflated`) cuts CG's iterations further
where EK-FAC leaves a wide spectrum, but its Lanczos run costs products and preconditioner
applications of its own. So every solve starts plain and changes course only on what it measures:

1. Plain CG. Over ``PLAIN_WIDTH`` or more right-hand sides block CG stays plain unless it
   stalls (:func:`stalled`): its first iterations' contraction says little there (on the SiLU MLP
   the largest relative residual rose to 1.02 in the first iteration, then plain CG finished in
   14 iterations and 1,372 products where the path through EK-FAC and its deflation took 19 and
   1,761). With fewer right-hand sides, or independent recurrences, after the first iteration
   the contraction projects the iterations still needed (below); if that is more than
   ``PLAIN_AT_MOST``, CG switches to EK-FAC. A switch restarts from the current solution (the
   residual reached is kept, only the Krylov space is rebuilt).
2. On EK-FAC, what an iteration costs is measured: t_v, the seconds per Hessian-vector product
   in CG's blocks, and t_M, the seconds per vector of one EK-FAC application. From iteration j =
   ``DECIDE_FROM`` = 1 on, while this solve runs on EK-FAC alone (j counted from the switch),
   the last contraction projects the iterations still needed:

    ρ = r_j / r_(j−1)                  the last iteration's contraction (r_0 = 1 from X = 0)
    N = ⌈log(tol / r_j) / log ρ⌉        iterations left at that rate (∞ if ρ ≥ 1),

divided by ``FIRST_CONTRACTION_OVERSTATES`` after the first iteration (block CG accelerates: on
the GELU MLP the first contraction projected 6 more iterations where 2 were taken, on the
benchmark MLP 31 where 10 were), and capped by what CG can still take: block CG ends once its
search space spans all p dimensions (at most ⌈(p − s)/w⌉ more after s products), one recurrence
per column after p iterations. Here r is the largest relative residual ‖r_i‖/‖v_i‖ over the
right-hand sides. Deflation is built when N ≥ ``MIN_REMAINING`` and the time it is expected to
save exceeds its Lanczos run's:

    SAVING · N · w · (t_v + t_M)  >  L · (t_v · (m / n) · LANCZOS_BLOCK_COST + t_M) · c

(w: the block width, products per iteration; L = min(2·``RANK``, p) Lanczos products on the m
heaviest of n training examples, those that carry ``SUBSET_MASS`` of the curvature weight, each
followed by one application of EK-FAC (``spectrum.preconditioned_krylov_eigenpairs``); c =
``REORTHOGONALISATION``, the run's own work on top of those). CG then switches to EK-FAC
deflated at ``RANK`` Ritz pairs and restarts from its current solution: the residual reached is
kept, only the Krylov space is rebuilt. After the first iteration that restart is cheap: on the
benchmark MLP 7 iterations and 644 products, against 7 and 603 deflated before the first iteration.

The costs are measured once (by process 0 under torch.distributed), kept with the fit and reused
by every later solve, and the deflation is built once (seeded); each solve starts plain and
decides from its own convergence, so the same right-hand sides always take the same path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECIDE_FROM = 1
# plain block CG is kept where its first iteration projects at most this many more (the
# projection discounted as below); it projected 2-3 on the three benchmark problems where it
# was fastest
PLAIN_AT_MOST = 4
# block CG over at least this many right-hand sides stays plain unless it stalls: on all four
# benchmark problems (100 right-hand sides) plain block CG needed the fewest products
PLAIN_WIDTH = 32
# ... it stalls when its residual shrinks by less than this per iteration over two iterations
# (the slowest two-iteration rate on the four problems was 0.85, from the start on the SiLU MLP)
STALLED = 0.9
# block CG accelerates: the first contraction's projection, divided by this, is the estimate
# (measured 2.9x on the GELU MLP, 3.1x on the benchmark MLP)
FIRST_CONTRACTION_OVERSTATES = 3.0
MIN_REMAINING = 2  # fewer projected iterations leave nothing for deflation to save
SAVING = 0.35  # share of the remaining iterations deflation removed (at least) on the benchmarks
# a product in Lanczos' blocks of 10 against one in CG's blocks of 100, per example: measured
# 1.98 on the GELU MLP and 1.47 on the benchmark MLP (2 threads)
LANCZOS_BLOCK_COST = 2.0
# the Lanczos run's own work (orthogonalisation, Rayleigh-Ritz) on top of its products and
# applications: measured 1.5x on the GELU MLP, 1.4x on the benchmark MLP
REORTHOGONALISATION = 1.5
SUBSET_MASS = 0.9
RANK = 80


@dataclass(frozen=True)
class StepCosts:
    """Seconds measured in a solve's first iteration: ``product``, per Hessian-vector product
    in CG's blocks; ``apply``, per vector of one preconditioner application."""

    product: float
    apply: float


@dataclass(frozen=True)
class DeflationPlan:
    """What to deflate: ``rank`` Ritz pairs of a Lanczos run of ``iterations`` products on the
    ``subset`` heaviest training examples, decided when ``projected`` iterations were left.
    ``upfront`` (decided before the first iteration) is no longer chosen; it is kept so that
    fits saved before can be loaded."""

    rank: int
    iterations: int
    subset: int
    projected: float
    upfront: bool = False


def stalled(ratios: list[float]) -> bool:
    """Whether plain block CG stalls: (r_j / r_(j−2))^½ > ``STALLED`` for the last residuals
    r_(j−2), r_(j−1), r_j of one recurrence (r_0 its starting residual: 1 from X = 0);
    ``False`` before two iterations."""
    if len(ratios) < 3 or not ratios[-3] > 0:
        return False
    return (ratios[-1] / ratios[-3]) ** 0.5 > STALLED


def projected_iterations(previous: float, current: float, tol: float) -> float:
    """N = ⌈log(tol / r_j) / log ρ⌉ with ρ = r_j / r_(j−1) (module docstring); 0 when
    converged, ∞ when the last iteration did not lower the residual."""
    if current <= tol:
        return 0.0
    if not 0 < current < previous:
        return math.inf
    return float(math.ceil(math.log(tol / current) / math.log(current / previous)))


def remaining_iterations(previous: float, current: float, tol: float, iteration: int) -> float:
    """The iterations still needed as the rule counts them: :func:`projected_iterations`,
    divided by ``FIRST_CONTRACTION_OVERSTATES`` (rounded up) after the first iteration."""
    projected = projected_iterations(previous, current, tol)
    if iteration == 1 and math.isfinite(projected):
        return float(math.ceil(projected / FIRST_CONTRACTION_OVERSTATES))
    return projected


def plan_deflation(remaining: float, width: int, subset: int, num_train: int, dim: int,
                   costs: StepCosts, most: float = math.inf) -> DeflationPlan | None:
    """The deflation to switch to now, or ``None`` where it is not expected to pay (module
    docstring's rule).

    Args:
        remaining: the iterations still needed (:func:`remaining_iterations`).
        width: products per iteration (the block width).
        subset: the training examples the Lanczos run would use (those carrying
            ``SUBSET_MASS`` of the curvature weight).
        num_train: n.
        dim: p (a Lanczos run stops at p products).
        costs: the measured seconds per product and per preconditioner application.
        most: the iterations CG can still take at all (module docstring).
    """
    remaining = min(remaining, most)
    if remaining < MIN_REMAINING:
        return None
    saved = SAVING * remaining * width * (costs.product + costs.apply)
    if saved <= lanczos_seconds(subset, num_train, dim, costs):
        return None
    return DeflationPlan(rank=RANK, iterations=2 * RANK, subset=subset, projected=remaining)


def lanczos_seconds(subset: int, num_train: int, dim: int, costs: StepCosts) -> float:
    """The deflation's Lanczos run in seconds: L · (t_v · (m / n) · LANCZOS_BLOCK_COST + t_M)
    · REORTHOGONALISATION with L = min(2·RANK, p) (module docstring)."""
    products = min(2 * RANK, dim)
    per_product = (costs.product * (subset / max(num_train, 1)) * LANCZOS_BLOCK_COST
                   + costs.apply)
    return products * per_product * REORTHOGONALISATION
