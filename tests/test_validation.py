"""Ground truth by retraining, and the faithfulness of influence against it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

import influencekit as ik
from influencekit.datasets import digits
from influencekit.training import minimize, train_steps
from influencekit.validation import (
    ContinuedTraining,
    ConvexRefit,
    actual_loo_changes,
    correlations,
    validate,
)

from conftest import make_binary_logreg, make_logreg


def test_minimize_matches_scikit_learn_logistic_regression() -> None:
    """(1/n)Σ log(1+e^{−y wᵀx}) + (λ/2)‖w‖² is sklearn's objective with C = 1/(nλ)."""
    problem = make_binary_logreg(n=80, weight_decay=0.1)
    n, lam = 80, 0.1
    for method in ("newton", "lbfgs"):
        model = nn.Linear(4, 1, bias=False).double()
        nn.init.zeros_(model.weight)
        report = minimize(model, problem.objective, problem.train, method=method, tol=1e-9)
        assert report.converged
        reference = LogisticRegression(C=1.0 / (n * lam), fit_intercept=False, tol=1e-12,
                                       max_iter=10_000).fit(problem.X.numpy(), problem.y.numpy())
        np.testing.assert_allclose(model.weight.detach().numpy(), reference.coef_, rtol=1e-6)


def test_actual_loo_changes_match_scikit_learn_refits_from_scratch() -> None:
    problem = make_binary_logreg(n=60, weight_decay=0.1)
    n, lam = 60, 0.1
    removed = [0, 9, 33]
    actual = actual_loo_changes(problem.model, problem.objective, problem.train, problem.test,
                                removed)
    assert actual.shape == (problem.X_test.shape[0], 3)

    def test_losses(coef: np.ndarray) -> np.ndarray:
        margin = (2 * problem.y_test.numpy() - 1) * (problem.X_test.numpy() @ coef.ravel())
        return np.logaddexp(0.0, -margin)

    def fit(keep: np.ndarray) -> np.ndarray:
        return LogisticRegression(C=1.0 / (keep.sum() * lam), fit_intercept=False, tol=1e-13,
                                  max_iter=10_000).fit(problem.X.numpy()[keep],
                                                       problem.y.numpy()[keep]).coef_

    base = test_losses(fit(np.ones(n, dtype=bool)))
    for col, i in enumerate(removed):
        keep = np.arange(n) != i
        np.testing.assert_allclose(actual[:, col].numpy(), test_losses(fit(keep)) - base,
                                   atol=1e-8)


def test_influence_predicts_leave_one_out_on_digits_logistic_regression() -> None:
    """The paper's Fig. 2 (left) in miniature: top 50 by |influence| on a high-loss test point."""
    data = digits()
    model = nn.Linear(64, 10, bias=False).double()
    objective = ik.CrossEntropyObjective(weight_decay=0.01)
    minimize(model, objective, data.train, tol=1e-10)
    with torch.no_grad():
        losses = objective.test_loss(model(data.X_test), data.y_test)
    j = int(losses.argmax())
    inf = ik.Influence(model, objective, data.train, solver="cg").fit()
    result = validate(inf, (data.X_test[j : j + 1], data.y_test[j : j + 1]), num_points=50)
    assert result.actual.shape == result.predicted.shape == (1, 50)
    assert result.pearson >= 0.99
    assert result.spearman >= 0.95
    top = inf.loo_change((data.X_test[j : j + 1], data.y_test[j : j + 1])).abs().topk(50).indices
    assert set(result.indices.tolist()) == set(top[0].tolist())


def test_continued_full_batch_training_converges_to_the_convex_refit() -> None:
    problem = make_logreg(n=40, weight_decay=0.2)
    removed = [2, 11]
    refit = actual_loo_changes(problem.model, problem.objective, problem.train, problem.test,
                               removed, ConvexRefit())
    continued = actual_loo_changes(
        problem.model, problem.objective, problem.train, problem.test, removed,
        ContinuedTraining(steps=1500, optimizer="sgd", lr=1.0, batch_size=10_000))
    torch.testing.assert_close(continued, refit, rtol=1e-4, atol=1e-7)


def test_retraining_leaves_the_callers_model_alone() -> None:
    problem = make_logreg(n=30)
    before = problem.theta().clone()
    actual_loo_changes(problem.model, problem.objective, problem.train, problem.test, [0],
                       ContinuedTraining(steps=5))
    torch.testing.assert_close(problem.theta(), before, rtol=0, atol=0)


def test_train_steps_is_deterministic_given_the_seed() -> None:
    problem = make_logreg(n=30)
    weights = []
    for seed in (0, 0, 1):
        model = nn.Linear(5, 3, bias=False).double()
        model.load_state_dict(problem.model.state_dict())
        train_steps(model, problem.objective, problem.train, steps=7, batch_size=4, seed=seed,
                    lr=0.1)
        weights.append(model.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)
    assert not torch.equal(weights[0], weights[2])


def test_correlations_match_numpy_and_handle_constants() -> None:
    a, b = torch.randn(30), torch.randn(30)
    pearson, spearman = correlations(a, b)
    assert pearson == pytest.approx(float(np.corrcoef(a.numpy(), b.numpy())[0, 1]), rel=1e-6)
    ranks = np.argsort(np.argsort(a.numpy())), np.argsort(np.argsort(b.numpy()))
    assert spearman == pytest.approx(float(np.corrcoef(*ranks)[0, 1]), rel=1e-6)
    assert np.isnan(correlations(torch.ones(5), b[:5])[0])


def test_unconverged_refit_is_an_error_not_a_silent_ground_truth() -> None:
    problem = make_logreg(n=30)
    with pytest.raises(RuntimeError, match="did not reach"):
        actual_loo_changes(problem.model, problem.objective, problem.train, problem.test, [0],
                           ConvexRefit(method="lbfgs", tol=1e-30, max_iter=3))


def _noisy_network() -> tuple[nn.Module, ik.Objective, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3),
                          nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(3, (40,), generator=g)
    return model, ik.CrossEntropyObjective(weight_decay=0.01), (X, y)


def test_train_steps_seeds_dropout_and_leaves_the_global_generator_alone() -> None:
    model, objective, train = _noisy_network()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for _ in range(2):
        model.load_state_dict(state)
        torch.manual_seed(123)
        train_steps(model, objective, train, steps=5, batch_size=8, seed=4, lr=0.05)
        results.append((model[0].weight.detach().clone(), torch.rand(1)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)


def test_continued_training_restores_batch_norm_statistics_between_removals() -> None:
    model, objective, train = _noisy_network()
    test = (train[0][:3], train[1][:3])
    retraining = ContinuedTraining(steps=6, lr=0.05, batch_size=8)
    changes = actual_loo_changes(model, objective, train, test, [5, 5, 5], retraining)
    torch.testing.assert_close(changes[:, 0], changes[:, 1], rtol=0, atol=0)
    torch.testing.assert_close(changes[:, 0], changes[:, 2], rtol=0, atol=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"steps": -1}, "steps must be a non-negative integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"lr": 0.0}, "lr must be a finite number > 0"),
])
def test_train_steps_checks_its_settings(kwargs: dict, message: str) -> None:
    model, objective, train = _noisy_network()
    settings = {"steps": 1, "batch_size": 4, "lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        train_steps(model, objective, train, **settings)
