"""The network experiments (fig2-cnn, sec51-rbf-vs-network, sec52-attack): models, pieces and the
conclusions of their quick variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from influencekit import reproduce
from influencekit.influence import Influence
from influencekit.objective import BinaryLogisticObjective
from influencekit.reproduce.fig2_cnn import Horizon, continued_training_losses, horizon
from influencekit.reproduce.networks import (
    DigitsCNN,
    FeatureMLP,
    FrozenFeatureClassifier,
    LogisticTop,
    RBFKernelMachine,
    as_images,
    median_heuristic_gamma,
    train_feature_extractor,
)
from influencekit.reproduce.runner import run_experiment
from influencekit.reproduce.sec52_attack_digits import (
    TopLayerAttack,
    correctly_classified,
    direct_flip_rate,
    invisible_after_quantisation,
)
from influencekit.training import minimize


def test_digits_cnn_has_the_papers_2616_parameters_and_any_image_size() -> None:
    model = DigitsCNN()
    assert sum(p.numel() for p in model.parameters()) == 2616
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_as_images_reshapes_square_images_and_rejects_others() -> None:
    assert as_images(torch.zeros(5, 64)).shape == (5, 1, 8, 8)
    with pytest.raises(ValueError, match="square images"):
        as_images(torch.zeros(5, 60))


def test_rbf_features_of_training_points_are_rows_of_the_kernel_cholesky_factor() -> None:
    X = torch.rand(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = RBFKernelMachine(X, median_heuristic_gamma(X)).double()
    Phi = model.features(X)
    assert torch.allclose(Phi @ Phi.T, model.kernel(X), atol=1e-7)
    assert torch.allclose(Phi.triu(1), torch.zeros_like(Phi), atol=1e-7)
    with pytest.raises(ValueError, match="gamma"):
        RBFKernelMachine(X, 0.0)


def test_feature_extractor_is_frozen_and_never_saw_the_excluded_digits() -> None:
    features = train_feature_extractor((1, 7), width=8, steps=5)
    assert not any(p.requires_grad for p in features.parameters())
    assert features(torch.zeros(2, 64, dtype=torch.float64)).shape == (2, 8)
    with pytest.raises(ValueError, match="fewer than two classes"):
        train_feature_extractor(tuple(range(9)), steps=1)


def _tiny_attack_setup() -> tuple[TopLayerAttack, FrozenFeatureClassifier]:
    from influencekit.datasets import digits

    torch.manual_seed(0)
    split = digits(classes=(1, 7))
    split.X_train, split.y_train = split.X_train[:40], split.y_train[:40]
    features = FeatureMLP(width=6).double().eval()
    for parameter in features.parameters():
        parameter.requires_grad_(False)
    with torch.no_grad():
        clean = features(split.X_train)
    setup = TopLayerAttack(features, split, clean)
    top = setup.fit_top(clean)
    setup.clean_state = top.state_dict()
    whole = FrozenFeatureClassifier(features, 6).double()
    whole.top.load_state_dict(top.top.state_dict())
    return setup, whole


def test_chain_rule_perturbation_influence_equals_tracking_the_top_of_the_whole_model() -> None:
    setup, whole = _tiny_attack_setup()
    objective = BinaryLogisticObjective(weight_decay=0.001)
    indices = torch.tensor([0, 3, 17])
    expected = Influence(whole, objective, setup.split.train, solver="direct",
                         params=["top"]).fit().perturbation_influence(
        (setup.split.X_test[2:3], setup.split.y_test[2:3]), indices)[0]
    top = setup.fit_top(setup.clean_features, setup.clean_state)
    got = setup.pixel_perturbation_influence(top, setup.clean_features, setup.split.X_train, 2,
                                             indices)
    assert got.shape == (3, 64)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-10)


def test_attack_stays_in_the_box_and_raises_the_test_loss() -> None:
    setup, _ = _tiny_attack_setup()
    result = setup.attack(target=0, k=2, steps=3)
    original = setup.split.X_train[result.indices]
    assert float((result.perturbed - original).abs().max()) <= 0.03 + 1e-12
    assert invisible_after_quantisation(original, result.perturbed)
    assert result.margin_after < result.margin_before
    assert result.predicted_first > 0 and result.actual_first > 0


def test_test_time_flip_rate_grows_with_the_budget() -> None:
    setup, _ = _tiny_attack_setup()
    targets = correctly_classified(setup)
    rates = [direct_flip_rate(setup, targets, budget) for budget in (0.0, 0.03, 0.3, 1.0)]
    assert rates[0] == 0.0 and rates == sorted(rates) and rates[-1] >= 0.5


def test_continued_training_is_deterministic_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    X, y = torch.randn(10, 1, 2, 2), torch.randint(0, 3, (10,))
    before = [p.clone() for p in model.parameters()]
    schedule = Horizon(lr=0.1, momentum=0.5, steps=6)
    first = continued_training_losses(model, X, y, (X[:1], y[:1]), 4, schedule, record_every=2)
    again = continued_training_losses(model, X, y, (X[:1], y[:1]), 4, schedule, record_every=2)
    kept = continued_training_losses(model, X, y, (X[:1], y[:1]), None, schedule, record_every=2)
    assert first.shape == (3,) and torch.equal(first, again) and not torch.equal(first, kept)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_horizon_relaxes_every_curvature_above_the_damping_to_one_percent() -> None:
    schedule = horizon(5.0, damping=0.01)
    left = {}
    for curvature in (0.001, 0.01, 0.1, 1.0, 5.0):  # heavy ball on ½·c·θ², from θ = 1
        theta, velocity = 1.0, 0.0
        for _ in range(schedule.steps):
            velocity = schedule.momentum * velocity + curvature * theta
            theta -= schedule.lr * velocity
        left[curvature] = abs(theta)
    assert left[0.1] <= 0.02 and left[1.0] <= 0.02
    assert left[0.01] <= 0.06 and left[5.0] <= 0.06
    assert left[0.001] >= 0.5  # far below the damping: barely moved, as the damping predicts
    with pytest.raises(ValueError, match="λ_max > λ_d"):
        horizon(0.001, damping=0.01)


def _quick(name: str, tmp_path: Path) -> dict[str, float]:
    run_experiment(reproduce.get(name), tmp_path, quick=True)
    return json.loads((tmp_path / name / "results.json").read_text())


def test_fig2_cnn_quick_matches_continued_training(tmp_path: Path) -> None:
    results = _quick("fig2-cnn", tmp_path)
    assert results["n_params"] == 2616 and results["n_points"] == 20
    assert results["pearson"] >= 0.86 and results["spearman"] >= 0.8
    assert results["ritz_min_damped_hessian"] > 0 and results["cg_residual"] < 1e-6
    assert results["predicted_over_actual"] > 0
    assert (tmp_path / "fig2-cnn" / "fig2_cnn.png").stat().st_size > 0


def test_sec51_quick_rbf_influence_is_local_and_same_class_network_is_not(tmp_path: Path) -> None:
    results = _quick("sec51-rbf-vs-network", tmp_path)
    assert results["spearman_distance_rbf"] <= -0.15
    assert results["spearman_distance_rbf"] < results["spearman_distance_network"] - 0.1
    assert results["spearman_distance_within_class_rbf"] <= -0.25
    assert abs(results["spearman_distance_within_class_network"]) <= 0.15
    assert results["same_class_top10_rbf"] >= 0.95
    assert results["same_class_top10_network"] <= 0.9
    for figure in ("sec51_influence_vs_distance.png", "sec51_helpful_images.png"):
        assert (tmp_path / "sec51-rbf-vs-network" / figure).stat().st_size > 0


def test_sec52_digits_quick_attack_is_invisible_and_follows_the_first_order_prediction(
        tmp_path: Path) -> None:
    results = _quick("sec52-attack-digits", tmp_path)
    assert results["budget_linf"] < 1 / 32 and results["invisible_after_quantisation"] == 1.0
    assert results["n_targets"] == 6
    assert results["success_rate_1"] <= results["success_rate_2"] <= results["success_rate_10"]
    assert results["median_margin_reduction_1"] > 3 * abs(
        results["median_margin_reduction_random_1"])
    assert results["first_step_pearson"] >= 0.95
    assert (tmp_path / "sec52-attack-digits" / "sec52_attack_digits.png").stat().st_size > 0


@pytest.mark.parametrize("name", ["sec51-rbf-vs-network", "sec52-attack", "sec52-attack-digits"])
def test_dog_fish_experiments_refuse_data_they_cannot_load(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no loader"):
        run_experiment(reproduce.get(name), tmp_path, quick=True, data=tmp_path)


def test_newton_refit_of_the_top_layer_is_unchanged_by_frozen_features() -> None:
    setup, whole = _tiny_attack_setup()
    objective = BinaryLogisticObjective(weight_decay=0.001)
    nn.init.zeros_(whole.top.weight)
    nn.init.zeros_(whole.top.bias)
    minimize(whole, objective, setup.split.train, params=["top"])
    top = LogisticTop(6).double()
    minimize(top, objective, (setup.clean_features, setup.split.y_train))
    assert torch.allclose(whole.top.weight, top.top.weight, atol=1e-8)
