"""influencekit's methods on the shared benchmark problem, in the peers' adapter format.

Each entry of ``METHODS`` takes the loaded :class:`problem.Problem` and returns I_up,loss
(num_test × n, float64) in influencekit's convention; the timed region is the whole call (fit,
factors, solves, scoring). ``SETTINGS`` records what each method ran with. ``floors`` times the
work any exact method must do at least once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

import influencekit as ik

import matched
from problem import Problem

VERSION = ik.__version__
SUBSET = 300  # Lanczos runs of the deflated preconditioners use the 300 heaviest examples
REPORTS: list[ik.solvers.SolveReport] = []  # the solve report of each call, for the record


def _influence(problem: Problem, solver: ik.solvers.Solver | str,
               curvature: str = "hessian", chunk_size: int = 256) -> ik.Influence:
    return ik.Influence(problem.model, ik.CrossEntropyObjective(), (problem.X_train,
                        problem.y_train), solver=solver, damping=problem.damping,
                        curvature=curvature, chunk_size=chunk_size)  # type: ignore[arg-type]


def _scores(problem: Problem, solver: ik.solvers.Solver | str,
            curvature: str = "hessian", whole_batch: bool = False) -> Tensor:
    chunk = len(problem.y_train) if whole_batch else 256  # pyDVL's adapter: one batch of all
    inf = _influence(problem, solver, curvature, chunk).fit()
    scores = inf.influence((problem.X_test, problem.y_test)).double()
    REPORTS.append(inf.last_solve_report)
    return scores


def floors(problem: Problem, repeats: int = 3) -> dict[str, float]:
    """Seconds for one pass of per-example gradients and for one full-batch HVP (best of 3,
    after a warm-up): the work any exact method pays at least once."""
    import time

    inf = _influence(problem, "cg").fit()
    vector = torch.ones(1, inf.tracked_.dim)
    timings = {}

    def gradient_pass() -> None:  # per parameter tensor, as the scoring pass computes them
        for start in range(0, len(problem.y_train), 256):
            inf.gradients_.train_blocks(inf.theta_, problem.X_train[start : start + 256],
                                        problem.y_train[start : start + 256])

    for name, work in (("per-example gradients, one pass", gradient_pass),
                       ("one full-batch HVP", lambda: inf.operator_.matvec(vector))):
        work()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    return timings


def gradient_dot(problem: Problem) -> Tensor:
    """No curvature at all: −g_testᵀ g_train / λ_d (context row)."""
    inf = _influence(problem, "cg").fit()
    G_test = inf.test_gradients((problem.X_test, problem.y_test))
    return -(G_test @ inf.train_gradients().T).double() / problem.damping


def ekfac_heuristic_damping(problem: Problem) -> Tensor:
    """EK-FAC with damping 0.1 × the mean of its corrected eigenvalues over all layers (the
    rule kronfluence uses per module when its damping_factor is None), not the problem's."""
    probe = _influence(problem, ik.EKFAC()).fit()
    mean = torch.cat([block.scale.flatten() for block in probe.solver.blocks_]).mean()
    inf = ik.Influence(problem.model, ik.CrossEntropyObjective(), (problem.X_train,
                       problem.y_train), solver=ik.EKFAC(), damping=float(0.1 * mean)).fit()
    REPORTS.append(inf.last_solve_report)
    return inf.influence((problem.X_test, problem.y_test)).double()


def _deflated(rank: int, iterations: int, subset: int | None = SUBSET) -> ik.solvers.Deflated:
    return ik.solvers.Deflated(base="ekfac", rank=rank, iterations=iterations, subset=subset)


def _cg(**settings: object) -> Callable[[Problem], Tensor]:
    return lambda p: _scores(p, ik.CG(verify=False, **settings))


METHODS: dict[str, Callable[[Problem], Tensor]] = {
    "influencekit-cg-deflated": _cg(preconditioner=_deflated(80, 160), tol=2e-4),
    # the same solve searching every residual direction, for the saving of truncate=0.3
    **{f"influencekit-cg-deflated-tol-{tol:g}": _cg(preconditioner=_deflated(80, 160), tol=tol)
       for tol in matched.OURS_TOLS},
    "influencekit-cg-deflated-full-width": _cg(preconditioner=_deflated(80, 160), tol=2e-4,
                                               truncate=0.0),
    # independent recurrences stop per column, so they need a tighter tol for the same accuracy
    "influencekit-cg-deflated-independent": _cg(preconditioner=_deflated(80, 160), tol=1e-4,
                                                block=False),
    "influencekit-cg-ekfac": _cg(preconditioner="ekfac", tol=2e-4),
    # no preconditioner: block CG's many right-hand sides find the outlying curvature themselves
    **{f"influencekit-cg-plain-tol-{tol:g}": _cg(preconditioner=None, tol=tol)
       for tol in (2e-4, *matched.OURS_TOLS)},
    # the preconditioner chosen during the solve (none, EK-FAC where plain CG is slow, deflated
    # only where it pays)
    "influencekit-cg-auto": _cg(preconditioner="auto", tol=2e-4),
    **{f"influencekit-cg-auto-tol-{tol:g}": _cg(preconditioner="auto", tol=tol)
       for tol in matched.OURS_TOLS},
    # the lightest examples left out until the final residual (off by default)
    "influencekit-cg-auto-negligible": _cg(preconditioner="auto", tol=2e-4, negligible=2e-5),
    # the same in one pass over all training examples per product, as pyDVL's adapter is given
    **{f"influencekit-cg-auto-whole-batch-tol-{tol:g}": (
        lambda p, tol=tol: _scores(p, ik.CG(verify=False, preconditioner="auto", tol=tol),
                                   whole_batch=True)) for tol in (1e-4, 2e-4, 5e-4)},
    "influencekit-cg-deflated-40": _cg(preconditioner=_deflated(40, 100), tol=3e-4),
    "influencekit-cg-deflated-3": _cg(preconditioner=_deflated(40, 100), max_iter=3, tol=1e-12),
    "influencekit-cg-ekfac-3": _cg(preconditioner="ekfac", max_iter=3, tol=1e-12),
    "influencekit-lissa-ekfac": lambda p: _scores(p, ik.LiSSA(
        depth=30, batch_size=p.X_train.shape[0], tail=0.0, preconditioner="ekfac")),
    "influencekit-arnoldi-50": lambda p: _scores(p, ik.solvers.Arnoldi(rank=50)),
    "influencekit-ekfac": lambda p: _scores(p, "ekfac"),
    "influencekit-kfac": lambda p: _scores(p, "kfac"),
    # the published factors (Martens & Grosse; George et al.), without the least-squares step
    "influencekit-ekfac-classic": lambda p: _scores(p, ik.solvers.EKFAC(refine=0)),
    "influencekit-kfac-classic": lambda p: _scores(p, ik.solvers.KFAC(refine=0)),
    "influencekit-ekfac-deflated-40": lambda p: _scores(p, _deflated(40, 100)),
    "influencekit-cg-gauss-newton": lambda p: _scores(
        p, ik.CG(preconditioner="ekfac", tol=1e-4, verify=False), "gauss-newton"),
    "influencekit-gradient-dot": gradient_dot,
    "influencekit-ekfac-heuristic-damping": ekfac_heuristic_damping,
}

_DEFLATED = ("EK-FAC deflated at {rank} Ritz pairs of {iterations} Lanczos vectors, the "
             "Lanczos run on the 300 training examples with the largest curvature weights")
SETTINGS: dict[str, dict] = {
    "influencekit-cg-deflated": {"solver": "block CG on the Hessian (truncate 0.3), "
                                           "preconditioned by " + _DEFLATED.format(
                                               rank=80, iterations=160) + "; tol 2e-4"},
    **{f"influencekit-cg-deflated-tol-{tol:g}": {"solver": f"as influencekit-cg-deflated, "
                                                          f"tol {tol:g}"}
       for tol in matched.OURS_TOLS},
    "influencekit-cg-deflated-full-width": {"solver": "as influencekit-cg-deflated with "
                                                      "truncate=0 (every residual direction "
                                                      "searched)"},
    "influencekit-cg-deflated-independent": {"solver": "as influencekit-cg-deflated, "
                                                       "block=False, tol 1e-4 (the same "
                                                       "accuracy needs a tighter per-column "
                                                       "tolerance)"},
    "influencekit-cg-deflated-40": {"solver": "block CG on the Hessian, preconditioned by "
                                              + _DEFLATED.format(rank=40, iterations=100)
                                              + "; tol 3e-4"},
    "influencekit-cg-ekfac": {"solver": "block CG on the Hessian, EK-FAC preconditioner, "
                                        "tol 2e-4"},
    **{f"influencekit-cg-plain-tol-{tol:g}": {"solver": f"block CG on the Hessian (truncate "
                                                      f"0.3), no preconditioner, tol {tol:g}"}
       for tol in (2e-4, *matched.OURS_TOLS)},
    "influencekit-cg-auto": {"solver": "block CG on the Hessian (truncate 0.3), "
                                       "preconditioner='auto': none, EK-FAC where plain CG "
                                       "projects a long solve, deflated at 80 Ritz pairs where "
                                       "the measured costs say it pays "
                                       "(influencekit.solvers.adaptive); every example in every "
                                       "product (negligible=0, the default); tol 2e-4"},
    **{f"influencekit-cg-auto-tol-{tol:g}": {"solver": f"as influencekit-cg-auto, tol {tol:g}"}
       for tol in matched.OURS_TOLS},
    "influencekit-cg-auto-negligible": {"solver": "as influencekit-cg-auto, negligible=2e-5: "
                                                  "the lightest examples carrying 2e-5 of the "
                                                  "curvature weight left out until the final "
                                                  "residual"},
    **{f"influencekit-cg-auto-whole-batch-tol-{tol:g}": {
        "solver": f"as influencekit-cg-auto, tol {tol:g}, chunk_size = n (one "
                  "pass over all training examples per product, as pyDVL's adapter's loader)"}
       for tol in (1e-4, 2e-4, 5e-4)},
    "influencekit-cg-deflated-3": {"solver": "block CG on the Hessian, preconditioned by "
                                             + _DEFLATED.format(rank=40, iterations=100)
                                             + "; 3 iterations"},
    "influencekit-lissa-ekfac": {"solver": "LiSSA(depth=30, batch_size=n (every point each "
                                           "step), tail=0, preconditioner='ekfac')"},
    "influencekit-arnoldi-50": {"solver": "Arnoldi(rank=50, iterations=100, "
                                          "remainder='last')"},
    "influencekit-ekfac": {"solver": "EKFAC() (refine=1: A refitted to S by least squares), "
                                     "exact-expectation factors, damping 1e-3"},
    "influencekit-kfac": {"solver": "KFAC() (refine=1), exact-expectation factors, "
                                    "damping 1e-3"},
    "influencekit-ekfac-classic": {"solver": "EKFAC(refine=0): George et al.'s factors, "
                                             "exact-expectation, damping 1e-3"},
    "influencekit-kfac-classic": {"solver": "KFAC(refine=0): Martens & Grosse's factors, "
                                            "exact-expectation, damping 1e-3"},
    "influencekit-ekfac-deflated-40": {"solver": _DEFLATED.format(rank=40, iterations=100)
                                       + "; no CG"},
    "influencekit-cg-gauss-newton": {"solver": "block CG on the Gauss-Newton matrix, EK-FAC "
                                               "preconditioner, tol 1e-4"},
    "influencekit-gradient-dot": {"what": "−g_testᵀ g_train / damping, no curvature"},
    "influencekit-ekfac-heuristic-damping": {"solver": "EKFAC(), damping 0.1 × the mean "
                                                       "corrected eigenvalue over all layers"},
}


def details() -> dict:
    """Iterations and residual of the last solve (for the benchmark record)."""
    if not REPORTS:
        return {}
    report = REPORTS[-1]
    products = report.details.get("products")
    residual = report.relative_residual  # NaN where not measured: CG(verify=False) keeps the
    if residual != residual:             # recurrence's estimate in details
        residual = report.details.get("recurrence_residual", residual)
    return {"iterations": report.iterations, "solver_residual": residual,
            "products": None if products is None else int(products), "note": str(report)}


__all__ = ["METHODS", "SETTINGS", "VERSION", "details", "floors"]
