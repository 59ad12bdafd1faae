"""The interface every inverse-Hessian-vector-product method implements.

A solver is prepared once on the damped curvature operator A = C + λ_d·I (factorising it,
estimating its spectrum, ...) and then maps blocks of right-hand sides V, ``(k, p)``, to
X ≈ A⁻¹V row by row. After each solve it leaves a :class:`SolveReport` that says how well it
solved, and claims nothing it did not check.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import arguments, heap
from ..curvature import HessianOperator, as_rows
from ..errors import (
    ConvergenceWarning,
    InputTypeError,
    NonFiniteError,
    NotFittedError,
    SolverDivergedError,
    warn,
)
from ..linalg import finite_rows
from ..spectrum import SpectrumEstimate, lanczos_ritz_values

#: Lanczos steps of the default spectrum estimate (``damping="auto"``)
LANCZOS_STEPS = 30


@dataclass
class SolveReport:
    """How well the last solve went. Nothing in it is assumed; each figure was measured.

    Attributes:
        solver: the solver's name.
        relative_residual: max over right-hand sides of ‖A·x − v‖ / ‖v‖, measured with
            curvature-vector products against the operator A (NaN where it was not measured:
            an approximate solver without ``verify=True``).
        converged: ``True``/``False`` when a measured residual was compared with a tolerance the
            solver was asked for; ``None`` when nothing was compared (an approximation without a
            tolerance, or a solve whose residual was not measured).
        exact: ``True`` for solvers that target A⁻¹v itself (Direct, CG, LiSSA: as accurate as
            the residual says); ``False`` for approximations of A⁻¹ (K-FAC, EK-FAC, Arnoldi,
            Deflated), whose error only ``relative_residual`` with ``verify=True`` measures.
        curvature: the curvature the answer approximates, ``"hessian"`` or ``"gauss-newton"``.
            K-FAC and EK-FAC always approximate the Gauss-Newton matrix, whatever the operator's.
        damping: the damping λ_d the solution includes (LiSSA adds scale × its own damping).
        iterations: iterations run (iterative solvers), else ``None``.
        tolerance: the relative residual the solver was asked to reach, if any.
        min_eigenvalue: smallest eigenvalue of A, when known (Direct).
        max_eigenvalue: largest eigenvalue of A, when known (Direct; the largest Ritz value for
            Arnoldi, a lower bound).
        details: solver-specific figures.
        notes: caveats in words (e.g. "approximates the Gauss-Newton matrix, not the Hessian").
    """

    solver: str
    relative_residual: float
    converged: bool | None
    exact: bool
    curvature: str
    damping: float
    iterations: int | None = None
    tolerance: float | None = None
    min_eigenvalue: float | None = None
    max_eigenvalue: float | None = None
    details: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        residual = ("not measured" if math.isnan(self.relative_residual)
                    else f"{self.relative_residual:.2e}")
        parts = [f"{self.solver}: relative residual {residual}"]
        if self.tolerance is not None:
            parts.append(f"tol {self.tolerance:g}")
        if self.iterations is not None:
            parts.append(f"{self.iterations} iterations")
        if self.converged is False:
            parts.append("NOT converged")
        if not self.exact:
            parts.append("approximate inverse")
        parts.append(f"curvature {self.curvature}")
        if self.min_eigenvalue is not None:
            parts.append(f"λ_min(A) {self.min_eigenvalue:.3g}")
        if self.max_eigenvalue is not None:
            parts.append(f"λ_max(A) {self.max_eigenvalue:.3g}")
        parts.append(f"damping {self.damping:g}")
        parts.extend(f"{k} {v:.4g}" for k, v in self.details.items())
        parts.extend(self.notes)
        return ", ".join(parts)


class Solver(ABC):
    """Computes A⁻¹V for the damped curvature A = C + λ_d·I.

    Subclasses set ``name``, ``linear`` (the answer is a fixed linear map of V, so it can
    precondition) and ``exact`` (see :class:`SolveReport`), and implement ``_solve``.
    """

    name: str = "solver"
    linear: bool = False
    exact: bool = True

    def __init__(self) -> None:
        self._operator: HessianOperator | None = None
        self.last_report: SolveReport | None = None
        self.progress = False

    def unprepared_copy(self) -> Solver:
        """A copy with the same settings and nothing bound (``prepare`` rebinds all state)."""
        duplicate = copy.copy(self)
        duplicate._operator = None
        duplicate.last_report = None
        return duplicate

    def prepare(self, operator: HessianOperator) -> Solver:
        """Bind to the operator and do any one-off work (factorisation, spectrum estimates)."""
        if not isinstance(operator, HessianOperator):
            raise InputTypeError(f"{type(self).__name__}.prepare needs a HessianOperator, got "
                                   f"{type(operator).__name__}.")
        self._operator = operator
        return self

    @property
    def operator(self) -> HessianOperator:
        if self._operator is None:
            raise NotFittedError(f"{type(self).__name__} is not prepared; call prepare(operator).")
        return self._operator

    def spectrum_estimate(self, operator: HessianOperator) -> SpectrumEstimate:
        """Estimates of the extreme eigenvalues of the undamped curvature C (for
        ``damping="auto"``): by default 30 seeded Lanczos steps on C's products. Solvers that
        know the spectrum anyway (Direct's eigendecomposition, K-FAC's factors) override it."""
        steps = min(LANCZOS_STEPS, operator.dim)
        damping = operator.damping

        def undamped(v: Tensor) -> Tensor:
            return operator.matvec(v) - damping * v

        ritz = lanczos_ritz_values(undamped, operator.dim, steps, 0, operator.dtype,
                                   operator.device)
        exact = steps == operator.dim
        return SpectrumEstimate(float(ritz[0]), float(ritz[-1]), f"Lanczos, {steps} steps", exact)

    # --------------------------------------------------------------- saved state

    def settings(self) -> dict[str, Any]:
        """The constructor arguments of this solver, JSON-able (a nested solver, such as a
        preconditioner given as an object, as ``{"solver": class name, "settings": ...}``)."""
        return {name: _setting(getattr(self, name))
                for name in inspect.signature(type(self).__init__).parameters if name != "self"}

    def fitted_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """What ``prepare`` computed that is costly to recompute: tensors (saved as safetensors)
        and JSON-able values. :meth:`restore` takes them back."""
        return {}, {}

    def restore(self, operator: HessianOperator, tensors: dict[str, Tensor],
                values: dict[str, Any]) -> Solver:
        """Bind to ``operator`` and take back :meth:`fitted_state`, without a pass over the
        data (the inverse of ``prepare`` for a saved fit)."""
        Solver.prepare(self, operator)
        return self

    @property
    def curvature(self) -> str:
        """The curvature this solver's answer approximates (the operator's, unless overridden)."""
        return self.operator.curvature

    @property
    def extra_damping(self) -> float:
        """Damping the solver adds to the operator's (LiSSA's scale·d); 0 for the others."""
        return 0.0

    @heap.retaining
    def solve(self, V: Tensor) -> Tensor:
        """X with rows x_j = A⁻¹ v_j, for ``V`` of shape ``(k, p)`` (or ``(p,)``).

        ``V`` must hold right-hand sides as rows: a ``(p, k)`` block is refused
        (:class:`ShapeMismatchError`), and so is a right-hand side of a higher precision than
        the model (:class:`DtypeError`), rather than being rounded silently.
        """
        op = self.operator
        rows, single = as_rows(V, op.dim, op.dtype, op.device, f"{type(self).__name__}.solve")
        bad = ~finite_rows(rows)
        if bool(bad.any()):
            where = torch.nonzero(bad).flatten().tolist()[:10]
            raise NonFiniteError(
                f"{type(self).__name__}.solve got right-hand sides with NaN or infinite entries "
                f"(rows: {where}); A⁻¹v is undefined for them. Check the gradients behind them.")
        X = self._solve(rows) if rows.shape[0] else rows.clone()
        self._check_output(X)
        return X[0] if single else X

    def _check_output(self, X: Tensor) -> None:
        bad = ~finite_rows(X)
        if bool(bad.any()):
            where = torch.nonzero(bad).flatten().tolist()[:10]
            raise SolverDivergedError(
                f"{type(self).__name__} returned NaN or infinite values for right-hand sides "
                f"{where} although they were finite. {self._non_finite_advice()}")

    def _non_finite_advice(self) -> str:
        return ("The damped curvature is probably singular or indefinite in float precision: "
                "raise damping, add weight decay, or use float64.")

    def apply_inverse(self, V: Tensor) -> Tensor:
        """The solver's (approximate) A⁻¹ applied to the rows of ``V``, without a report.

        Only for ``linear`` solvers, whose answer is a fixed linear map (used as a preconditioner).
        """
        if not self.linear:
            raise InputTypeError(
                f"{type(self).__name__} is not a fixed linear map of its input and cannot serve "
                "as a preconditioner; use 'ekfac', 'kfac', 'arnoldi', 'deflated' or 'direct'."
            )
        op = self.operator
        rows, single = as_rows(V, op.dim, op.dtype, op.device,
                               f"{type(self).__name__}.apply_inverse")
        X = self._apply(rows)
        return X[0] if single else X

    def apply_inverse_sqrt(self, V: Tensor) -> Tensor:
        """The symmetric square root of the solver's approximate A⁻¹ applied to the rows of V.

        Solvers whose approximation is kept in an eigenbasis provide it (Direct, K-FAC, EK-FAC,
        Arnoldi); :class:`~influencekit.solvers.Deflated` needs it of its base.
        """
        op = self.operator
        rows, single = as_rows(V, op.dim, op.dtype, op.device,
                               f"{type(self).__name__}.apply_inverse_sqrt")
        X = self._apply_sqrt(rows)
        return X[0] if single else X

    @property
    def has_inverse_sqrt(self) -> bool:
        """Whether :meth:`apply_inverse_sqrt` is available (an eigenbasis is kept)."""
        return type(self)._apply_sqrt is not Solver._apply_sqrt

    def _apply_sqrt(self, V: Tensor) -> Tensor:
        """A^(−½)V for solvers that keep an eigenbasis (they override it)."""
        raise InputTypeError(
            f"{type(self).__name__} keeps no eigenbasis and has no symmetric square root of its "
            "inverse; use 'ekfac', 'kfac', 'arnoldi' or 'direct' as the base."
        )

    def _apply(self, V: Tensor) -> Tensor:
        """A⁻¹V for linear solvers (they override it); ``_solve`` adds the report."""
        raise InputTypeError(f"{type(self).__name__} does not implement _apply.")

    @abstractmethod
    def _solve(self, V: Tensor) -> Tensor:
        """Solve for a non-empty ``(k, p)`` block; set ``self.last_report``."""

    def _relative_residual(self, X: Tensor, V: Tensor) -> float:
        R = self.operator.matvec(X) - V
        return max_ratio(R, V)

    def _report(self, relative_residual: float, converged: bool | None, **fields: Any
                ) -> SolveReport:
        """A report with this solver's name, exactness, curvature and the operator's damping
        filled in (``fields`` may override any of them)."""
        values: dict[str, Any] = {"solver": self.name, "exact": self.exact,
                                  "curvature": self.curvature, "damping": self.operator.damping}
        values.update(fields)
        return SolveReport(relative_residual=float(relative_residual), converged=converged,
                           **values)


class ApproximateInverse(Solver):
    """Base of the solvers that apply a fixed approximation M ≈ A⁻¹ (K-FAC, EK-FAC, Arnoldi,
    Deflated): ``solve`` is ``_apply`` plus a report that says it is an approximation.

    Args:
        verify: measure the relative residual ‖A·x − v‖/‖v‖ against the operator's exact
            curvature (one more batched product); otherwise it is reported as NaN.
        tol: with ``verify``, the residual to compare with for ``converged``; ``None`` leaves
            ``converged=None`` (an approximation has no stopping rule to meet).
    """

    linear = True
    exact = False

    def __init__(self, verify: bool = False, tol: float | None = None) -> None:
        super().__init__()
        self.verify = arguments.flag("verify", verify)
        self.tol = arguments.optional_positive("tol", tol)

    def _solve(self, V: Tensor) -> Tensor:
        X = self._apply(V)
        self._check_output(X)
        residual = self._relative_residual(X, V) if self.verify else float("nan")
        converged = (residual <= self.tol) if self.verify and self.tol is not None else None
        self.last_report = self._report(residual, converged, tolerance=self.tol,
                                        details=self._details(), notes=self._notes(),
                                        **self._report_fields())
        if residual > 1.0 or converged is False:
            worse = " — worse than x = 0, so the approximation is no inverse of A here" \
                if residual > 1.0 else ""
            warn(
                f"{type(self).__name__}'s measured relative residual is {residual:.3g}"
                f"{worse}{f' (tol={self.tol:g})' if self.tol is not None else ''}. Check the "
                "damping (the curvature may be indefinite), or use CG for an exact solve "
                "(ik.CG(preconditioner=...) with this solver as the preconditioner).",
                ConvergenceWarning)
        return X

    def _details(self) -> dict[str, float]:
        """Solver-specific figures for the report."""
        return {}

    def _notes(self) -> tuple[str, ...]:
        notes = [] if self.verify else [
            "approximation: residual not measured (verify=True measures it)"]
        if self.curvature != self.operator.curvature:
            notes.append(f"approximates the {self.curvature} matrix, not the "
                         f"{self.operator.curvature} the operator was built for")
        return tuple(notes)

    def _report_fields(self) -> dict[str, Any]:
        """Further report fields (e.g. ``max_eigenvalue``)."""
        return {}


def _setting(value: Any) -> Any:
    if isinstance(value, Solver):
        return {"solver": type(value).__name__, "settings": value.settings()}
    return value


def prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` with ``prefix/`` before every name (nested solvers' saved state)."""
    return {f"{prefix}/{name}": tensor for name, tensor in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors under ``prefix/``, with the prefix taken off."""
    start = f"{prefix}/"
    return {name[len(start):]: t for name, t in tensors.items() if name.startswith(start)}


def combine_reports(reports: list[SolveReport | None]) -> SolveReport | None:
    """One report for several solves of the same solver (e.g. self-influence in blocks): the
    largest residual and iteration count, converged only if every solve was (``None`` if any
    was unchecked), the notes of all."""
    reports = [report for report in reports if report is not None]
    if len(reports) <= 1:
        return reports[0] if reports else None
    residuals = [report.relative_residual for report in reports]
    verdicts = [report.converged for report in reports]
    iterations = [report.iterations for report in reports if report.iterations is not None]
    notes = tuple(dict.fromkeys(note for report in reports for note in report.notes))
    return dataclasses.replace(
        reports[-1],
        relative_residual=float("nan") if any(math.isnan(r) for r in residuals)
        else max(residuals),
        converged=None if None in verdicts else all(verdicts),
        iterations=max(iterations) if iterations else None,
        details={**reports[-1].details, "solves": len(reports)},
        notes=notes,
    )


def make_preconditioner(spec: str | Solver | None, owner: str) -> Solver | None:
    """An unprepared linear solver from a preconditioner setting, checked when it is given.

    ``spec`` is ``None``, a registered solver name or a solver object; it must be a fixed linear
    map (Direct, K-FAC, EK-FAC, Arnoldi, Deflated), not CG or LiSSA.
    """
    if spec is None:
        return None
    from . import make_solver  # the registry imports this module

    inner = make_solver(spec)
    if not inner.linear:
        raise InputTypeError(
            f"{owner}: {type(inner).__name__} is not a fixed linear map of its input and cannot "
            "serve as a preconditioner; use 'ekfac', 'kfac', 'arnoldi', 'deflated' or 'direct'."
        )
    return inner


def preconditioner_state(inner: Solver | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A prepared preconditioner's saved state, under ``preconditioner/``."""
    if inner is None:
        return {}, {}
    tensors, values = inner.fitted_state()
    return prefixed("preconditioner", tensors), {"preconditioner": values}


def restore_preconditioner(spec: str | Solver | None, owner: str, operator: HessianOperator,
                           tensors: dict[str, Tensor], values: dict[str, Any]) -> Solver | None:
    """The preconditioner of ``spec`` restored from :func:`preconditioner_state`'s output."""
    inner = make_preconditioner(spec, owner)
    if inner is not None:
        inner.restore(operator, unprefixed("preconditioner", tensors),
                      values.get("preconditioner", {}))
    return inner


def max_ratio(R: Tensor, V: Tensor) -> float:
    """max_j ‖r_j‖ / ‖v_j‖ over rows (rows with v_j = 0 count ‖r_j‖)."""
    norms = V.norm(dim=1)
    ratio = R.norm(dim=1) / torch.where(norms > 0, norms, torch.ones_like(norms))
    return float(ratio.max())
