"""Inverse-Hessian-vector-product solvers behind one interface (see :class:`Solver`)."""

from __future__ import annotations

from ..errors import InputTypeError, UnknownSolverError
from .arnoldi import Arnoldi
from .base import ApproximateInverse, Solver, SolveReport
from .cg import CG
from .deflated import Deflated
from .direct import Direct
from .kfac import EKFAC, KFAC
from .lissa import LiSSA

SOLVERS: dict[str, type[Solver]] = {"direct": Direct, "cg": CG, "lissa": LiSSA, "kfac": KFAC,
                                     "ekfac": EKFAC, "arnoldi": Arnoldi,
                                     "deflated": Deflated}


def make_solver(spec: str | Solver) -> Solver:
    """A fresh, unprepared solver from its name (a key of ``SOLVERS``) or a solver object.

    A solver object is copied with its settings, so the caller's object is never bound to an
    operator and one object can configure several ``Influence`` instances.
    """
    if isinstance(spec, Solver):
        return spec.unprepared_copy()
    if isinstance(spec, str) and spec.lower() in SOLVERS:
        return SOLVERS[spec.lower()]()
    if not isinstance(spec, str):
        raise InputTypeError(
            f"solver must be a name (one of {sorted(SOLVERS)}) or a solver object such as "
            f"influencekit.CG(tol=1e-8); got {type(spec).__name__}.")
    raise UnknownSolverError(
        f"Unknown solver {spec!r}. Expected one of {sorted(SOLVERS)} or a solver object such as "
        "influencekit.solvers.CG(tol=1e-8)."
    )


def solver_from_settings(spec: dict) -> Solver:
    """A fresh solver from ``{"solver": class name, "settings": constructor arguments}`` (what
    :meth:`Solver.settings` and saved state record); nested solvers are rebuilt too."""
    classes = {cls.__name__: cls for cls in SOLVERS.values()}
    name = spec.get("solver") if isinstance(spec, dict) else None
    if name not in classes:
        raise UnknownSolverError(f"Saved state names solver {name!r}; this influencekit knows "
                                 f"{sorted(classes)}.")
    arguments = {key: solver_from_settings(value)
                 if isinstance(value, dict) and "solver" in value else value
                 for key, value in spec.get("settings", {}).items()}
    return classes[name](**arguments)


__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "SOLVERS",
    "ApproximateInverse",
    "Arnoldi",
    "Deflated",
    "Direct",
    "LiSSA",
    "SolveReport",
    "Solver",
    "make_solver",
    "solver_from_settings",
]
