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

from problem import Problem

VERSION = ik.__version__
REPORTS: list[ik.solvers.SolveReport] = []  # the solve report of each call, for the record


def _influence(problem: Problem, solver: ik.solvers.Solver | str,
               curvature: str = "hessian") -> ik.Influence:
    return ik.Influence(problem.model, ik.CrossEntropyObjective(), (problem.X_train,
                        problem.y_train), solver=solver, damping=problem.damping,
                        curvature=curvature, chunk_size=1257)  # type: ignore[arg-type]


def _scores(problem: Problem, solver: ik.solvers.Solver | str,
            curvature: str = "hessian") -> Tensor:
    inf = _influence(problem, solver, curvature).fit()
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
    for name, work in (("per-example gradients, one pass", inf.train_gradients),
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


METHODS: dict[str, Callable[[Problem], Tensor]] = {
    "influencekit-cg-block": lambda p: _scores(p, ik.CG(tol=1e-5)),
    "influencekit-cg-independent": lambda p: _scores(p, ik.CG(tol=1e-5, block=False)),
    "influencekit-cg-ekfac-5": lambda p: _scores(p, ik.CG(preconditioner="ekfac", max_iter=5,
                                                          tol=1e-12)),
    "influencekit-ekfac": lambda p: _scores(p, "ekfac"),
    "influencekit-kfac": lambda p: _scores(p, "kfac"),
    "influencekit-arnoldi-50": lambda p: _scores(p, ik.solvers.Arnoldi(rank=50)),
    "influencekit-lissa": lambda p: _scores(p, ik.LiSSA()),
    "influencekit-cg-gauss-newton": lambda p: _scores(p, ik.CG(tol=1e-5), "gauss-newton"),
    "influencekit-gradient-dot": gradient_dot,
}

SETTINGS: dict[str, dict] = {
    "influencekit-cg-block": {"solver": "CG(tol=1e-5), block CG sharing one Krylov space"},
    "influencekit-cg-independent": {"solver": "CG(tol=1e-5, block=False)"},
    "influencekit-cg-ekfac-5": {"solver": "block CG preconditioned by EK-FAC, 5 iterations"},
    "influencekit-ekfac": {"solver": "EKFAC(), exact-expectation factors"},
    "influencekit-kfac": {"solver": "KFAC(), exact-expectation factors"},
    "influencekit-arnoldi-50": {"solver": "Arnoldi(rank=50, iterations=100, remainder='last')"},
    "influencekit-lissa": {"solver": "LiSSA() defaults"},
    "influencekit-cg-gauss-newton": {"solver": "CG(tol=1e-5) on the Gauss-Newton matrix"},
    "influencekit-gradient-dot": {"what": "−g_testᵀ g_train / damping, no curvature"},
}

__all__ = ["METHODS", "SETTINGS", "VERSION", "floors"]
