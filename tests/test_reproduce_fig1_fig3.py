"""fig1-components and fig3-hinge: the paper's conclusions (quick variants) and their pieces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.svm import LinearSVC

from influencekit import reproduce
from influencekit.cli import main
from influencekit.datasets import digits
from influencekit.influence import Influence
from influencekit.objective import BinaryLogisticObjective
from influencekit.reproduce.common import fit_linear
from influencekit.reproduce.fig1_components import ablated_scores, signed_labels
from influencekit.reproduce.fig3_hinge import (
    DIGITS_WEIGHT_DECAY,
    HingeFitError,
    RefitCache,
    fit_hinge_svm,
    hinge_losses,
    smooth_hinge_loo,
)
from influencekit.reproduce.runner import run_experiment
from influencekit.solvers import Direct


@pytest.fixture(scope="module")
def digits17():
    return digits(classes=(1, 7))


@pytest.fixture(scope="module")
def svm_cache(digits17) -> RefitCache:
    X, y = digits17.X_train.numpy(), signed_labels(digits17.y_train).numpy()
    return RefitCache(X, y, DIGITS_WEIGHT_DECAY, fit_hinge_svm(X, y, DIGITS_WEIGHT_DECAY))


# ---------------------------------------------------------------- fig1-components


def test_fig1_quick_ablations_are_clearly_worse_than_influence(tmp_path: Path) -> None:
    record = run_experiment(reproduce.get("fig1-components"), tmp_path, quick=True)
    m = record.outcome.metrics
    assert m["pearson_true_vs_actual"] >= 0.99  # the real influence predicts the refits
    for name in ("no_loss_factor", "no_hessian", "neither"):
        assert m[f"pearson_{name}"] <= 0.85, name
        assert m[f"median_pearson_{name}"] <= 0.85, name
        assert m[f"pearson_{name}_vs_actual"] <= m["pearson_true_vs_actual"] - 0.2, name
    # Without H the sign is set by the label alone; the true influence has harmful same-label
    # (and helpful other-label) points.
    assert m["sign_follows_label_no_hessian"] == 1.0
    assert m["sign_follows_label_true"] <= 0.95
    folder = tmp_path / "fig1-components"
    assert (folder / "fig1_components.png").exists()
    assert (folder / "fig1_harmful_same_label.png").exists()


def test_fig1_true_influence_is_the_closed_form_up_to_the_regulariser_shift(digits17) -> None:
    """−I_up,loss from the library = y_t·y·σ_t·σ·x_tᵀH⁻¹x + λ·sᵀθ (the folded-in λθ)."""
    objective = BinaryLogisticObjective(weight_decay=0.01)
    model = fit_linear(objective, digits17, outputs=1)
    test = (digits17.X_test[:3], digits17.y_test[:3])
    influence = Influence(model, objective, digits17.train, solver=Direct()).fit()
    true = -influence.influence(test)
    G = influence.test_gradients(test)
    S = influence.solve(G)
    theta = model.weight.detach().reshape(-1)
    X, y = digits17.X_train, signed_labels(digits17.y_train)
    closed = (torch.sigmoid(-y * (X @ theta)) * -y)[None, :] * (S @ X.T)
    shift = 0.01 * (S @ theta)
    torch.testing.assert_close(true, closed + shift[:, None], rtol=1e-10, atol=1e-10)
    # Each ablation drops exactly its factor.
    scores = ablated_scores(theta, X, digits17.y_train, G[0], S[0])
    torch.testing.assert_close(scores["no_loss_factor"] * torch.sigmoid(-y * (X @ theta)),
                               closed[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scores["neither"] * torch.sigmoid(-y * (X @ theta)),
                               scores["no_hessian"], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the exact hinge SVM


def test_hinge_svm_is_certified_and_agrees_with_liblinear(digits17, svm_cache) -> None:
    svm = svm_cache.full
    assert svm.duality_gap <= 1e-12 and svm.kkt_violation <= 1e-9
    assert ((svm.dual >= 0) & (svm.dual <= 1)).all()
    X, y, lam = svm_cache.X, svm_cache.y, DIGITS_WEIGHT_DECAY
    n = len(y)
    # Independent: liblinear's dual coordinate descent (objective ½‖w‖² + C Σ hinge, C = 1/(nλ)).
    reference = LinearSVC(loss="hinge", C=1.0 / (n * lam), fit_intercept=False, dual=True,
                          tol=1e-10, max_iter=200_000).fit(X, y)
    w_ref = reference.coef_.ravel()

    def objective(w: np.ndarray) -> float:
        return float(hinge_losses(w, X, y).mean() + 0.5 * lam * w @ w)

    assert objective(svm.weights) <= objective(w_ref) + 1e-12
    np.testing.assert_allclose(svm.weights, w_ref, atol=1e-8)
    # Stationarity: λw = (1/n) Σ β_i y_i x_i with β a valid subgradient weight of each hinge.
    np.testing.assert_allclose(lam * svm.weights, (svm.dual * y) @ X / n, atol=1e-13)


def test_warm_started_refit_equals_a_cold_fit(svm_cache) -> None:
    violator = int(np.flatnonzero(svm_cache.full.partition() == 2)[0])
    keep = np.arange(len(svm_cache.y)) != violator
    cold = fit_hinge_svm(svm_cache.X[keep], svm_cache.y[keep], DIGITS_WEIGHT_DECAY)
    np.testing.assert_allclose(svm_cache.without(violator).weights, cold.weights, atol=1e-10)


def test_hinge_svm_refuses_an_uncertified_solution(svm_cache) -> None:
    with pytest.raises(HingeFitError, match="not solved exactly"):
        fit_hinge_svm(svm_cache.X[:40], svm_cache.y[:40], 0.1, gap_tol=-1.0)


def test_small_t_influence_is_exact_where_the_active_set_stays(digits17, svm_cache) -> None:
    """Removing a margin violator that moves no other point across the margin: the refit is
    linear in the removal, and SmoothHinge influence at t → 0 predicts it."""
    violators = np.flatnonzero(svm_cache.full.partition() == 2)
    stable = [int(i) for i in violators if svm_cache.same_active_set(int(i))]
    assert len(stable) >= 2
    X_test = digits17.X_test.numpy()
    y_test = signed_labels(digits17.y_test).numpy()
    j = int(np.argmax(hinge_losses(svm_cache.full.weights, X_test, y_test)))
    predicted = smooth_hinge_loo(svm_cache.full.weights, digits17, 1e-5, DIGITS_WEIGHT_DECAY,
                                 np.array([j]))[0].numpy()
    base = hinge_losses(svm_cache.full.weights, X_test[j : j + 1], y_test[j : j + 1])[0]
    for i in stable:
        actual = hinge_losses(svm_cache.without(i).weights, X_test[j : j + 1],
                              y_test[j : j + 1])[0] - base
        assert predicted[i] == pytest.approx(actual, rel=0.02, abs=1e-5)


# ---------------------------------------------------------------- fig3-hinge


def test_fig3_quick_smooth_hinge_beats_the_hinge(tmp_path: Path) -> None:
    record = run_experiment(reproduce.get("fig3-hinge"), tmp_path, quick=True)
    m = record.outcome.metrics
    assert m["pearson_t0.001"] >= 0.9
    assert m["pearson_t0.001"] >= m["pearson_t0"] + 0.3  # the plain hinge (H = λI) is poor
    assert m["pearson_t0.001"] > m["pearson_t0.1"]  # too much smoothing costs accuracy
    assert m["select_t0_pearson_t0.001"] >= m["select_t0_pearson_t0"] + 0.3
    assert m["max_duality_gap"] <= 1e-12 and m["max_kkt_violation"] <= 1e-9
    assert (tmp_path / "fig3-hinge" / "fig3_hinge.png").exists()


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_small_mnist(folder: Path, n_train: int = 150, n_test: int = 30, side: int = 10) -> None:
    """IDX files of side×side images of all ten digits, with a class-dependent stroke."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 90, size=(n, side, side))
        images[np.arange(n), labels % side, 2:8] = 255
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.mark.parametrize("name", ["fig1-components", "fig3-hinge"])
def test_runs_on_mnist_files_given_with_data(tmp_path: Path, name: str,
                                             capsys: pytest.CaptureFixture) -> None:
    _write_small_mnist(tmp_path / "mnist")
    code = main(["reproduce", name, "--quick", "--out", str(tmp_path / "out"),
                 "--data", str(tmp_path / "mnist")])
    assert code == 0
    assert "MNIST from" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / name / "results.json").read_text())
    assert all(np.isfinite(results[k]) for k in reproduce.get(name).keys)
    if name == "fig3-hinge":
        assert results["weight_decay"] == 0.01  # the paper's λ on the paper's data
