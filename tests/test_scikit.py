"""from_sklearn: every supported estimator against an independent float64 reference written from
scikit-learn's documented objective, and predicted leave-one-out changes against scikit-learn's
own refits."""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import (
    LinearRegression,
    LogisticRegression,
    Ridge,
    SGDClassifier,
    SGDRegressor,
)
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from torch import Tensor

import influencekit as ik

T = 0.001  # smooth-hinge temperature


def _standard(X: np.ndarray) -> np.ndarray:
    return (X - X.mean(0)) / X.std(0)


def binary(n: int = 80, m: int = 4) -> tuple:
    X, y = load_breast_cancer(return_X_y=True)
    X = _standard(X[:, :6])
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    return X[order[:n]], y[order[:n]], X[order[n:n + m]], y[order[n:n + m]]


def multiclass(n: int = 90, m: int = 4) -> tuple:
    X, y = load_wine(return_X_y=True)
    X = _standard(X[:, :5])
    order = np.random.default_rng(1).permutation(len(y))
    return X[order[:n]], y[order[:n]], X[order[n:n + m]], y[order[n:n + m]]


def regression(n: int = 80, m: int = 4, targets: int = 1) -> tuple:
    X, y = load_diabetes(return_X_y=True)
    X = _standard(X[:, :5])
    y = (y - y.mean()) / y.std()
    if targets > 1:
        y = np.stack([y, np.sin(2 * y) + X[:, 0]], axis=1)
    order = np.random.default_rng(2).permutation(len(y))
    return X[order[:n]], y[order[:n]], X[order[n:n + m]], y[order[n:n + m]]


# --- independent references: sklearn's objective J = Σ_i J_i written out from its documentation,
# θ flat; the paper's I_up,loss = −∇ℓ_testᵀ H_R⁻¹ ∇L_i with R = J / (n·c) for a constant c, i.e.
# −n·∇ℓ_testᵀ (∇²J)⁻¹ ∇J_i, whatever c is.

def _signed(y: Tensor) -> Tensor:
    return torch.where(y == 0, -1.0, 1.0).double()


def _linear_scores(theta: Tensor, X: Tensor, K: int, intercept: bool) -> Tensor:
    d = X.shape[1]
    W = theta[: K * d].reshape(K, d)
    b = theta[K * d:] if intercept else torch.zeros(K, dtype=theta.dtype)
    return X @ W.T + b


def _linear_theta(est) -> Tensor:
    coef = np.atleast_2d(est.coef_)
    parts = [coef.ravel()]
    if getattr(est, "fit_intercept", True):
        parts.append(np.broadcast_to(est.intercept_, (coef.shape[0],)))
    return torch.as_tensor(np.concatenate(parts), dtype=torch.float64)


def _reference(terms: Callable[[Tensor], Tensor], test_loss: Callable[[Tensor], Tensor],
               theta: Tensor, flat: bool = False, damping: float = 0.0, scale: float = 1.0
               ) -> Tensor:
    """(m, n): −n·∇ℓ_testᵀ (∇²Σ J_i)⁻¹ ∇J_i from dense float64 derivatives. ``flat``: the
    objective is flat along directions every gradient is orthogonal to (the multinomial's
    unpenalised intercept shift): the pseudo-inverse. With ``damping`` δ (added to the Hessian
    of R = scale·J, influencekit's objective in its own loss units):
    −n·∇ℓ_testᵀ (∇²J + δ/scale)⁻¹ ∇J_i."""
    H = torch.autograd.functional.hessian(lambda t: terms(t).sum(), theta)
    H = H + damping / scale * torch.eye(len(theta), dtype=H.dtype)
    G = torch.autograd.functional.jacobian(terms, theta)  # (n, p)
    G_test = torch.autograd.functional.jacobian(test_loss, theta)  # (m, p)
    n = G.shape[0]
    inverse = torch.linalg.pinv(H, rtol=1e-10, hermitian=True) if flat else torch.linalg.inv(H)
    return -n * G_test @ inverse @ G.T


def _ours(est, X, y, Xt, yt, damping: float = 0.0) -> Tensor:
    model, objective, train = ik.from_sklearn(est, X, y, temperature=T)
    inf = ik.Influence(model, objective, train, solver="direct", damping=damping,
                       stationarity_tol=None).fit()
    return inf.influence(ik.sklearn_data(est, Xt, yt))


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _smooth_hinge(m: Tensor) -> Tensor:
    return T * F.softplus((1 - m) / T)


def _check_linear_classifier(est, data, per_point, test_loss_of_margin, penalty):
    """per_point(scores (n,), y±) → the data part of J_i; penalty(theta) → the whole penalty."""
    X, y, Xt, yt = data
    est.fit(X, y)
    Xd, Xtd = torch.as_tensor(X), torch.as_tensor(Xt)
    ys, yts = _signed(torch.as_tensor(y)), _signed(torch.as_tensor(yt))
    n = len(y)
    intercept = getattr(est, "fit_intercept", True)

    def terms(theta):
        s = _linear_scores(theta, Xd, 1, intercept)[:, 0]
        return per_point(s, ys) + penalty(theta) / n

    def test_loss(theta):
        return test_loss_of_margin(yts * _linear_scores(theta, Xtd, 1, intercept)[:, 0])

    reference = _reference(terms, test_loss, _linear_theta(est))
    assert _relative(_ours(est, X, y, Xt, yt), reference) < 1e-6


def _weights_penalty(d: int, K: int = 1, intercept_scale: float | None = None):
    def penalty(theta):
        value = 0.5 * theta[: K * d].pow(2).sum()
        if intercept_scale is not None:
            value = value + 0.5 * (theta[K * d:] / intercept_scale).pow(2).sum()
        return value
    return penalty


@pytest.mark.parametrize("C", [0.05, 1.0, 30.0])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_binary_logistic_regression(C, fit_intercept):
    data = binary()
    est = LogisticRegression(C=C, fit_intercept=fit_intercept, tol=1e-10, max_iter=10_000)
    _check_linear_classifier(est, data, lambda s, y: C * F.softplus(-y * s),
                             lambda m: F.softplus(-m), _weights_penalty(data[0].shape[1]))


def test_liblinear_logistic_regression_penalises_the_scaled_intercept():
    data = binary()
    est = LogisticRegression(C=0.5, solver="liblinear", intercept_scaling=3.0, tol=1e-10,
                             max_iter=10_000)
    _check_linear_classifier(est, data, lambda s, y: 0.5 * F.softplus(-y * s),
                             lambda m: F.softplus(-m),
                             _weights_penalty(data[0].shape[1], intercept_scale=3.0))


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_multinomial_logistic_regression(fit_intercept):
    X, y, Xt, yt = multiclass()
    C = 0.7
    est = LogisticRegression(C=C, fit_intercept=fit_intercept, tol=1e-10, max_iter=10_000)
    est.fit(X, y)
    K, d, n = 3, X.shape[1], len(y)
    Xd, Xtd = torch.as_tensor(X), torch.as_tensor(Xt)

    def terms(theta):
        s = _linear_scores(theta, Xd, K, fit_intercept)
        ce = F.cross_entropy(s, torch.as_tensor(y), reduction="none")
        return C * ce + 0.5 * theta[: K * d].pow(2).sum() / n

    def test_loss(theta):
        return F.cross_entropy(_linear_scores(theta, Xtd, K, fit_intercept),
                               torch.as_tensor(yt), reduction="none")

    reference = _reference(terms, test_loss, _linear_theta(est), flat=fit_intercept)
    assert _relative(_ours(est, X, y, Xt, yt), reference) < 1e-6


@pytest.mark.parametrize("loss", ["squared_hinge", "hinge"])
def test_linear_svc(loss):
    data = binary()
    C = 0.3
    est = LinearSVC(C=C, loss=loss, intercept_scaling=2.0, tol=1e-10, max_iter=100_000)
    if loss == "squared_hinge":
        def per_point(s, y):
            return C * torch.relu(1 - y * s).pow(2)

        def test_loss(m):
            return torch.relu(1 - m).pow(2)
    else:
        def per_point(s, y):
            return C * _smooth_hinge(y * s)
        test_loss = _smooth_hinge
    _check_linear_classifier(est, data, per_point, test_loss,
                             _weights_penalty(data[0].shape[1], intercept_scale=2.0))


def test_linear_kernel_svc():
    data = binary()
    C = 0.3
    est = SVC(kernel="linear", C=C, tol=1e-8)
    _check_linear_classifier(est, data, lambda s, y: C * _smooth_hinge(y * s), _smooth_hinge,
                             _weights_penalty(data[0].shape[1]))


@pytest.mark.parametrize("estimator,targets", [
    (Ridge(alpha=3.0), 1), (Ridge(alpha=0.2, fit_intercept=False), 1), (Ridge(alpha=2.0), 2),
    (LinearRegression(), 1), (LinearRegression(), 2)])
def test_ridge_and_least_squares(estimator, targets):
    X, y, Xt, yt = regression(targets=targets)
    est = copy.deepcopy(estimator).fit(X, y)
    alpha = getattr(est, "alpha", 0.0)
    K, d, n = targets, X.shape[1], len(y)
    Xd, Xtd = torch.as_tensor(X), torch.as_tensor(Xt)
    Y, Yt = torch.as_tensor(y).reshape(n, K), torch.as_tensor(yt).reshape(len(yt), K)

    def terms(theta):
        r = _linear_scores(theta, Xd, K, est.fit_intercept) - Y
        return r.pow(2).sum(1) + alpha * theta[: K * d].pow(2).sum() / n

    def test_loss(theta):  # influencekit's MSE: the mean over the K targets
        return (_linear_scores(theta, Xtd, K, est.fit_intercept) - Yt).pow(2).mean(1)

    reference = _reference(terms, test_loss, _linear_theta(est))
    assert _relative(_ours(est, X, y, Xt, yt), reference) < 1e-6


def test_sgd_classifier_and_regressor():
    X, y, Xt, yt = binary()
    alpha = 0.01
    est = SGDClassifier(loss="log_loss", alpha=alpha, max_iter=2000, tol=None,
                        random_state=0).fit(X, y)
    n, d = len(y), X.shape[1]
    Xd, Xtd = torch.as_tensor(X), torch.as_tensor(Xt)
    ys, yts = _signed(torch.as_tensor(y)), _signed(torch.as_tensor(yt))

    def terms(theta):
        s = _linear_scores(theta, Xd, 1, True)[:, 0]
        return F.softplus(-ys * s) / n + 0.5 * alpha * theta[:d].pow(2).sum() / n

    def test_loss(theta):
        return F.softplus(-yts * _linear_scores(theta, Xtd, 1, True)[:, 0])

    reference = _reference(terms, test_loss, _linear_theta(est))
    assert _relative(_ours(est, X, y, Xt, yt), reference) < 1e-6

    X, y, Xt, yt = regression()
    est = SGDRegressor(alpha=alpha, max_iter=2000, tol=None, random_state=0).fit(X, y)
    n, d = len(y), X.shape[1]
    Xd, Xtd = torch.as_tensor(X), torch.as_tensor(Xt)
    Y, Yt = torch.as_tensor(y), torch.as_tensor(yt)

    def terms(theta):
        r = _linear_scores(theta, Xd, 1, True)[:, 0] - Y
        return 0.5 * r.pow(2) / n + 0.5 * alpha * theta[:d].pow(2).sum() / n

    def test_loss(theta):
        return (_linear_scores(theta, Xtd, 1, True)[:, 0] - Yt).pow(2)

    reference = _reference(terms, test_loss, _linear_theta(est))
    assert _relative(_ours(est, X, y, Xt, yt), reference) < 1e-6


def _mlp_forward(theta: Tensor, shapes: list, X: Tensor, activation: str) -> Tensor:
    """The MLP from scikit-learn's coefs_ / intercepts_ layout: h ← act(h @ W + b)."""
    act = {"tanh": torch.tanh, "relu": torch.relu, "logistic": torch.sigmoid,
           "identity": lambda h: h}[activation]
    h, at = X, 0
    for index, (w_shape, b_size) in enumerate(shapes):
        W = theta[at: at + math.prod(w_shape)].reshape(w_shape)
        at += math.prod(w_shape)
        b = theta[at: at + b_size]
        at += b_size
        h = h @ W + b
        if index < len(shapes) - 1:
            h = act(h)
    return h


def _mlp_theta(est) -> tuple[Tensor, list, int]:
    parts, shapes, weights = [], [], 0
    for W, b in zip(est.coefs_, est.intercepts_, strict=True):
        parts += [W.ravel(), b]
        shapes.append((W.shape, b.size))
        weights += W.size
    return torch.as_tensor(np.concatenate(parts)), shapes, weights


def _mlp_weight_norm(theta: Tensor, shapes: list) -> Tensor:
    total, at = theta.new_zeros(()), 0
    for w_shape, b_size in shapes:
        total = total + theta[at: at + math.prod(w_shape)].pow(2).sum()
        at += math.prod(w_shape) + b_size
    return total


@pytest.mark.parametrize("kind", ["multiclass", "binary"])
def test_mlp_classifier(kind):
    X, y, Xt, yt = multiclass() if kind == "multiclass" else binary()
    alpha = 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = MLPClassifier(hidden_layer_sizes=(6,), activation="tanh", alpha=alpha, solver="lbfgs",
                            max_iter=3000, tol=1e-10, random_state=0).fit(X, y)
    theta, shapes, _ = _mlp_theta(est)
    n = len(y)
    Xd, Xtd = torch.as_tensor(X), torch.as_tensor(Xt)

    def loss(out, labels):
        if kind == "multiclass":
            return F.cross_entropy(out, torch.as_tensor(labels), reduction="none")
        return F.softplus(-_signed(torch.as_tensor(labels)) * out[:, 0])

    def terms(t):
        data = loss(_mlp_forward(t, shapes, Xd, "tanh"), y) / n
        return data + alpha / (2 * n) * _mlp_weight_norm(t, shapes) / n

    def test_loss(t):
        return loss(_mlp_forward(t, shapes, Xtd, "tanh"), yt)

    reference = _reference(terms, test_loss, theta, flat=kind == "multiclass")
    assert _relative(_ours(est, X, y, Xt, yt), reference) < 1e-6


@pytest.mark.parametrize("solver,batch", [("lbfgs", None), ("adam", 16)])
def test_mlp_regressor(solver, batch):
    """Adam stops short of a minimum (the Hessian there is indefinite): both sides damped."""
    X, y, Xt, yt = regression(targets=2)
    alpha, damping = 0.5, 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = MLPRegressor(hidden_layer_sizes=(5,), activation="relu", alpha=alpha,
                           solver=solver, batch_size=batch or "auto", max_iter=400,
                           random_state=0).fit(X, y)
    theta, shapes, _ = _mlp_theta(est)
    n = len(y)
    b = n if solver == "lbfgs" else batch
    Xd, Xtd = torch.as_tensor(X), torch.as_tensor(Xt)
    Y, Yt = torch.as_tensor(y), torch.as_tensor(yt)

    def terms(t):  # the objective each step minimises, b examples at a time
        data = 0.5 * (_mlp_forward(t, shapes, Xd, "relu") - Y).pow(2).mean(1) / n
        return data + alpha / (2 * b) * _mlp_weight_norm(t, shapes) / n

    def test_loss(t):
        return (_mlp_forward(t, shapes, Xtd, "relu") - Yt).pow(2).mean(1)

    # influencekit's R counts the squared error without scikit-learn's ½: R = 2·J
    reference = _reference(terms, test_loss, theta, damping=damping, scale=2.0)
    assert _relative(_ours(est, X, y, Xt, yt, damping=damping), reference) < 1e-6


def test_pipeline_uses_the_transformed_features():
    X, y, Xt, yt = binary()
    raw, raw_test = X * 5.0 + 2.0, Xt * 5.0 + 2.0
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, tol=1e-10)).fit(raw, y)
    scaled = pipe[0].transform(raw)
    direct = _ours(pipe[-1], scaled, y, pipe[0].transform(raw_test), yt)
    assert torch.allclose(_ours(pipe, raw, y, raw_test, yt), direct, rtol=1e-12, atol=0)


# --- refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator,data,words", [
    (LogisticRegression(l1_ratio=1.0, solver="saga", C=1.0), binary, "L1"),
    (LogisticRegression(class_weight="balanced"), binary, "class_weight"),
    (LinearSVC(), multiclass, "two classes"),
    (SVC(kernel="rbf"), binary, "kernel"),
    (SGDClassifier(loss="hinge"), binary, "log_loss"),
    (SGDRegressor(penalty="l1"), regression, "penalty"),
    (Ridge(positive=True), regression, "positive"),
])
def test_unsupported_settings_are_refused_with_what_is_supported(estimator, data, words):
    X, y, _, _ = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = copy.deepcopy(estimator).fit(X, y)
    with pytest.raises(ik.UnsupportedEstimatorError, match=words):
        ik.from_sklearn(est, X, y)


def test_unsupported_estimator_and_bad_data_are_refused():
    from sklearn.tree import DecisionTreeClassifier

    X, y, _, _ = binary()
    with pytest.raises(ik.UnsupportedEstimatorError, match="LogisticRegression"):
        ik.from_sklearn(DecisionTreeClassifier().fit(X, y), X, y)
    with pytest.raises(ik.InputError, match="not fitted"):
        ik.from_sklearn(LogisticRegression(), X, y)
    est = LogisticRegression().fit(X, y)
    with pytest.raises(ik.InputError, match="features"):
        ik.from_sklearn(est, X[:, :3], y)
    with pytest.raises(ik.InputError, match="not fitted on"):
        ik.from_sklearn(est, X, np.where(y == 1, 7, 0))


# --- leave-one-out against scikit-learn's refits -------------------------------------------------

def _test_loss(est, Xt, yt, X, y) -> Tensor:
    model, objective, _ = ik.from_sklearn(est, X, y, temperature=T)
    features, targets = ik.sklearn_data(est, Xt, yt)
    with torch.no_grad():
        return objective.test_loss(model(features), targets)


def _loo(est, X, y, Xt, yt, refit_params: Callable[[int], dict]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and actual change of each test loss when each training point is removed; the
    refit starts from the fitted coefficients (warm start) with the settings of refit_params(n)."""
    model, objective, train = ik.from_sklearn(est, X, y, temperature=T)
    inf = ik.Influence(model, objective, train, solver="direct", damping=0.0).fit()
    predicted = inf.loo_change(ik.sklearn_data(est, Xt, yt)).numpy()  # (m, n)
    base = _test_loss(est, Xt, yt, X, y).numpy()
    actual = np.zeros_like(predicted)
    n = len(y)
    for i in range(n):
        keep = np.arange(n) != i
        refit = copy.deepcopy(est).set_params(**refit_params(n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            refit.fit(X[keep], y[keep])
        actual[:, i] = _test_loss(refit, Xt, yt, X, y).numpy() - base
    return predicted, actual


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("case", ["logistic", "multinomial", "ridge", "squared-hinge-svc",
                                  "sgd-log", "sgd-squared"])
def test_predicted_leave_one_out_matches_sklearn_refits(case):
    """The removed point takes its share of the regulariser: the refit uses C·n/(n−1) or
    α·(n−1)/n (see influencekit.scikit)."""
    if case == "logistic":
        X, y, Xt, yt = binary(60, 6)
        est = LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000, warm_start=True)
        params = lambda n: {"C": 0.5 * n / (n - 1)}  # noqa: E731
    elif case == "multinomial":
        X, y, Xt, yt = multiclass(60, 6)
        est = LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000, warm_start=True)
        params = lambda n: {"C": 0.5 * n / (n - 1)}  # noqa: E731
    elif case == "ridge":
        X, y, Xt, yt = regression(60, 6)
        est = Ridge(alpha=4.0)
        params = lambda n: {"alpha": 4.0 * (n - 1) / n}  # noqa: E731
    elif case == "squared-hinge-svc":
        X, y, Xt, yt = binary(60, 6)
        est = LinearSVC(C=0.2, tol=1e-12, max_iter=100_000)
        params = lambda n: {"C": 0.2 * n / (n - 1)}  # noqa: E731
    else:  # SGD's α is per example: the refit keeps it; averaged SGD, run long, warm-started
        X, y, Xt, yt = binary(60, 6) if case == "sgd-log" else regression(60, 6)
        kind = (functools.partial(SGDClassifier, loss="log_loss") if case == "sgd-log" else
                SGDRegressor)
        est = kind(alpha=0.05, max_iter=5000, tol=None, average=True, random_state=0,
                   warm_start=True)
        params = lambda n: {}  # noqa: E731
    est.fit(X, y)
    predicted, actual = _loo(est, X, y, Xt, yt, params)
    assert _pearson(predicted, actual) > 0.99
    # the changes themselves, not only their ranking: a slope near 1 (first order: an exact
    # leave-one-out change exceeds its prediction by about 1/(1 − leverage), here up to ~20%)
    slope = float(np.dot(predicted.ravel(), actual.ravel()) / np.dot(predicted.ravel(),
                                                                     predicted.ravel()))
    assert 0.85 < slope < 1.3, slope


@pytest.mark.parametrize("kind", ["SVC", "LinearSVC"])
def test_hinge_svm_leave_one_out_through_the_smooth_hinge(kind):
    """The paper's Fig. 3 protocol on a small problem: influence through the smooth hinge at
    t = 0.001, evaluated at the hinge-trained weights, against hinge refits of the 40 points
    of largest predicted effect on a test point inside the margin. The paper reports R = 0.95
    on MNIST 1 vs 7 (this library's reproduction: 0.989); here, with 400 points of 30
    features, 0.86 (SVC) and 0.81 (LinearSVC): a first-order prediction through a smoothed
    loss, not an exact one (the squared hinge, LinearSVC's default, is: see above)."""
    X, y = load_breast_cancer(return_X_y=True)
    X = _standard(X)
    order = np.random.default_rng(0).permutation(len(y))
    X, y, held, held_y = X[order[:400]], y[order[:400]], X[order[400:]], y[order[400:]]
    est = (SVC(kernel="linear", C=0.05, tol=1e-10) if kind == "SVC" else
           LinearSVC(C=0.05, loss="hinge", tol=1e-12, max_iter=200_000)).fit(X, y)
    margins = (2 * held_y - 1) * est.decision_function(held)
    j = int(np.argmin(np.abs(margins - 0.5)))
    Xt, yt = held[j:j + 1], held_y[j:j + 1]
    model, objective, train = ik.from_sklearn(est, X, y, temperature=T)
    inf = ik.Influence(model, objective, train, solver="direct", damping=0.0,
                       stationarity_tol=None).fit()
    predicted = inf.loo_change(ik.sklearn_data(est, Xt, yt)).numpy()[0]
    top = np.argsort(-np.abs(predicted))[:40]
    base = _test_loss(est, Xt, yt, X, y).numpy()[0]
    actual = []
    for i in top:
        keep = np.arange(len(y)) != i
        refit = copy.deepcopy(est).set_params(C=est.C * len(y) / (len(y) - 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            refit.fit(X[keep], y[keep])
        actual.append(_test_loss(refit, Xt, yt, X, y).numpy()[0] - base)
    assert _pearson(predicted[top], np.array(actual)) > 0.75


def test_mlp_leave_one_out_tracks_warm_started_refits():
    X, y, Xt, yt = binary(60, 4)
    est = MLPClassifier(hidden_layer_sizes=(4,), activation="tanh", alpha=1.0, solver="lbfgs",
                        max_iter=5000, tol=1e-12, random_state=0, warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
    predicted, actual = _loo(est, X, y, Xt, yt, lambda n: {"alpha": 1.0 * (n - 1) / n})
    assert _pearson(predicted, actual) > 0.95
