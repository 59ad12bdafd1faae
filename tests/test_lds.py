"""Subset retraining and the linear datamodeling score (LDS), and ensembles of fitted models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import Tensor, nn

import influencekit as ik
from influencekit.training import minimize
from influencekit.validation import (
    SubsetGroundTruth,
    linear_datamodeling_score,
    loss_measurement,
    retrain_on_subsets,
    subset_masks,
)

from conftest import Problem, make_logreg


def _truth(masks: Tensor, measurements: Tensor) -> SubsetGroundTruth:
    return SubsetGroundTruth(masks, measurements, measurements[:, None, :], 0.5, 0)


def _linear_world(S: int = 40, n: int = 30, m: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(m, n, generator=g, dtype=torch.float64)
    return subset_masks(n, S, 0.5, seed), weights


def test_masks_have_the_size_asked_for_and_do_not_depend_on_how_many_are_drawn() -> None:
    masks = subset_masks(101, 30, fraction=0.3, seed=4)
    assert masks.dtype == torch.bool and masks.shape == (30, 101)
    assert (masks.sum(dim=1) == 30).all()  # round(0.3 * 101)
    assert torch.equal(subset_masks(101, 12, fraction=0.3, seed=4), masks[:12])
    assert len({tuple(row.tolist()) for row in masks}) == 30
    assert not torch.equal(subset_masks(101, 30, fraction=0.3, seed=5), masks)
    frequency = subset_masks(50, 400, 0.5, 0).double().mean(dim=0)  # each point about half
    assert (frequency - 0.5).abs().max() < 0.12


def test_spearman_per_test_point_matches_scipy() -> None:
    masks, weights = _linear_world()
    g = torch.Generator().manual_seed(1)
    measurements = torch.randn(masks.shape[0], weights.shape[0], generator=g,
                               dtype=torch.float64)
    result = linear_datamodeling_score(weights, _truth(masks, measurements))
    predicted = masks.double() @ weights.T
    expected = [stats.spearmanr(predicted[:, j], measurements[:, j])[0]
                for j in range(weights.shape[0])]
    np.testing.assert_allclose(result.per_point.numpy(), expected, atol=1e-12)
    assert result.mean == pytest.approx(float(np.mean(expected)), abs=1e-12)


def test_a_true_linear_datamodel_scores_one_and_its_negation_minus_one() -> None:
    masks, weights = _linear_world()
    truth = _truth(masks, masks.double() @ weights.T + 3.0)
    exact = linear_datamodeling_score(weights, truth)
    assert exact.mean == pytest.approx(1.0, abs=1e-12) and exact.defined == weights.shape[0]
    assert exact.low == pytest.approx(1.0) and exact.high == pytest.approx(1.0)
    assert linear_datamodeling_score(-weights, truth).mean == pytest.approx(-1.0, abs=1e-12)
    g = torch.Generator().manual_seed(7)
    noisy = _truth(masks, masks.double() @ weights.T
                   + 2.0 * torch.randn(masks.shape[0], weights.shape[0], generator=g,
                                       dtype=torch.float64))
    result = linear_datamodeling_score(weights, noisy, bootstrap=500)
    assert 0.2 < result.mean < 0.99
    assert result.low <= result.mean <= result.high
    assert "LDS" in str(result)


def test_a_constant_measurement_has_no_correlation_and_is_left_out_of_the_mean() -> None:
    masks, weights = _linear_world()
    measurements = masks.double() @ weights.T
    measurements[:, 2] = 1.0
    result = linear_datamodeling_score(weights, _truth(masks, measurements))
    assert torch.isnan(result.per_point[2]) and result.defined == weights.shape[0] - 1
    assert result.mean == pytest.approx(1.0)


def test_lds_refuses_a_transposed_or_non_finite_attribution() -> None:
    masks, weights = _linear_world()
    truth = _truth(masks, masks.double() @ weights.T)
    with pytest.raises(ik.ShapeMismatchError, match="transposed"):
        linear_datamodeling_score(weights.T, truth)
    broken = weights.clone()
    broken[0, 0] = float("nan")
    with pytest.raises(ik.NonFiniteError):
        linear_datamodeling_score(broken, truth)


class _Trainer:
    """Logistic regression refit from zero on the given points (counts its calls)."""

    def __init__(self, problem: Problem, fail_after: int | None = None) -> None:
        self.problem, self.calls, self.fail_after = problem, 0, fail_after

    def __call__(self, indices: Tensor, seed: int) -> nn.Module:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        model = nn.Linear(self.problem.X.shape[1], 3, bias=False).double()
        nn.init.zeros_(model.weight)
        minimize(model, self.problem.objective, (self.problem.X[indices],
                                                 self.problem.y[indices]), tol=1e-12)
        return model


def test_retraining_records_each_subsets_test_losses(tmp_path) -> None:
    problem = make_logreg(n=40)
    truth = retrain_on_subsets(_Trainer(problem), loss_measurement(problem.objective,
                                                                         problem.test),
                               n=40, subsets=4, out=tmp_path / "truth", progress=False)
    assert truth.masks.shape == (4, 40) and truth.measurements.shape == (4, 10)
    for s in range(4):  # independently: the losses of a model fitted on that subset
        model = _Trainer(problem)(truth.masks[s].nonzero().reshape(-1), 0)
        logits = model(problem.X_test)
        expected = nn.functional.cross_entropy(logits, problem.y_test, reduction="none")
        torch.testing.assert_close(truth.measurements[s], expected.detach(), rtol=0, atol=1e-12)


def test_a_killed_ground_truth_job_resumes_bit_for_bit_and_grows_without_retraining(
        tmp_path) -> None:
    problem = make_logreg(n=40)
    measure = loss_measurement(problem.objective, problem.test)
    reference = retrain_on_subsets(_Trainer(problem), measure, n=40, subsets=5, seeds=2,
                                   progress=False)
    folder = tmp_path / "truth"
    killed = _Trainer(problem, fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        retrain_on_subsets(killed, measure, n=40, subsets=5, seeds=2, out=folder, progress=False)
    resumed = _Trainer(problem)
    truth = retrain_on_subsets(resumed, measure, n=40, subsets=5, seeds=2, out=folder,
                               progress=False)
    assert resumed.calls == 10 - 3
    assert torch.equal(truth.per_seed, reference.per_seed)
    assert torch.equal(truth.masks, reference.masks)
    grown = _Trainer(problem)
    more = retrain_on_subsets(grown, measure, n=40, subsets=7, seeds=2, out=folder,
                              progress=False)
    assert grown.calls == 4 and torch.equal(more.per_seed[:5], truth.per_seed)
    with pytest.raises(ik.CacheMismatchError, match="fraction"):
        retrain_on_subsets(_Trainer(problem), measure, n=40, subsets=5, fraction=0.4,
                           out=folder, progress=False)


def test_retraining_refuses_bad_measurements_and_settings() -> None:
    problem = make_logreg(n=40)
    trainer = _Trainer(problem)
    with pytest.raises(ik.ShapeMismatchError, match=r"\(m,\)"):
        retrain_on_subsets(trainer, lambda model: torch.zeros(2, 2), n=40, subsets=3,
                           progress=False)
    with pytest.raises(ik.NonFiniteError, match="diverged"):
        retrain_on_subsets(trainer, lambda model: torch.full((3,), float("nan")), n=40,
                           subsets=3, progress=False)
    with pytest.raises(ik.InvalidSettingError, match="fraction"):
        retrain_on_subsets(trainer, lambda model: torch.zeros(3), n=40, fraction=0.01,
                           progress=False)
    with pytest.raises(ik.InputTypeError, match="Module"):
        retrain_on_subsets(lambda indices, seed: None, lambda model: torch.zeros(3), n=40,
                           subsets=3, progress=False)


def test_influence_ranks_convex_refits_far_better_than_chance() -> None:
    """On a regularised logistic regression the summed influence predicts the refit losses
    (the faithfulness the LDS measures); a random attribution does not, and the sign matters."""
    problem = make_logreg(n=60, weight_decay=0.05)
    truth = retrain_on_subsets(_Trainer(problem), loss_measurement(problem.objective,
                                                                         problem.test),
                               n=60, subsets=24, progress=False)
    inf = ik.Influence(problem.model, problem.objective, problem.train, solver="direct",
                       damping=0.0).fit()
    scores = inf.influence(problem.test)
    faithful = linear_datamodeling_score(scores, truth)
    assert faithful.mean > 0.8
    assert linear_datamodeling_score(-inf.loo_change(problem.test), truth).mean == (
        pytest.approx(faithful.mean))
    assert linear_datamodeling_score(-scores, truth).mean < -0.8
    g = torch.Generator().manual_seed(0)
    chance = linear_datamodeling_score(torch.randn(scores.shape, generator=g), truth)
    assert abs(chance.mean) < 0.35


def test_an_ensemble_is_the_mean_of_its_members() -> None:
    a = make_logreg(n=40, weight_decay=0.05)
    b = make_logreg(n=40, weight_decay=0.2)  # same data, another model
    members = [ik.Influence(p.model, p.objective, p.train, solver="direct", damping=0.0).fit()
               for p in (a, b)]
    ensemble = ik.Ensemble(members)
    expected = (members[0].influence(a.test) + members[1].influence(a.test)) / 2
    torch.testing.assert_close(ensemble.influence(a.test), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(ensemble.loo_change(a.test), -expected / 40, rtol=1e-12, atol=0)
    torch.testing.assert_close(ensemble.self_influence(),
                               (members[0].self_influence() + members[1].self_influence()) / 2)
    top = ensemble.top_k(a.test, k=3)
    assert torch.equal(top.helpful, (-expected).topk(3, dim=1).indices)
    fitted = ik.Ensemble.fit([a.model, a.model], a.objective, a.train, solver="direct",
                             damping=0.0)
    torch.testing.assert_close(fitted.influence(a.test), members[0].influence(a.test))
    assert len(fitted) == 2
    other = make_logreg(n=30)
    with pytest.raises(ik.ShapeMismatchError, match="different numbers"):
        ik.Ensemble([members[0], ik.Influence(other.model, other.objective, other.train,
                                              solver="direct", damping=0.0).fit()])
    with pytest.raises(ik.InvalidSettingError):
        ik.Ensemble([])


def test_shares_of_processes_fill_one_folder_with_what_one_process_computes(tmp_path) -> None:
    problem = make_logreg(n=40)
    measure = loss_measurement(problem.objective, problem.test)
    reference = retrain_on_subsets(_Trainer(problem), measure, n=40, subsets=5, progress=False)
    folder = tmp_path / "truth"
    first, second = _Trainer(problem), _Trainer(problem)
    assert retrain_on_subsets(first, measure, n=40, subsets=5, out=folder, progress=False,
                              share=(0, 2)) is None
    truth = retrain_on_subsets(second, measure, n=40, subsets=5, out=folder, progress=False,
                               share=(1, 2))
    assert (first.calls, second.calls) == (3, 2)
    assert truth is not None and torch.equal(truth.per_seed, reference.per_seed)
    with pytest.raises(ik.InvalidSettingError, match="out="):
        retrain_on_subsets(first, measure, n=40, subsets=5, share=(0, 2), progress=False)
