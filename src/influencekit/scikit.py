"""Fitted scikit-learn estimators as influencekit's model, objective and training set.

``from_sklearn(estimator, X, y)`` returns ``(model, objective, train)`` for
``Influence(model, objective, train, ...)``: a float64 ``nn.Module`` holding the estimator's
own coefficients, the objective it minimised written in influencekit's convention, and the
training data as tensors. ``sklearn_data(estimator, X, y)`` encodes test data the same way.

influencekit's convention is R(θ) = (1/n) Σ_i [ℓ(z_i, θ) + (λ/2)·‖θ‖²] (see
:mod:`influencekit.objective`), with λ per parameter tensor. Each estimator's objective is
rescaled to it exactly (a positive factor does not move the minimiser):

==========================  =====================================  ============================
estimator                   scikit-learn minimises                 ℓ; λ(weights), λ(intercept)
==========================  =====================================  ============================
LogisticRegression (L2)     C·Σ log-loss + ½‖W‖²                    logistic / softmax
                                                                     cross-entropy; 1/(nC), 0
  solver="liblinear"        the intercept is a weight on a          1/(nC), 1/(nC·s²),
                            constant feature s = intercept_scaling  s = intercept_scaling
LinearSVC (L2)              C·Σ hinge or squared hinge + ½‖w‖²,     smooth hinge at
                            intercept as in liblinear above         ``temperature`` or squared
                                                                     hinge; 1/(nC), 1/(nC·s²)
SVC(kernel="linear")        C·Σ hinge + ½‖w‖²                       smooth hinge; 1/(nC), 0
Ridge                       ‖Y − XW − b‖² + α‖W‖²                   squared error averaged over
                                                                     the K targets; 2α/(nK), 0
LinearRegression            ‖Y − XW − b‖²                           same; 0, 0
SGDClassifier log_loss      (1/n)·Σ log-loss + (α/2)‖w‖²            logistic; α, 0
SGDRegressor squared_error  (1/n)·Σ ½(y − f)² + (α/2)‖w‖²           squared error; 2α, 0
MLPClassifier               mean log-loss + α/(2b)·Σ‖W_l‖²          cross-entropy on the logits
                                                                     (logistic if binary);
                                                                     α/b, 0
MLPRegressor                mean over samples and targets of        squared error averaged over
                            ½(y − f)² + α/(2b)·Σ‖W_l‖²              targets; 2α/b, 0
==========================  =====================================  ============================

b is the number of examples each of the MLP's loss evaluations averages over: n for
``solver="lbfgs"``; the mini-batch size for "adam" and "sgd" (``batch_size``, "auto" =
min(200, n)), whose every step minimises a batch's mean loss plus α/(2b)·‖W‖².

The hinge is not differentiable; like Koh & Liang (2017, §4.1) SVMs are scored through the
smooth hinge t·log(1 + exp((1 − m)/t)) at ``temperature`` t, evaluated at the estimator's
own weights (which minimise the plain hinge). A stochastic estimator (SGD, and the MLPs
trained with "adam" or "sgd") stops near, not at, its optimum; ``Influence`` warns when the
gradient there is large (``stationarity_tol``).

Removal convention: a removed point takes its share of the regulariser with it, as in the
paper. The refit this predicts is scikit-learn's with C → C·n/(n−1) (LogisticRegression,
the SVMs) or α → α·(n−1)/n (Ridge, lbfgs MLPs); SGD's α is per example already. A refit at
the same C or α differs from it by one shift common to every removed point (the effect of
changing λ by λ/n), which leaves rankings and correlations unchanged.

A ``Pipeline`` is accepted when its last step is one of the above: the earlier steps are
applied to X as a fixed transformation, and influence is taken over the last step's
parameters on the transformed features.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import InputError, UnsupportedEstimatorError
from .objective import (
    BinaryLogisticObjective,
    CrossEntropyObjective,
    MSEObjective,
    Objective,
    SmoothHingeObjective,
    SquaredHingeObjective,
    WeightDecay,
)

SUPPORTED = ("LogisticRegression", "LinearSVC", "SVC", "Ridge", "LinearRegression",
             "SGDClassifier", "SGDRegressor", "MLPClassifier", "MLPRegressor")

#: the most entries a sparse X (a vectorizer's output) is densified to
DENSE_LIMIT = 50_000_000

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "identity": nn.Identity, "logistic": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


def from_sklearn(estimator: Any, X: Any, y: Any, *, temperature: float = 0.001,
                 dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Objective,
                                                              tuple[Tensor, Tensor]]:
    """The fitted ``estimator`` as ``(model, objective, train)`` for :class:`Influence`.

    Args:
        estimator: a fitted estimator of :data:`SUPPORTED` (or a ``Pipeline`` ending in one).
        X: the training inputs it was fitted on, ``(n, d)`` array-like (dense).
        y: its training targets, ``(n,)`` (class labels as the estimator saw them, or values)
            or ``(n, K)`` for multi-target regressors.
        temperature: t of the smooth hinge that scores a hinge-loss SVM.
        dtype: floating dtype of the model and the data.

    Returns:
        ``model`` (an ``nn.Module`` mapping ``(b, d)`` inputs to ``(b, K)`` outputs, the
        estimator's logits or predictions), ``objective`` (its loss and regulariser, see the
        module docstring for each conversion) and ``train = (X, y)`` as tensors, labels
        encoded as class indices ``0..K−1`` (binary: 0/1 for ``classes_[0]``/``classes_[1]``).

    Raises:
        UnsupportedEstimatorError: an estimator type or setting that cannot be converted
            exactly (an L1 penalty, class weights, a multi-class SVM, ...).
        InputError: X or y that do not fit the estimator.
    """
    final, X_features = _final_step(estimator, X)
    converter = _CONVERTERS.get(type(final).__name__)
    if converter is None:
        raise UnsupportedEstimatorError(
            f"from_sklearn cannot convert a {type(final).__name__}; supported: "
            f"{', '.join(SUPPORTED)} (and a Pipeline ending in one of them).")
    _require_fitted(final)
    features = _features(final, X_features, dtype)
    n = features.shape[0]
    model, objective = converter(final, n, temperature)
    model = model.to(dtype)
    targets = _targets(final, y, n, dtype)
    return model.eval(), objective, (features, targets)


def sklearn_data(estimator: Any, X: Any, y: Any, *, dtype: torch.dtype = torch.float64
                 ) -> tuple[Tensor, Tensor]:
    """``(X, y)`` encoded as :func:`from_sklearn` encodes the training set (pipelines'
    transformations applied, labels as class indices), for test points."""
    final, X_features = _final_step(estimator, X)
    _require_fitted(final)
    features = _features(final, X_features, dtype)
    return features, _targets(final, y, features.shape[0], dtype)


# --- the estimators ---------------------------------------------------------------------------

def _logistic_regression(est: Any, n: int, temperature: float) -> tuple[nn.Module, Objective]:
    _refuse_class_weight(est)
    penalty = getattr(est, "penalty", "deprecated")  # deprecated in scikit-learn 1.8
    l1_ratio = getattr(est, "l1_ratio", None)
    has_l1 = penalty == "l1" or (penalty in ("elasticnet", "deprecated")
                                 and l1_ratio not in (None, 0, 0.0))
    if has_l1:
        raise UnsupportedEstimatorError(
            f"LogisticRegression with an L1 part (penalty={penalty!r}, l1_ratio={l1_ratio!r}) "
            f"is not twice differentiable; supported: the L2 penalty (l1_ratio=0) or none "
            f"(C=np.inf).")
    no_penalty = penalty in (None, "none") or math.isinf(float(est.C))
    decay = 0.0 if no_penalty else 1.0 / (n * float(est.C))
    multiclass = est.coef_.shape[0] > 1
    if multiclass and est.solver == "liblinear":
        raise UnsupportedEstimatorError(
            "LogisticRegression(solver='liblinear') on more than two classes fits one-vs-rest "
            "models, which no single objective describes; refit with solver='lbfgs' "
            "(multinomial).")
    intercept = _liblinear_intercept_decay(est, decay) if est.solver == "liblinear" else 0.0
    if multiclass:
        model = (SoftmaxLinear(np.asarray(est.coef_), np.asarray(est.intercept_))
                 if est.fit_intercept else _linear(est))
        return model, CrossEntropyObjective(weight_decay=_decay(decay, intercept, est))
    return _linear(est), BinaryLogisticObjective(weight_decay=_decay(decay, intercept, est))


def _linear_svc(est: Any, n: int, temperature: float) -> tuple[nn.Module, Objective]:
    _refuse_class_weight(est)
    _require_binary(est, "LinearSVC")
    if est.penalty != "l2":
        raise UnsupportedEstimatorError(
            f"LinearSVC(penalty={est.penalty!r}) is not twice differentiable; supported: "
            f"penalty='l2'.")
    decay = 1.0 / (n * float(est.C))
    loss = SquaredHingeObjective if est.loss == "squared_hinge" else None
    weight_decay = _decay(decay, _liblinear_intercept_decay(est, decay), est)
    objective = (loss(weight_decay=weight_decay) if loss is not None else
                 SmoothHingeObjective(temperature, weight_decay=weight_decay))
    return _linear(est), objective


def _svc(est: Any, n: int, temperature: float) -> tuple[nn.Module, Objective]:
    if est.kernel != "linear":
        raise UnsupportedEstimatorError(
            f"SVC(kernel={est.kernel!r}) has no finite set of weights to differentiate; "
            f"supported: SVC(kernel='linear') and LinearSVC.")
    _refuse_class_weight(est)
    _require_binary(est, "SVC")
    decay = 1.0 / (n * float(est.C))
    return _linear(est), SmoothHingeObjective(temperature, weight_decay=_decay(decay, 0.0, est))


def _ridge(est: Any, n: int, temperature: float) -> tuple[nn.Module, Objective]:
    if getattr(est, "positive", False):
        raise UnsupportedEstimatorError(
            f"{type(est).__name__}(positive=True) is a constrained fit whose optimum need not "
            f"be stationary; supported: positive=False.")
    alpha = np.asarray(getattr(est, "alpha", 0.0), dtype=float)
    if alpha.size != 1:
        raise UnsupportedEstimatorError(
            f"Ridge with one alpha per target ({alpha.size} values) is not supported; fit one "
            f"Ridge per target, or use a single alpha.")
    targets = 1 if np.ndim(est.coef_) == 1 else est.coef_.shape[0]
    decay = 2.0 * float(alpha) / (n * targets)
    return _linear(est), MSEObjective(weight_decay=_decay(decay, 0.0, est))


def _sgd(est: Any, n: int, temperature: float) -> tuple[nn.Module, Objective]:
    name = type(est).__name__
    classifier = name == "SGDClassifier"
    wanted = "log_loss" if classifier else "squared_error"
    if est.loss != wanted:
        raise UnsupportedEstimatorError(
            f"{name}(loss={est.loss!r}) is not supported; supported: loss={wanted!r}.")
    if est.penalty not in ("l2", None):
        raise UnsupportedEstimatorError(
            f"{name}(penalty={est.penalty!r}) is not twice differentiable; supported: "
            f"penalty='l2' or None.")
    if classifier:
        _refuse_class_weight(est)
        _require_binary(est, name)
    alpha = 0.0 if est.penalty is None else float(est.alpha)
    decay = alpha if classifier else 2.0 * alpha
    objective = (BinaryLogisticObjective if classifier else MSEObjective)(
        weight_decay=_decay(decay, 0.0, est))
    return _linear(est), objective


def _mlp(est: Any, n: int, temperature: float) -> tuple[nn.Module, Objective]:
    name = type(est).__name__
    classifier = name == "MLPClassifier"
    if classifier and est.out_activation_ not in ("softmax", "logistic"):
        raise UnsupportedEstimatorError(
            f"MLPClassifier with output activation {est.out_activation_!r} (multi-label "
            f"targets) is not supported; supported: one label per example.")
    if classifier and est.out_activation_ == "logistic" and est.n_outputs_ != 1:
        raise UnsupportedEstimatorError(
            "MLPClassifier fitted on multi-label targets is not supported; supported: one "
            "label per example.")
    if not classifier and getattr(est, "loss", "squared_error") != "squared_error":
        raise UnsupportedEstimatorError(
            f"MLPRegressor(loss={est.loss!r}) is not supported; supported: "
            f"loss='squared_error'.")
    per_step = n if est.solver == "lbfgs" else (
        min(200, n) if est.batch_size == "auto" else int(np.clip(est.batch_size, 1, n)))
    if classifier:
        decay = float(est.alpha) / per_step
        objective: Objective = (CrossEntropyObjective if est.out_activation_ == "softmax"
                                else BinaryLogisticObjective)(
            weight_decay={"": 0.0, "weight": decay})
    else:
        decay = 2.0 * float(est.alpha) / per_step
        objective = MSEObjective(weight_decay={"": 0.0, "weight": decay})
    layers: list[nn.Module] = []
    softmax = classifier and est.out_activation_ == "softmax"
    for index, (coef, intercept) in enumerate(zip(est.coefs_, est.intercepts_, strict=True)):
        last = index == len(est.coefs_) - 1
        if last and softmax:  # the softmax's intercept shift is flat: see SoftmaxLinear
            layers.append(SoftmaxLinear(np.asarray(coef).T, np.asarray(intercept)))
        else:
            layers.append(_linear_from(np.asarray(coef).T, np.asarray(intercept), True))
        if not last:
            layers.append(_ACTIVATIONS[est.activation]())
    return nn.Sequential(*layers), objective


_CONVERTERS: dict[str, Callable[[Any, int, float], tuple[nn.Module, Objective]]] = {
    "LogisticRegression": _logistic_regression, "LinearSVC": _linear_svc, "SVC": _svc,
    "Ridge": _ridge, "LinearRegression": _ridge, "SGDClassifier": _sgd,
    "SGDRegressor": _sgd, "MLPClassifier": _mlp, "MLPRegressor": _mlp}


class SoftmaxLinear(nn.Module):
    """Logits x·Wᵀ + B·c of a multinomial linear model whose intercept is not penalised.

    Adding one constant to every class's intercept leaves the softmax unchanged, so with an
    unpenalised intercept the objective is flat along that direction and its Hessian singular.
    The intercept is therefore kept in the (K − 1)-dimensional subspace of intercepts summing
    to zero: ``bias`` c ``(K−1,)`` with B ``(K, K−1)`` an orthonormal basis of that subspace.
    Predictions equal the estimator's (its intercepts minus their mean).

    Shapes: input ``(b, d)``, output ``(b, K)``.
    """

    def __init__(self, coef: np.ndarray, intercept: np.ndarray) -> None:
        super().__init__()
        K = coef.shape[0]
        self.weight = nn.Parameter(torch.tensor(np.asarray(coef, dtype=np.float64)))
        centring = torch.eye(K, dtype=torch.float64) - 1.0 / K
        basis = torch.linalg.svd(centring).U[:, : K - 1]
        self.register_buffer("basis", basis)
        self.bias = nn.Parameter(basis.T @ torch.tensor(np.asarray(intercept,
                                                                    dtype=np.float64)))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T + self.basis @ self.bias


def removal_refit_params(estimator: Any, n: int) -> dict[str, Any]:
    """The estimator's settings whose refit on n − 1 points is what ``loo_change`` predicts
    (the removed point takes its share of the regulariser; see the module docstring): for
    ``set_params`` on a copy of the estimator (or of a pipeline's last step)."""
    name = type(estimator).__name__
    if name in ("LogisticRegression", "LinearSVC", "SVC"):
        return {"C": float(estimator.C) * n / (n - 1)}
    if name == "Ridge" or (name in ("MLPClassifier", "MLPRegressor")
                           and estimator.solver == "lbfgs"):
        return {"alpha": float(estimator.alpha) * (n - 1) / n}
    return {}


# --- helpers -----------------------------------------------------------------------------------

def final_estimator(estimator: Any) -> Any:
    """The estimator itself, or the last step of a (nested) ``Pipeline``: the one whose
    parameters influence is taken over."""
    steps = getattr(estimator, "steps", None)
    return estimator if steps is None else final_estimator(steps[-1][1])


def _final_step(estimator: Any, X: Any) -> tuple[Any, Any]:
    """The pipeline's last step and X passed through the steps before it."""
    steps = getattr(estimator, "steps", None)
    if steps is None:
        return estimator, X
    for name, step in steps[:-1]:
        if step in (None, "passthrough"):
            continue
        if not hasattr(step, "transform"):
            raise UnsupportedEstimatorError(
                f"Pipeline step {name!r} ({type(step).__name__}) has no transform(); only the "
                f"last step may be an estimator.")
        try:
            X = step.transform(X)
        except ValueError as error:
            raise InputError(f"X does not fit the pipeline's step {name!r}: {error}") from error
    return _final_step(steps[-1][1], X)


def _require_fitted(est: Any) -> None:
    if not hasattr(est, "n_features_in_"):  # set by every fitted estimator
        raise InputError(f"The {type(est).__name__} is not fitted; call fit(X, y) first.")


def _features(est: Any, X: Any, dtype: torch.dtype) -> Tensor:
    if hasattr(X, "toarray"):  # a sparse matrix (a text vectorizer's output, say)
        if X.shape[0] * X.shape[1] > DENSE_LIMIT:
            raise InputError(
                f"X is a sparse {X.shape[0]} × {X.shape[1]} matrix, over {DENSE_LIMIT:,} "
                f"entries dense; from_sklearn needs dense features (reduce the vocabulary, "
                f"e.g. max_features, or score fewer examples).")
        X = X.toarray()
    array = np.asarray(X, dtype=np.float64)
    expected = getattr(est, "n_features_in_", None)
    if array.ndim != 2 or (expected is not None and array.shape[1] != expected):
        raise InputError(
            f"X must have shape (n, {expected}) for this {type(est).__name__} (fitted on "
            f"{expected} features), got {array.shape}.")
    if not np.isfinite(array).all():
        raise InputError("X holds NaN or infinite values; the estimator was not fitted on "
                         "them.")
    return torch.as_tensor(array, dtype=dtype)


def _targets(est: Any, y: Any, n: int, dtype: torch.dtype) -> Tensor:
    values = np.asarray(y)
    if values.shape[0] != n:
        raise InputError(f"y has {values.shape[0]} entries for {n} rows of X.")
    classes = getattr(est, "classes_", None)
    if classes is None:
        targets = torch.as_tensor(values.astype(np.float64), dtype=dtype)
        outputs = _output_count(est)
        if targets.ndim == 2 and targets.shape[1] != outputs:
            raise InputError(f"y has {targets.shape[1]} targets per example; the "
                             f"{type(est).__name__} predicts {outputs}.")
        return targets.reshape(n, outputs) if outputs > 1 else targets.reshape(n)
    if values.ndim != 1:
        raise InputError(f"y must hold one class label per example, shape (n,), got "
                         f"{values.shape}.")
    order = np.searchsorted(classes, values)
    order = np.clip(order, 0, len(classes) - 1)
    unknown = classes[order] != values
    if unknown.any():
        raise InputError(
            f"y holds labels the {type(est).__name__} was not fitted on: "
            f"{sorted(set(values[unknown].tolist()))[:5]}; its classes are {list(classes)}.")
    return torch.as_tensor(order, dtype=torch.long)


def _output_count(est: Any) -> int:
    if hasattr(est, "coefs_"):
        return int(est.coefs_[-1].shape[1])
    return 1 if np.ndim(est.coef_) == 1 else int(est.coef_.shape[0])


def _linear(est: Any) -> nn.Module:
    """``nn.Linear`` of a linear estimator's ``coef_`` (dense, or sparse as SVC may keep it) and
    ``intercept_``; no bias without ``fit_intercept`` (SVC has none: always fitted)."""
    coef = est.coef_.toarray() if hasattr(est.coef_, "toarray") else est.coef_
    coef = np.asarray(coef, dtype=np.float64)
    coef = coef.reshape(1, -1) if coef.ndim == 1 else coef
    intercept = np.broadcast_to(np.asarray(est.intercept_, dtype=np.float64),
                                (coef.shape[0],))
    return _linear_from(coef, intercept, bool(getattr(est, "fit_intercept", True)))


def _linear_from(weight: np.ndarray, intercept: np.ndarray, bias: bool) -> nn.Linear:
    """``nn.Linear`` with the given ``(out, in)`` weight (and bias when fitted)."""
    weight = np.asarray(weight, dtype=np.float64)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        if bias:
            layer.bias.copy_(torch.tensor(np.asarray(intercept, dtype=np.float64)))
    return layer


def _decay(weight: float, intercept: float, est: Any) -> WeightDecay:
    """λ per parameter: the weights', and the intercept's when the model has one."""
    if not getattr(est, "fit_intercept", True) or weight == intercept:
        return weight
    return {"": weight, "bias": intercept}


def _liblinear_intercept_decay(est: Any, decay: float) -> float:
    """liblinear fits the intercept as a weight w_b on a constant feature s and penalises
    ½·w_b²; the intercept is b = s·w_b, so its λ is λ/s²."""
    return decay / float(est.intercept_scaling) ** 2


def _refuse_class_weight(est: Any) -> None:
    if getattr(est, "class_weight", None) is not None:
        raise UnsupportedEstimatorError(
            f"{type(est).__name__}(class_weight={est.class_weight!r}) weights each example's "
            f"loss by its class; supported: class_weight=None.")


def _require_binary(est: Any, name: str) -> None:
    if len(est.classes_) != 2:
        raise UnsupportedEstimatorError(
            f"{name} on {len(est.classes_)} classes fits one-vs-rest (or one-vs-one) models, "
            f"which no single objective describes; supported: two classes (or "
            f"LogisticRegression / MLPClassifier for several).")
