"""Conjugate gradients on A·X = V for many right-hand sides at once.

Two variants, both forming the products A·P of a whole block in one batched pass over the data:

- ``block=True`` (default): block CG with one Krylov space shared by all right-hand sides, in the
  breakdown-free form of Ji & Li (2017, "A breakdown-free block conjugate gradient method"):

      R = V − A·X,  Z = M·S(R),  P = orth(Z)
      repeat:  Q = A·P;  α = (PᵀQ)⁻¹ PᵀR;  X += P·α;  R −= Q·α
               Z = M·S(R);  β = −(PᵀQ)⁻¹ QᵀZ;  P = orth(Z + P·β)

  ``orth`` keeps an orthonormal basis of the columns and drops (numerically) dependent ones, so
  the block shrinks instead of breaking down (:func:`~influencekit.linalg.conditioned_columns`:
  Z·V·Λ^-½ from the Gram matrix ZᵀZ = VΛVᵀ where Z is well conditioned, as it is on plain block
  CG's every step on the benchmark MLP, about a third of the time of a Householder QR;
  rank-revealing QR otherwise). The residual's Gram matrix RᵀR, formed once per step, gives
  both the column norms of the stopping rule and S(R) below. Each right-hand side sees the
  search directions of all the others, so the iteration count falls far below that of
  independent CG.

  S(R) picks what to search next. Each column is scaled by its right-hand side's norm,
  N = R·diag(‖v_j‖)⁻¹, so that a small right-hand side counts as much as a large one (the stopping
  rule is relative per column). N = U Σ Wᵀ; only the directions u_i whose singular value σ_i
  exceeds ``truncate`` × tol are searched, S(R) = U_kept. Every column's residual outside them is
  at most σ_(r+1) ≤ truncate·tol, so they cannot keep a column from converging; once the residual
  is nearly converged it is numerically low-rank and the block narrows, e.g. from 100 to 69 to 27
  directions on the benchmark MLP: 596 Hessian-vector products instead of 700 at the same
  tolerance. Directions dropped once come back if their share grows: S is recomputed from the
  true recurrence residual every iteration, and the stopping rule is unchanged.
- ``block=False``: one classic CG recurrence per right-hand side, batched.

M is an optional preconditioner (another prepared solver whose ``solve`` approximates A⁻¹, e.g.
``"ekfac"``). ``"auto"`` decides by the rule of :mod:`.adaptive`: it starts without a
preconditioner, moves to EK-FAC where plain CG's first iteration projects a long solve, and from
EK-FAC to a deflated EK-FAC (:class:`~.deflated.Deflated`) once the measured convergence projects
that deflation saves more time than its Lanczos run costs, both timed on this machine (CG
restarts from its current solution at each change). The deflation is built once; every solve
decides anew which path to take.

With ``negligible=ε`` > 0 the solve runs in two phases. Most training examples of a trained
classifier are fitted confidently and add almost nothing to the curvature (on the benchmark GELU
MLP the lightest 48% of the examples carry 1e-5 of the total curvature weight, see
:meth:`~influencekit.curvature.HessianOperator.curvature_weights`). Split A = A_S + C_L: A_S over
the heaviest examples (with the whole λ + λ_d), C_L the data curvature of the lightest ones,
whose weights sum to at most ε of the total. Phase 1 runs CG on A_S to tol/2; its products cost
|S|/n of A's. Phase 2 forms the residual on the full A without a full product,
R = (V − A_S·X) − C_L·X (the recurrence's residual, minus one product over the light examples
only), and where it is above tol continues CG on A from X. So the answer meets tol on A, however
much was left out, at the price of 1 − |S|/n of one product per right-hand side.

A right-hand side is done when its recurrence residual ‖R_j‖/‖V_j‖ ≤ ``tol``; the reported
residual is then recomputed as ‖A·X − V‖ (``verify=True``, the default), and ``converged`` says
whether that recomputed residual meets ``tol``. Non-positive curvature means
A is not positive definite and is refused with advice.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import arguments, distributed
from ..curvature import HessianOperator
from ..errors import ConvergenceWarning, IndefiniteHessianError, SolverDivergedError, warn
from ..linalg import conditioned_columns
from .adaptive import (
    DECIDE_FROM,
    MIN_REMAINING,
    PLAIN_AT_MOST,
    PLAIN_WIDTH,
    SUBSET_MASS,
    DeflationPlan,
    StepCosts,
    plan_deflation,
    remaining_iterations,
    stalled,
)
from .base import (
    Solver,
    make_preconditioner,
    max_ratio,
    preconditioner_state,
    prefixed,
    restore_preconditioner,
    unprefixed,
)
from .deflated import Deflated, heaviest_count

logger = logging.getLogger(__name__)

DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
AUTO = "auto"
LIGHT_TOL_SHARE = 0.5  # phase 1 (negligible > 0) runs to this share of tol, leaving room for
#                        the curvature it left out


class CG(Solver):
    """Conjugate gradients, block (shared Krylov space) or independent, optionally preconditioned.

    Args:
        tol: relative residual ‖A·x − v‖/‖v‖ to reach; ``None`` picks 1e-10 in float64 and 1e-5
            in float32 (lower precisions: 1e-3).
        max_iter: iteration cap; a warning reports the residual if it is hit.
        block: share one Krylov space across the right-hand sides (see the module docstring).
        preconditioner: ``None``, a solver name (``"ekfac"``, ``"kfac"``, ``"arnoldi"``) or a
            solver object; it is prepared on the same operator and its ``solve`` is used as M.
            ``"auto"``: none, EK-FAC or a deflated EK-FAC, as the rule of :mod:`.adaptive`
            decides during the solve (module docstring); the report's notes say what was
            chosen and why.
        verify: recompute the true residual ‖A·X − V‖ at the end (one more batched product);
            ``converged`` is judged on it. ``False`` reports it as NaN and ``converged=None``
            (the recurrence's estimate stays in ``details``).
        truncate: block CG searches only the residual's directions with singular value above
            ``truncate`` × tol (module docstring); 0 searches all of them. In [0, 1].
        negligible: leave out of the products, until a final measured check over all examples,
            the lightest training examples whose curvature weights sum to at most this share
            of the total (module docstring); 0 (the default) uses every example throughout.
            In [0, 1).
    """

    name = "cg"

    def __init__(self, tol: float | None = None, max_iter: int = 1000, block: bool = True,
                 preconditioner: str | Solver | None = None, verify: bool = True,
                 truncate: float = 0.3, negligible: float = 0.0) -> None:
        super().__init__()
        self.tol = arguments.optional_positive("tol", tol)
        self.max_iter = arguments.positive_integer("max_iter", max_iter)
        self.block = arguments.flag("block", block)
        self.verify = arguments.flag("verify", verify)
        self.truncate = arguments.real("truncate", truncate, minimum=0.0, maximum=1.0)
        self.negligible = arguments.real("negligible", negligible, minimum=0.0, maximum=1.0,
                                         strict_maximum=True)
        self._split: tuple[HessianOperator, ...] | None = None  # negligible > 0: built once
        self._split_refused = False  # A_S was indefinite: nothing is left out
        self._active: HessianOperator | None = None  # the operator the products use now
        if preconditioner != AUTO:  # checked now, prepared with the operator
            make_preconditioner(preconditioner, "CG")
        self.preconditioner = preconditioner
        self.deflation_: DeflationPlan | None = None  # "auto": the deflation built, if any
        self._deflated: Deflated | None = None  # ... built once, reused by later solves
        self._deflated_at: int | None = None  # after which iteration this solve switched to it
        self._ekfac_from: int | None = None  # after which iteration this solve moved to EK-FAC
        self._plain_projected = math.nan  # the iterations plain CG projected after its first
        self._ratios: list[float] = []  # this recurrence's residuals so far, from its first
        self._wide = False  # block CG over PLAIN_WIDTH or more right-hand sides
        self._projected = 0.0  # the iterations projected when it switched
        self._weights: Tensor | None = None  # the operator's curvature weights, computed once
        self._precondition: Callable[[Tensor], Tensor] | None = None
        self._inner: Solver | None = None
        self._inner_fitted = False  # "auto" fits EK-FAC only when a solve moves to it
        self._products = 0  # Hessian-vector products of the last solve

    def _base_preconditioner(self) -> str | Solver | None:
        return "ekfac" if self.preconditioner == AUTO else self.preconditioner

    def prepare(self, operator: HessianOperator) -> CG:
        super().prepare(operator)
        self.deflation_, self._deflated, self._split, self._weights = None, None, None, None
        self._split_refused = False
        self._costs: StepCosts | None = None
        self._timings: dict[str, float] = {}
        self._precondition, self._inner = None, make_preconditioner(self._base_preconditioner(),
                                                                    "CG")
        self._inner_fitted = False
        if self._inner is not None and self.preconditioner != AUTO:  # "auto": fitted if used
            self._precondition = self._fitted_inner().apply_inverse
        return self

    def _fitted_inner(self) -> Solver:
        """The preconditioner, prepared on the operator the first time it is needed (with
        ``"auto"`` only once a solve moves to EK-FAC)."""
        if not self._inner_fitted:
            self._inner.progress = self.progress
            self._inner.prepare(self.operator)
            self._inner_fitted = True
        return self._inner

    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        tensors, values = preconditioner_state(self._inner if self._inner_fitted else None)
        if self.preconditioner == AUTO:  # the deflation, if a solve built it
            values["auto_deflation"] = None
            values["auto_costs"] = None if self._costs is None else dataclasses.asdict(self._costs)
            if self._deflated is not None and self.deflation_ is not None:
                extra, extra_values = self._deflated.fitted_state()
                tensors.update(prefixed("auto_deflation", extra))
                values["auto_deflation"] = {"plan": dataclasses.asdict(self.deflation_),
                                            "state": extra_values}
        return tensors, values

    def restore(self, operator: HessianOperator, tensors: dict[str, Tensor],
                values: dict) -> CG:
        super().restore(operator, tensors, values)
        self._inner_fitted = self.preconditioner != AUTO or "preconditioner" in values
        if self._inner_fitted:
            self._inner = restore_preconditioner(self._base_preconditioner(), "CG", operator,
                                                 tensors, values)
        else:  # "auto" saved before any solve moved to EK-FAC: fitted if a later one does
            self._inner = make_preconditioner(self._base_preconditioner(), "CG")
        self._precondition = (None if self._inner is None or self.preconditioner == AUTO
                              else self._inner.apply_inverse)
        self.deflation_, self._deflated, self._split, self._weights = None, None, None, None
        self._split_refused = False
        costs = values.get("auto_costs") if self.preconditioner == AUTO else None
        self._costs = None if costs is None else StepCosts(**costs)
        self._timings = {}
        saved = values.get("auto_deflation") if self.preconditioner == AUTO else None
        if saved is not None:
            self.deflation_ = DeflationPlan(**saved["plan"])
            self._deflated = self._deflation(self.deflation_).restore(
                operator, unprefixed("auto_deflation", tensors), saved["state"])
        return self

    def _tolerance(self) -> float:
        return self.tol if self.tol is not None else DEFAULT_TOL.get(self.operator.dtype, 1e-3)

    def _solve(self, V: Tensor) -> Tensor:
        tol = self._tolerance()
        solve = self._block_cg if self.block else self._independent_cg
        self._products = 0
        self._deflated_at = None
        if self.preconditioner == AUTO:  # every solve starts plain and decides anew
            self._precondition, self._ekfac_from = None, None
            self._plain_projected = math.nan
            self._wide = self.block and V.shape[0] >= PLAIN_WIDTH
        split = self._split_operator()
        self._active = self.operator if split is None else split[0]
        try:
            X, R, iterations, recurrence = solve(V, tol if split is None
                                                 else LIGHT_TOL_SHARE * tol)
        except IndefiniteHessianError:
            if split is None:
                raise
            # the heaviest examples' curvature alone can be indefinite where the whole sum is
            # not (a non-convex model): leave nothing out, in this solve and the later ones
            logger.info("CG: A_S over the %d heaviest examples is indefinite; solving on all.",
                        split[0].num_train)
            self._split, split, self._active = (), None, self.operator
            self._split_refused = True
            X, R, iterations, recurrence = solve(V, tol)
        if split is not None:  # phase 2: the residual on all examples, finished on A
            heavy, light = split
            heavy_products = self._products
            R = R - light.matvec(X, shifted=False)
            self._products += X.shape[0]
            self._active = self.operator
            X, R, more, recurrence = solve(V, tol, (X, R))
            iterations += more
        self._check_output(X)
        residual = self._relative_residual(X, V) if self.verify else float("nan")
        # unverified: a recurrence above tol is a known failure; below it, nothing was checked
        converged = residual <= tol if self.verify else (False if recurrence > tol else None)
        details = {"block": float(self.block),
                   "preconditioned": float(self._precondition is not None),
                   "products": float(self._products), "recurrence_residual": recurrence}
        notes: tuple[str, ...] = () if self.verify else (
            "residual not recomputed (verify=False); the recurrence's estimate is in details",)
        if self._split_refused:
            notes += ("negligible: the curvature of the heaviest examples alone was indefinite "
                      "(a non-convex model), so every example was used",)
        if split is not None:
            details.update({"examples_left_out": float(light.num_train),
                            "products_on_heaviest": float(heavy_products)})
            notes += (f"{light.num_train} of {self.operator.num_train} training examples "
                      f"(together at most {self.negligible:g} of the curvature weight) were "
                      f"left out of the first {iterations - more} iterations ({heavy_products} "
                      f"products over the other {heavy.num_train}); their curvature was then "
                      f"added to the residual (one product over them per right-hand side)"
                      + (f" and {more} more iterations taken over all examples" if more
                         else ", which met tol"),)
        if self.preconditioner == AUTO:
            details.update(self._auto_details())
            notes += (self._auto_note(),)
        self.last_report = self._report(residual, converged, iterations=iterations,
                                        tolerance=tol, details=details, notes=notes)
        logger.info("CG: %d iterations, %d products, recurrence residual %.2e, recomputed "
                    "residual %.2e (tol %g).", iterations, self._products, recurrence, residual,
                    tol)
        self._warn(recurrence <= tol, residual, tol, recurrence)
        return X

    def _warn(self, recurrence_converged: bool, residual: float, tol: float,
              recurrence: float) -> None:
        if not recurrence_converged:
            shown = residual if residual == residual else recurrence
            warn(
                f"CG stopped at max_iter={self.max_iter} with relative residual {shown:.2e} "
                f"above tol={tol:g}. Raise max_iter, add damping (faster convergence), use a "
                "preconditioner (preconditioner='ekfac'), or accept the looser solve.",
                ConvergenceWarning,
            )
        elif residual > tol:
            warn(
                f"CG's recurrence reached tol={tol:g}, but the recomputed relative residual is "
                f"{residual:.2e}, so the solve is reported as not converged: the system is "
                f"ill-conditioned for {self.operator.dtype}. Use float64, more damping, or a "
                "looser tol.",
                ConvergenceWarning,
            )

    def _progress_bar(self, description: str) -> tqdm:
        return tqdm(total=self.max_iter, desc=description, leave=False,
                    disable=not self.progress)

    def _apply_m(self, R: Tensor) -> Tensor:
        """The preconditioner on the rows of R (under torch.distributed each process applies
        it to a share of the rows)."""
        if self._precondition is None:
            return R
        return self._timed("apply", R.shape[0],
                           lambda: distributed.split_rows(self._precondition, R))

    def _timed(self, what: str, vectors: int, work: Callable[[], Tensor]) -> Tensor:
        """``work()``; with ``preconditioner="auto"``, until the costs are known, its seconds
        per vector are kept as the first measurement of ``what`` ("apply" or "product")."""
        if self.preconditioner != AUTO or self._costs is not None or what in self._timings \
                or vectors == 0:
            return work()
        device = self.operator.device
        _synchronize(device)
        start = time.perf_counter()
        out = work()
        _synchronize(device)
        self._timings[what] = (time.perf_counter() - start) / vectors
        return out

    def _step_costs(self) -> StepCosts | None:
        """The measured :class:`.adaptive.StepCosts` (process 0's under torch.distributed, so
        that every process decides alike), once a product and an application were timed."""
        if self._costs is None and {"apply", "product"} <= self._timings.keys():
            self._costs = distributed.broadcast(StepCosts(product=self._timings["product"],
                                                          apply=self._timings["apply"]))
        return self._costs

    def _split_operator(self) -> tuple[HessianOperator, HessianOperator] | None:
        """(A_S, C_L's operator) for ``negligible`` > 0: the heaviest examples and the lightest
        ones carrying at most ``negligible`` of the curvature weight (module docstring);
        ``None`` where nothing would be left out."""
        if self.negligible == 0:
            return None
        if self._split is None:
            op, weights = self.operator, self._curvature_weights()
            kept = heaviest_count(weights, 1.0 - self.negligible)
            order = torch.argsort(weights, descending=True)
            self._split = (() if kept >= op.num_train
                           else (op.restricted(order[:kept]), op.restricted(order[kept:])))
        return self._split or None

    # --------------------------------------------------------------- preconditioner="auto"

    def _curvature_weights(self) -> Tensor:
        """The operator's curvature weights, computed once per prepare (the negligible split,
        the Lanczos subset and the deflation share them)."""
        if self._weights is None:
            self._weights = self.operator.curvature_weights()
        return self._weights

    def _lanczos_subset(self) -> int:
        """The examples a Lanczos run is planned on; the same in every solve (even where the
        run, once built, had to take all examples), so that every solve decides alike."""
        return heaviest_count(self._curvature_weights(), SUBSET_MASS)

    def _adapt(self, previous: float, ratio: float, iterations: int, tol: float,
               width: int) -> bool:
        """With ``preconditioner="auto"``: switch from plain CG to EK-FAC where block CG over
        ``PLAIN_WIDTH`` or more right-hand sides stalls, or else where plain CG's first
        iteration projects more than ``PLAIN_AT_MOST`` iterations still to go; while on
        EK-FAC alone, switch to the deflated preconditioner if the rule of :mod:`.adaptive`
        says it pays (building it the first time). Returns whether the preconditioner changed
        (CG then restarts from its current solution). The switches depend only on this
        solve's own convergence and the costs measured once, so the same right-hand sides
        always take the same path."""
        if self.preconditioner != AUTO or self._deflated_at is not None:
            return False
        op, active = self.operator, self._active or self.operator
        most = (math.ceil(max(op.dim - self._products, 0) / max(width, 1)) if self.block
                else op.dim - iterations)  # block CG's space spans all p; each column's does
        if self._ekfac_from is None:  # still plain
            if self._wide:  # many right-hand sides: plain unless it stalls
                self._ratios.append(ratio)
                if iterations < DECIDE_FROM or not stalled(self._ratios):
                    return False
            else:  # decided once, after the first iteration
                if iterations != DECIDE_FROM:
                    return False
                self._plain_projected = min(remaining_iterations(previous, ratio, tol,
                                                                 iterations), most)
                if self._plain_projected <= PLAIN_AT_MOST:
                    return False
            self._ekfac_from = iterations
            self._precondition = self._fitted_inner().apply_inverse
            logger.info("CG auto: EK-FAC after iteration %d (plain CG %s).", iterations,
                        "stalled" if self._wide else f"projected {self._plain_projected:g} more")
            return True
        since = iterations - self._ekfac_from  # iterations on EK-FAC
        if since < DECIDE_FROM:
            return False
        remaining = remaining_iterations(previous, ratio, tol, since)
        costs = self._step_costs()
        if min(remaining, most) < MIN_REMAINING or costs is None:
            return False  # decided without the pass over the data for the weights
        plan = plan_deflation(remaining, width, self._lanczos_subset(), active.num_train,
                              op.dim, costs, most)
        if plan is None:
            return False
        self._switch(plan, iterations)
        return True

    def _switch(self, plan: DeflationPlan, iterations: int) -> None:
        """Use the deflated EK-FAC from after ``iterations`` (0: from the start), building it
        the first time."""
        op = self.operator
        if self._deflated is None:
            try:
                self._deflated = self._deflation(plan).deflate(self._fitted_inner(),
                                                               self._curvature_weights())
            except IndefiniteHessianError:
                if plan.subset >= op.num_train:
                    raise  # A itself is indefinite: CG could not converge either
                # the heaviest examples' curvature alone can be indefinite where the sum over
                # all of them is not (a non-convex model): the Lanczos run takes them all
                logger.info("CG auto: the curvature of the %d heaviest examples is indefinite; "
                            "the Lanczos run uses all %d.", plan.subset, op.num_train)
                plan = dataclasses.replace(plan, subset=op.num_train)
                self._deflated = self._deflation(plan).deflate(self._fitted_inner(),
                                                               self._curvature_weights())
            self.deflation_ = plan
            logger.info("CG auto: EK-FAC deflated at %d Ritz pairs (Lanczos %d products on %d "
                        "examples) after iteration %d, %g iterations projected.", plan.rank,
                        plan.iterations, plan.subset, iterations, plan.projected)
        self._precondition = self._deflated.apply_inverse
        self._deflated_at, self._projected = iterations, plan.projected

    def _deflation(self, plan: DeflationPlan) -> Deflated:
        deflated = Deflated(base="ekfac", rank=plan.rank, iterations=plan.iterations,
                            subset=plan.subset)
        deflated.progress = self.progress
        return deflated

    def _auto_details(self) -> dict[str, float]:
        plan = self.deflation_ if self._deflated_at is not None else None
        return {"plain_projected": self._plain_projected,
                "ekfac_after_iteration": float("nan") if self._ekfac_from is None
                else float(self._ekfac_from),
                "deflated_rank": float(plan.rank if plan else 0),
                "deflated_after_iteration": float("nan") if self._deflated_at is None
                else float(self._deflated_at),
                "lanczos_subset": float(plan.subset if plan else 0)}

    def _auto_note(self) -> str:
        costs = "" if self._costs is None else (
            f"; measured {1e3 * self._costs.product:.3g} ms per product, "
            f"{1e3 * self._costs.apply:.3g} ms per EK-FAC application")
        if self._ekfac_from is None:
            if self._wide:
                return (f"auto preconditioner: none (plain block CG over {PLAIN_WIDTH} or more "
                        "right-hand sides throughout: it never stalled)")
            projected = ("" if math.isnan(self._plain_projected) else
                         f": after its first iteration it projected {self._plain_projected:g} "
                         f"more, at most {PLAIN_AT_MOST}")
            return "auto preconditioner: none (plain CG throughout" + projected + ")"
        why = ("plain block CG stalled" if self._wide else
               f"plain CG projected {self._plain_projected:g} more, above {PLAIN_AT_MOST}")
        start = (f"auto preconditioner: none for {self._ekfac_from} iteration(s) ({why}), "
                 "then EK-FAC")
        if self._deflated_at is None:
            return (start + " alone (the measured convergence never projected a deflation to "
                    "save more time than its Lanczos run costs" + costs + ")")
        plan = self.deflation_
        return (start + f", then from iteration {self._deflated_at + 1} EK-FAC deflated at "
                f"{plan.rank} Ritz pairs (a Lanczos run of {plan.iterations} products on the "
                f"{plan.subset} training examples carrying {SUBSET_MASS:.0%} of the curvature "
                f"weight), when {self._projected:g} more iterations were projected" + costs)

    # --------------------------------------------------------------- block CG (Ji & Li 2017)

    def _block_cg(self, V: Tensor, tol: float, start: tuple[Tensor, Tensor] | None = None
                  ) -> tuple[Tensor, Tensor, int, float]:
        """Block CG from X = 0, or from ``start`` = (X₀, its residual V − A·X₀), both (k, p);
        returns X, the recurrence residual V − A·X, the iterations and the largest ratio."""
        B = V.T  # (p, k): columns are right-hand sides
        v_norm = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
        X = torch.zeros_like(B)
        R = B.clone()
        if start is not None:
            X.copy_(start[0].T)
            R.copy_(start[1].T)
        gram, ratio = _residual_gram(R, v_norm)
        if ratio <= tol:
            return X.T, R.T, 0, ratio
        # the stall test compares this recurrence's own residuals: phase 2 of negligible > 0
        # starts above where phase 1 (another operator) ended, which is no stall
        self._ratios = [ratio]
        P = self._first_directions(R, v_norm, tol, gram)
        iterations = 0
        with self._progress_bar("block CG iterations") as bar:
            while iterations < self.max_iter:
                iterations += 1
                previous, ratio = ratio, self._block_step(B, X, R, P, v_norm, iterations)
                bar.update(1)
                bar.set_postfix(residual=f"{ratio:.1e}", directions=P.shape[1])
                logger.debug("block CG iteration %d: %d directions, residual %.3e", iterations,
                             P.shape[1], ratio)
                if ratio <= tol:
                    break
                if self._adapt(previous, ratio, iterations, tol, P.shape[1]):
                    # restart: X and R are kept
                    P = self._first_directions(R, v_norm, tol, self._last_block[3])
                else:
                    P = self._next_directions(R, v_norm, tol)
                if P.shape[1] == 0:
                    break
        return X.T, R.T, iterations, ratio

    def _block_step(self, B: Tensor, X: Tensor, R: Tensor, P: Tensor, v_norm: Tensor,
                    iteration: int) -> float:
        """One block CG update of X and R (in place) along the directions P; the new ratio."""
        op = self._active or self.operator
        Q = self._products_of(P.T).T
        PtQ = (P.T @ Q).double()
        PtQ = 0.5 * (PtQ + PtQ.T)
        _check_curvature(PtQ, iteration, op.damping)
        alpha = torch.linalg.solve(PtQ, (P.T @ R).double()).to(B.dtype)
        X.addmm_(P, alpha)
        R.addmm_(Q, alpha, alpha=-1.0)
        gram, ratio = _residual_gram(R, v_norm)
        if not math.isfinite(ratio):
            raise SolverDivergedError(_nan_message(iteration))
        self._last_block = (P, Q, PtQ, gram)
        return ratio

    def _products_of(self, rows: Tensor) -> Tensor:
        """A·v for the rows of ``rows`` with the operator in use (A, or A_S in phase 1)."""
        self._products += rows.shape[0]
        op = self._active or self.operator
        if op is not self.operator:  # a product over part of the examples is not timed
            return op.matvec(rows)
        return self._timed("product", rows.shape[0], lambda: op.matvec(rows))

    def _first_directions(self, R: Tensor, v_norm: Tensor, tol: float, gram: Tensor
                          ) -> Tensor:
        """P = orth(M·S(R)): the search directions that start (or restart) the recurrence;
        ``gram`` is RᵀR (float64)."""
        return conditioned_columns(self._apply_m(self._search_space(R, v_norm, tol, gram).T).T)

    def _next_directions(self, R: Tensor, v_norm: Tensor, tol: float) -> Tensor:
        """P = orth(Z − P·(PᵀQ)⁻¹QᵀZ) with Z = M·S(R) (module docstring)."""
        P, Q, PtQ, gram = self._last_block
        Z = self._apply_m(self._search_space(R, v_norm, tol, gram).T).T
        beta = torch.linalg.solve(PtQ, (Q.T @ Z).double()).to(Z.dtype)
        return conditioned_columns(Z.addmm_(P, beta, alpha=-1.0))

    def _search_space(self, R: Tensor, v_norm: Tensor, tol: float, gram: Tensor) -> Tensor:
        """S(R): the column-scaled residual N = R·diag(‖v_j‖)⁻¹, ``(p, k)``, restricted to its
        singular directions above ``truncate`` × tol: the orthonormal left singular vectors
        U_kept = N·W_kept·Σ_kept⁻¹ = R·(D⁻¹·W_kept·Σ_kept⁻¹), ``(p, r)``, from the eigenpairs
        of NᵀN = D⁻¹(RᵀR)D⁻¹ with D = diag(‖v_j‖) and ``gram`` = RᵀR (module docstring). Only
        the span matters to block CG; unit columns keep the rank-revealing orthonormalisation
        from dropping a direction for being small."""
        if self.truncate == 0:
            return R / v_norm

        def kept(gram_n: Tensor) -> Tensor:
            """W_kept·Σ_kept⁻¹ from NᵀN = W Σ² Wᵀ (float64)."""
            squared, W = torch.linalg.eigh(gram_n)  # σ², ascending
            keep = squared > (self.truncate * tol) ** 2
            return W[:, keep] / squared[keep].sqrt()

        # a zero right-hand side (‖v_j‖ clamped to tiny) keeps a zero residual: scale 0
        scale = torch.where(v_norm > torch.finfo(v_norm.dtype).tiny, 1.0 / v_norm.double(), 0.0)
        scaled = scale[:, None] * gram * scale
        if bool(torch.isfinite(scaled).all()):
            C = (scale[:, None] * kept(scaled)).to(R.dtype)
            if bool(torch.isfinite(C).all()):
                return R @ C
        # norms so small that D⁻¹ overflows: scale the residual itself
        N = R / v_norm
        return N @ kept((N.T @ N).double()).to(N.dtype)

    # --------------------------------------------------------------- independent CG

    def _independent_cg(self, V: Tensor, tol: float,
                        start: tuple[Tensor, Tensor] | None = None
                        ) -> tuple[Tensor, Tensor, int, float]:
        """Independent CG from X = 0, or from ``start`` = (X₀, V − A·X₀); returns as
        :meth:`_block_cg` does."""
        op = self._active or self.operator
        X = torch.zeros_like(V) if start is None else start[0].clone()
        R = V.clone() if start is None else start[1].clone()
        Z = self._apply_m(R)
        P = Z.clone()
        rz = (R * Z).sum(dim=1)
        v_norm = V.norm(dim=1)
        active = torch.nonzero(R.norm(dim=1) > tol * v_norm).flatten()
        ratio = max_ratio(R, V)
        iterations = 0
        bar = self._progress_bar("CG iterations")
        while active.numel() and iterations < self.max_iter:
            iterations += 1
            bar.update(1)
            bar.set_postfix(active=int(active.numel()))
            P_a = P[active]
            AP = self._products_of(P_a)
            curvature = (P_a * AP).sum(dim=1)
            if not bool(torch.isfinite(curvature).all()):
                raise SolverDivergedError(_nan_message(iterations))
            if bool((curvature <= 0).any()):
                raise IndefiniteHessianError(_indefinite_message(
                    float(curvature.min()), iterations, op.damping))
            alpha = rz[active] / curvature
            X[active] += alpha[:, None] * P_a
            R[active] -= alpha[:, None] * AP
            Z_a = self._apply_m(R[active])
            rz_new = (R[active] * Z_a).sum(dim=1)
            beta = rz_new / rz[active]
            P[active] = Z_a + beta[:, None] * P_a
            rz[active] = rz_new
            active = active[R[active].norm(dim=1) > tol * v_norm[active]]
            if self.preconditioner != AUTO or not active.numel():
                continue
            previous, ratio = ratio, max_ratio(R, V)
            if self._adapt(previous, ratio, iterations, tol, int(active.numel())):
                Z_a = self._apply_m(R[active])  # restart with the deflated preconditioner
                P[active] = Z_a
                rz[active] = (R[active] * Z_a).sum(dim=1)
        bar.close()
        ratio = max_ratio(R, V) if V.numel() else 0.0
        return X, R, iterations, ratio


def _synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that wall-clock timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _residual_gram(R: Tensor, v_norm: Tensor) -> tuple[Tensor, float]:
    """RᵀR (k, k) in float64 and the largest relative residual max_j ‖R_j‖/‖v_j‖, read off its
    diagonal: one product gives the stopping rule and the next search space."""
    gram = (R.T @ R).double()
    return gram, float((gram.diagonal().clamp_min(0).sqrt() / v_norm).max())


def _check_curvature(PtQ: Tensor, iteration: int, damping: float) -> None:
    if not bool(torch.isfinite(PtQ).all()):
        raise SolverDivergedError(_nan_message(iteration))
    smallest = float(torch.linalg.eigvalsh(PtQ)[0])
    if smallest <= 0:
        raise IndefiniteHessianError(_indefinite_message(smallest, iteration, damping))


def _nan_message(iteration: int) -> str:
    return (f"CG produced NaN/inf at iteration {iteration}: the curvature-vector products are not "
            "finite. Check the model and data for overflow (float64 may help).")


def _indefinite_message(curvature: float, iteration: int, damping: float) -> str:
    return (
        f"CG met non-positive curvature pᵀ(H + {damping:g}·I)p = {curvature:.3g} at iteration "
        f"{iteration}: the damped Hessian is not positive definite (the model may not be at a "
        "minimum, or the objective is not convex). Increase damping (e.g. by factors of 10 from "
        "1e-3), use curvature='gauss-newton', or train the model further."
    )
