"""CG's ``preconditioner="auto"``: EK-FAC first, deflated only where the solve shows it pays.

A deflated EK-FAC preconditioner (:class:`~influencekit.solvers.Deflated`) cuts CG's iterations
where EK-FAC leaves a wide spectrum, but its Lanczos run costs products of its own, and where
EK-FAC alone converges in a few iterations that run costs more than it saves. On the four
benchmark problems (``benchmarks/compare_problems.py``) EK-FAC alone needed 3, 11 and 46 block CG
iterations where EK-FAC deflated at 80 Ritz pairs needed 2, 7 and 13: the same preconditioner
can be right on one model and wasteful on another. So the choice is made from the solve itself.

Before the first iteration, deflation is built at once where its Lanczos run is cheap next to the
products it saves even on the easiest benchmark problem, where EK-FAC alone needed
``EKFAC_ITERATIONS_AT_LEAST`` = 3 iterations:

    SAVING · 3 · w  >  L · (m / n) · LANCZOS_BLOCK_COST

(symbols below). Deciding later costs more where deflation is needed: a switch mid-solve restarts
the Krylov space, and on the benchmark MLP EK-FAC, deflated after iteration 2, took 8 iterations
and 725 products, against 7 and 620 deflated from the start. With few right-hand sides the run
is not cheap next to an iteration, and the decision waits for the solve's own convergence.

Otherwise block CG starts with EK-FAC. From iteration j = ``DECIDE_FROM`` on, while this solve
still runs on EK-FAC alone, the last iteration's contraction projects the iterations still needed:

    ρ = r_j / r_(j−1)                  the last iteration's contraction
    N = ⌈log(tol / r_j) / log ρ⌉        iterations left at that rate (∞ if ρ ≥ 1),

capped by what CG can still take: block CG ends once its search space spans all p dimensions
(at most ⌈(p − s)/w⌉ more after s products), one recurrence per column after p iterations. Here r
is the largest relative residual ‖r_i‖/‖v_i‖ over the right-hand sides. Deflation is built
when N ≥ ``MIN_REMAINING`` and the products it is expected to save exceed its Lanczos run's:

    SAVING · N · w  >  L · (m / n) · LANCZOS_BLOCK_COST

(w: the block width, products per iteration; L = min(2·``RANK``, p) Lanczos products on the m
heaviest of n training examples, those that carry ``SUBSET_MASS`` of the curvature weight). CG
then switches to EK-FAC deflated at ``RANK`` Ritz pairs and restarts from its current solution:
the residual reached is kept, only the Krylov space is rebuilt. The deflation is built once
(seeded) and reused by every later solve that switches; each solve starts from EK-FAC and
decides from its own convergence, so its answer does not depend on what was solved before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EKFAC_ITERATIONS_AT_LEAST = 3  # the fewest EK-FAC alone needed on the benchmark problems
DECIDE_FROM = 2  # block CG accelerates: its first contraction overstates the iterations left
MIN_REMAINING = 2  # fewer projected iterations leave nothing for deflation to save
SAVING = 0.35  # share of the remaining iterations deflation removed (at least) on the benchmarks
# a product in Lanczos' blocks of 10 against one in CG's blocks of 100, per example: measured
# 1.98 on the GELU MLP and 1.47 on the benchmark MLP (2 threads)
LANCZOS_BLOCK_COST = 2.0
SUBSET_MASS = 0.9
RANK = 80


@dataclass(frozen=True)
class DeflationPlan:
    """What to deflate: ``rank`` Ritz pairs of a Lanczos run of ``iterations`` products on the
    ``subset`` heaviest training examples, decided when ``projected`` iterations were left (or
    ``upfront``, before the first iteration)."""

    rank: int
    iterations: int
    subset: int
    projected: float
    upfront: bool = False  # decided before the first iteration


def projected_iterations(previous: float, current: float, tol: float) -> float:
    """N = ⌈log(tol / r_j) / log ρ⌉ with ρ = r_j / r_(j−1) (module docstring); 0 when
    converged, ∞ when the last iteration did not lower the residual."""
    if current <= tol:
        return 0.0
    if not 0 < current < previous:
        return math.inf
    return float(math.ceil(math.log(tol / current) / math.log(current / previous)))


def plan_deflation(previous: float, current: float, tol: float, width: int, subset: int,
                   num_train: int, dim: int, most: float = math.inf) -> DeflationPlan | None:
    """The deflation to switch to now, or ``None`` where it is not expected to pay (module
    docstring's rule).

    Args:
        previous, current: the largest relative residual after the last two iterations.
        tol: the solve's tolerance.
        width: products per iteration (the block width).
        subset: the training examples the Lanczos run would use (those carrying
            ``SUBSET_MASS`` of the curvature weight).
        num_train: n.
        dim: p (a Lanczos run stops at p products).
        most: the iterations CG can still take at all (module docstring).
    """
    remaining = min(projected_iterations(previous, current, tol), most)
    if remaining < MIN_REMAINING or SAVING * remaining * width <= lanczos_cost(subset,
                                                                               num_train, dim):
        return None
    return DeflationPlan(rank=RANK, iterations=2 * RANK, subset=subset, projected=remaining)


def plan_upfront(width: int, subset: int, num_train: int, dim: int) -> DeflationPlan | None:
    """The deflation to build before the first iteration, or ``None`` where the decision waits
    for the solve's convergence: SAVING · 3 · w > L · (m / n) · LANCZOS_BLOCK_COST (module
    docstring)."""
    if SAVING * EKFAC_ITERATIONS_AT_LEAST * width <= lanczos_cost(subset, num_train, dim):
        return None
    return DeflationPlan(rank=RANK, iterations=2 * RANK, subset=subset, projected=0.0,
                         upfront=True)


def lanczos_cost(subset: int, num_train: int, dim: int) -> float:
    """The deflation's Lanczos run in products over all n examples in CG's wide blocks:
    L · (m / n) · LANCZOS_BLOCK_COST with L = min(2·RANK, p)."""
    return min(2 * RANK, dim) * (subset / max(num_train, 1)) * LANCZOS_BLOCK_COST
