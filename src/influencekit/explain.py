"""``influencekit explain`` and ``audit``: a user's saved model and data files in, scores, top-k
and an HTML report out. Thin orchestration over :class:`Influence`; file formats are in
:mod:`influencekit.files`, the page in :mod:`influencekit.report.html`.

Data flows one way: files → :class:`Subject` (model, objective, tensors, what to show) →
:class:`Influence` → numbers (``scores.npz``, ``explain.json`` / ``audit.json``) → page.
"""

from __future__ import annotations

import copy
import importlib
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import InputError
from .files import Examples, load_examples, load_model, shown_images
from .influence import Influence
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .objective import BinaryLogisticObjective, CrossEntropyObjective, MSEObjective, Objective
from .scikit import final_estimator, from_sklearn, removal_refit_params, sklearn_data
from .solvers import CG, EKFAC

OBJECTIVES: dict[str, Callable[[], Objective]] = {
    "cross-entropy": CrossEntropyObjective, "logistic": BinaryLogisticObjective,
    "mse": MSEObjective}

#: up to this many parameters the exact Hessian is formed and decomposed
DIRECT_LIMIT = 3_000
#: up to this many, conjugate gradients preconditioned by EK-FAC; above, EK-FAC alone
CG_LIMIT = 500_000


@dataclass
class Subject:
    """What explain/audit works on: the model in influencekit's terms and the data to show."""

    model: nn.Module
    objective: Objective
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    train_examples: Examples
    test_examples: Examples
    kind: str  # "sklearn", "torch" or "setup"
    estimator: Any = None
    class_names: list[str] | None = None
    retrain: Callable[[np.ndarray], nn.Module] | None = None
    damping: float | str = "auto"
    #: the Hessian for convex scikit-learn models; the Gauss-Newton matrix (positive
    #: semi-definite wherever training stopped) for networks
    curvature: str = "gauss-newton"
    notes: list[str] = field(default_factory=list)

    @property
    def classification(self) -> bool:
        return isinstance(self.objective, CrossEntropyObjective | BinaryLogisticObjective)


def load_subject(model: str | None, train: str | None, test: str | None, *,
                 setup: str | None = None, label_column: str | None = None,
                 objective: str = "cross-entropy") -> Subject:
    """Read the model and data files (or call ``setup``) into a :class:`Subject`."""
    if setup is not None:
        return _from_setup(setup)
    if model is None or train is None:
        raise InputError("explain needs --model and --train (and usually --test), or --setup "
                         "module:function.")
    kind, loaded = load_model(model)
    train_examples = load_examples(train, label_column)
    test_examples = load_examples(test, label_column) if test else train_examples
    if kind == "sklearn":
        return _sklearn_subject(loaded, train_examples, test_examples)
    if kind == "torchscript":
        from .torchscript import rebuilt_and_checked

        dtype = next(iter(loaded.parameters())).dtype
        example = torch.as_tensor(np.asarray(train_examples.inputs)[:64], dtype=dtype)
        subject = _torch_subject(rebuilt_and_checked(loaded, example, model), train_examples,
                                 test_examples, objective)
        subject.notes.append("The TorchScript model was rebuilt as an eager module with the "
                             "same weights; its outputs were checked equal on the training "
                             "data's first 64 examples.")
        return subject
    return _torch_subject(loaded, train_examples, test_examples, objective)


def _sklearn_inputs(examples: Examples) -> Any:
    if examples.modality == "text":
        return examples.inputs
    return examples.inputs.reshape(len(examples), -1)


def _sklearn_labels(estimator: Any, labels: np.ndarray) -> np.ndarray:
    classes = getattr(estimator, "classes_", None)
    if classes is None or labels.dtype == classes.dtype:
        return labels
    try:
        return labels.astype(classes.dtype)
    except ValueError as error:
        raise InputError(f"The labels {labels[:5].tolist()} cannot be read as the model's "
                         f"classes {list(classes)}.") from error


def _sklearn_subject(estimator: Any, train: Examples, test: Examples) -> Subject:
    final = final_estimator(estimator)
    X, y = _sklearn_inputs(train), _sklearn_labels(final, train.labels)
    model, objective, train_tensors = from_sklearn(estimator, X, y)
    test_tensors = sklearn_data(estimator, _sklearn_inputs(test),
                                _sklearn_labels(final, test.labels))
    classes = getattr(final, "classes_", None)
    unpenalised = type(final).__name__ == "LinearRegression"
    network = type(final).__name__.startswith("MLP")
    notes = [f"The pipeline's steps before {type(final).__name__} are a fixed transformation: "
             f"influence is over its parameters, and a feature's push is per unit of the "
             f"feature it sees (after the transformation)."] if final is not estimator else []
    return Subject(model, objective, train_tensors, test_tensors, train, test, "sklearn",
                   estimator=estimator,
                   class_names=[str(c) for c in classes] if classes is not None else None,
                   damping="auto" if unpenalised or network else 0.0,
                   curvature="gauss-newton" if network else "hessian", notes=notes)


def _class_indices(labels: np.ndarray, names: list[str]) -> Tensor:
    if np.issubdtype(labels.dtype, np.integer):
        return torch.as_tensor(labels, dtype=torch.long)
    index = {name: k for k, name in enumerate(names)}
    return torch.as_tensor([index[str(label)] for label in labels], dtype=torch.long)


def _torch_subject(model: nn.Module, train: Examples, test: Examples, objective: str) -> Subject:
    if objective not in OBJECTIVES:
        raise InputError(f"--objective must be one of {sorted(OBJECTIVES)}, got {objective!r}.")
    loss = OBJECTIVES[objective]()
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    if isinstance(loss, MSEObjective):
        names = None
        y_train = torch.as_tensor(train.labels.astype(np.float64), dtype=dtype)
        y_test = torch.as_tensor(test.labels.astype(np.float64), dtype=dtype)
    else:
        names = train.class_names or [str(c) for c in np.unique(train.labels)]
        y_train, y_test = _class_indices(train.labels, names), _class_indices(test.labels, names)
    X_train = torch.as_tensor(np.asarray(train.inputs), dtype=dtype)
    X_test = torch.as_tensor(np.asarray(test.inputs), dtype=dtype)
    return Subject(model, loss, (X_train, y_train), (X_test, y_test), train, test, "torch",
                   class_names=names)


def _from_setup(spec: str) -> Subject:
    """``module:function`` returning a dict with ``model``, ``objective``, ``train`` = (X, y)
    and ``test`` = (X, y), optionally ``class_names``, ``feature_names`` and ``retrain``
    (``indices -> model`` trained on those training points, for ``--check``)."""
    if ":" not in spec:
        raise InputError(f"--setup must be 'module:function', got {spec!r}.")
    module_name, function_name = spec.split(":", 1)
    sys.path.insert(0, str(Path.cwd()))
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    finally:
        sys.path.pop(0)
    result = function()
    missing = [key for key in ("model", "objective", "train", "test") if key not in result]
    if missing:
        raise InputError(f"--setup {spec} must return a dict with model, objective, train and "
                         f"test; missing {missing}.")

    def examples(pair: tuple[Tensor, Tensor]) -> Examples:
        X = pair[0].detach().cpu().numpy()
        images = shown_images(X, channels_first=True)
        return Examples(X, pair[1].detach().cpu().numpy(),
                        "table" if images is None else "image",
                        feature_names=result.get("feature_names"), images=images, source=spec)

    train, test = tuple(result["train"]), tuple(result["test"])
    return Subject(result["model"], result["objective"], train, test, examples(train),
                   examples(test), "setup", class_names=result.get("class_names"),
                   retrain=result.get("retrain"))


def choose_solver(model: nn.Module) -> tuple[Any, str]:
    """The default solver for the model's size, and why."""
    p = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    if p <= DIRECT_LIMIT:
        megabytes = p * p * 8 / 2**20
        return "direct", (f"{p:,} parameters: the exact Hessian ({p:,} × {p:,}, "
                          f"{megabytes:.1f} MB) is formed and decomposed")
    if p <= CG_LIMIT:
        return CG(preconditioner=EKFAC()), (
            f"{p:,} parameters: too many for a dense Hessian; conjugate gradients on exact "
            f"Hessian-vector products, preconditioned by EK-FAC (the residual is reported)")
    return EKFAC(), (f"{p:,} parameters: EK-FAC, a Kronecker-factored approximation of the "
                     f"Gauss-Newton curvature (exact solvers would take many passes)")


def _outputs(model: nn.Module, X: Tensor) -> Tensor:
    with torch.no_grad():
        return model(X)


def _predictions(subject: Subject, outputs: Tensor) -> list[str]:
    if not subject.classification:
        return [f"{value:.4g}" for value in outputs.reshape(len(outputs), -1)[:, 0].tolist()]
    if outputs.ndim == 1 or outputs.shape[-1] == 1:
        index = (outputs.reshape(-1) > 0).long()
    else:
        index = outputs.argmax(dim=-1)
    return [_name(subject, int(k)) for k in index.tolist()]


def _name(subject: Subject, label: Any) -> str:
    if subject.class_names is not None and isinstance(label, int | np.integer) and \
            0 <= int(label) < len(subject.class_names):
        return str(subject.class_names[int(label)])
    return str(label)


def _label_names(subject: Subject, targets: Tensor) -> list[str]:
    if subject.classification:
        return [_name(subject, int(t)) for t in targets.reshape(-1).tolist()]
    return [f"{float(t):.4g}" for t in targets.reshape(len(targets), -1)[:, 0].tolist()]


def _default_test_points(subject: Subject, losses: Tensor, predicted: list[str],
                         truth: list[str], limit: int) -> tuple[list[int], str]:
    order = torch.argsort(losses, descending=True).tolist()
    if subject.classification:
        wrong = [j for j in order if predicted[j] != truth[j]]
        if wrong:
            return wrong[:limit], (f"the {min(limit, len(wrong))} misclassified test points "
                                   f"of largest loss ({len(wrong)} misclassified in all)")
    return order[:limit], f"the {min(limit, len(order))} test points of largest loss"


def _make_influence(subject: Subject, solver: Any, damping: float | str | None,
                    curvature: str | None = None) -> Influence:
    return Influence(subject.model, subject.objective, subject.train, solver=solver,
                     damping=subject.damping if damping is None else damping,
                     curvature=curvature or subject.curvature, stationarity_tol=None).fit()


def _solver_words(inf: Influence) -> list[str]:
    report = inf.last_solve_report
    words = [f"damping λ_d = {inf.damping_:.3g} ({inf.damping_reason_})"]
    if report is None:
        return words
    words.append(f"curvature: {'Hessian' if report.curvature == 'hessian' else 'Gauss-Newton'}"
                 f" matrix")
    words.append("exact: solves the damped curvature itself" if report.exact else
                 "approximate: a structured stand-in for the curvature")
    if report.relative_residual == report.relative_residual:
        words.append(f"relative residual ‖A·x − v‖/‖v‖ = {report.relative_residual:.2e}")
    if report.iterations is not None:
        words.append(f"{report.iterations} iterations")
    if report.min_eigenvalue is not None:
        words.append(f"eigenvalues of the damped curvature from {report.min_eigenvalue:.3g} to "
                     f"{report.max_eigenvalue:.3g}")
    words.extend(report.notes)
    return words


def _sklearn_refitter(subject: Subject) -> Callable[[int], nn.Module]:
    """``i -> model`` refitted by scikit-learn without training point i. Only the estimator is
    refitted (a pipeline's earlier steps stay as they are: influence is over the estimator's
    parameters), warm-started from the fitted coefficients with a tolerance of at most 1e-8,
    on influencekit's removal convention (:func:`~influencekit.scikit.removal_refit_params`)."""
    final = final_estimator(subject.estimator)
    features = subject.train[0].detach().cpu().numpy()  # the features the estimator sees
    y = _sklearn_labels(final, subject.train_examples.labels)
    n = len(y)
    settings = dict(removal_refit_params(final, n))
    parameters = final.get_params()
    if "warm_start" in parameters:
        settings["warm_start"] = True
    if isinstance(parameters.get("tol"), float):
        settings["tol"] = min(parameters["tol"], 1e-8)
    if isinstance(parameters.get("max_iter"), int) and parameters["max_iter"] > 0:
        settings["max_iter"] = max(parameters["max_iter"], 10_000)

    def refit(i: int) -> nn.Module:
        keep = np.arange(n) != i
        estimator = copy.deepcopy(final).set_params(**settings).fit(features[keep], y[keep])
        return from_sklearn(estimator, features, y)[0]

    return refit


def _refitter(subject: Subject) -> Callable[[int], nn.Module]:
    """``i -> model`` trained without training point i, for ``--check``."""
    if subject.kind == "sklearn":
        return _sklearn_refitter(subject)
    if subject.retrain is None:
        raise InputError("--check needs a way to retrain: a scikit-learn model, or --setup "
                         "returning 'retrain' (indices -> model trained on them).")
    everyone = np.arange(len(subject.train[1]))
    return lambda i: subject.retrain(np.flatnonzero(everyone != i))


def _check(subject: Subject, refit: Callable[[int], nn.Module], loo: Tensor,
           test_rows: list[int], base: Tensor, count: int) -> dict:
    """Leave-one-out check: for each explained test point, its ``count`` training points of
    largest |predicted change|, each removed and the model refitted; ``base``: the explained
    test points' losses before, ``(m,)``."""
    chosen = sorted({int(i) for row in loo for i in torch.argsort(row.abs(), descending=True)
                     [:count].tolist()})
    X_test, y_test = subject.test[0][test_rows], subject.test[1][test_rows]
    after = []
    for i in chosen:
        with torch.no_grad():
            after.append(subject.objective.test_loss(refit(i)(X_test), y_test).double())
    actual = (torch.stack(after) - base).T.numpy()  # (m, k)
    predicted = loo[:, chosen].numpy()
    pearson = float(np.corrcoef(predicted.ravel(), actual.ravel())[0, 1]) if actual.size > 2 \
        else float("nan")
    return {"removed": chosen, "predicted": predicted.tolist(), "actual": actual.tolist(),
            "pearson": pearson}


def _feature_pushes(inf: Influence, subject: Subject, test: tuple[Tensor, Tensor],
                    indices: list[int]) -> dict[tuple[int, int], list[tuple[str, float]]]:
    """For tabular data: for each explained test point r and training point i of ``indices``,
    the three features of i whose perturbation changes test loss r most (I_pert,loss/n, the
    paper's §5.3), as (name, ∂ test loss / ∂ feature); keyed by (r, i). One solve for all."""
    try:
        Q = inf.perturbation_influence(test, indices) / inf.num_train_  # (m, k, d)
    except Exception as error:  # a model whose inputs are not differentiable (text)
        subject.notes.append(f"feature influence unavailable: {error}")
        return {}
    Q = Q.reshape(Q.shape[0], len(indices), -1)
    names = subject.train_examples.feature_names or [f"x{k}" for k in range(Q.shape[2])]
    pushes = {}
    for r, rows in enumerate(Q):
        for i, row in zip(indices, rows, strict=True):
            top = torch.argsort(row.abs(), descending=True)[:3].tolist()
            pushes[r, i] = [(names[k] if k < len(names) else f"x{k}", float(row[k]))
                            for k in top]
    return pushes


def _solver_choice(subject: Subject, solver: Any) -> tuple[Any, str, str]:
    """The solver (given, or by the model's size), its name and why it was chosen."""
    reason = "given with --solver"
    if solver is None:
        solver, reason = choose_solver(subject.model)
    return solver, solver if isinstance(solver, str) else type(solver).__name__, reason


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def explain(subject: Subject, out: str | Path, *, test_index: list[int] | None = None,
            top_k: int = 5, check: int = 0, solver: Any = None,
            damping: float | str | None = None, curvature: str | None = None,
            max_test: int = 20) -> dict:
    """Score the chosen test points, write ``scores.npz``, ``explain.json`` and
    ``report.html`` to ``out``, and return the summary written to ``explain.json``."""
    from .report.html import explain_page

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    refit = _refitter(subject) if check else None  # refused before any work if impossible
    solver, name, reason = _solver_choice(subject, solver)
    outputs = _outputs(subject.model, subject.test[0])
    with torch.no_grad():
        losses = subject.objective.test_loss(outputs, subject.test[1]).double()
    predicted = _predictions(subject, outputs)
    truth = _label_names(subject, subject.test[1])
    m = len(truth)
    if test_index:
        bad = [j for j in test_index if not 0 <= j < m]
        if bad:
            raise InputError(f"--test-index {bad} out of range: the test set has {m} points "
                             f"(0..{m - 1}).")
        rows, why = list(test_index), "chosen with --test-index"
    else:
        rows, why = _default_test_points(subject, losses, predicted, truth, max_test)
    inf = _make_influence(subject, solver, damping, curvature)
    test = (subject.test[0][rows], subject.test[1][rows])
    influence = inf.influence(test).double()
    loo = -influence / inf.num_train_
    train_truth = _label_names(subject, subject.train[1])
    train_predicted = _predictions(subject, _outputs(subject.model, subject.train[0]))
    order = torch.argsort(loo, dim=1, descending=True)
    helpful, harmful = order[:, :top_k].tolist(), order.flip(1)[:, :top_k].tolist()
    pushes = (_feature_pushes(inf, subject, test, sorted({i for r in range(len(rows))
                                                          for i in helpful[r] + harmful[r]}))
              if subject.test_examples.modality == "table" else {})

    def entry(r: int, i: int) -> dict:
        return {"index": i, "label": train_truth[i], "predicted": train_predicted[i],
                "loo_change": float(loo[r, i]), "features": pushes.get((r, i))}

    points = [{"index": j, "label": truth[j], "predicted": predicted[j],
               "loss": float(losses[j]), "helpful": [entry(r, i) for i in helpful[r]],
               "harmful": [entry(r, i) for i in harmful[r]], "histogram": _histogram(loo[r])}
              for r, j in enumerate(rows)]
    summary = {"solver": name, "solver_reason": reason, "solver_report": _solver_words(inf),
               "test_points": why, "num_train": inf.num_train_, "num_test": m,
               "model": subject.kind, "points": points, "notes": subject.notes,
               "loo_change": "predicted change of the test loss when the training point is "
                             "removed; positive = helpful (removing it raises the loss)"}
    if refit is not None:
        summary["check"] = _check(subject, refit, loo, rows, losses[rows], check)
    _write_npz(out / "scores.npz", test_index=np.array(rows), loo_change=loo.numpy(),
               influence=influence.numpy())
    atomic_write_json(out / "explain.json", summary)
    atomic_write_text(out / "report.html", explain_page(summary, subject))
    return summary


def _histogram(values: Tensor, bins: int = 30) -> dict:
    low, high = float(values.min()), float(values.max())
    if not high > low:
        high = low + 1.0
    counts = torch.histc(values.float(), bins=bins, min=low, max=high)
    return {"low": low, "high": high, "counts": [int(c) for c in counts.tolist()]}


def audit(subject: Subject, out: str | Path, *, top: int = 20, solver: Any = None,
          damping: float | str | None = None, curvature: str | None = None) -> dict:
    """Rank the training points by self-influence (most negative first: the points that most
    hold up their own fit, where mislabelled ones gather, the paper's §5.4); write
    ``self_influence.npz``, ``audit.json`` and ``report.html`` to ``out``."""
    from .report.html import audit_page

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    solver, name, reason = _solver_choice(subject, solver)
    inf = _make_influence(subject, solver, damping, curvature)
    scores = inf.self_influence().double()
    order = torch.argsort(scores).tolist()
    outputs = _outputs(subject.model, subject.train[0])
    with torch.no_grad():
        losses = subject.objective.test_loss(outputs, subject.train[1]).double()
    truth = _label_names(subject, subject.train[1])
    predicted = _predictions(subject, outputs)
    ranked = [{"index": i, "label": truth[i], "predicted": predicted[i],
               "self_influence": float(scores[i]), "loss": float(losses[i])}
              for i in order[:top]]
    summary = {"solver": name, "solver_reason": reason, "solver_report": _solver_words(inf),
               "num_train": inf.num_train_, "ranked": ranked,
               "histogram": _histogram(scores), "notes": subject.notes,
               "self_influence": "I_up,loss(z_i, z_i); most negative first: the points that "
                                 "most hold up their own fit (check their labels first)"}
    _write_npz(out / "self_influence.npz", self_influence=scores.numpy(), order=np.array(order))
    atomic_write_json(out / "audit.json", summary)
    atomic_write_text(out / "report.html", audit_page(summary, subject))
    return summary
