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
from influencekit.datasets.augment import Jitter, jitter_images
from influencekit.influence import Influence
from influencekit.objective import BinaryLogisticObjective
from influencekit.reproduce.common import fit_linear
from influencekit.reproduce.fig1_components import ablated_scores, signed_labels
from influencekit.reproduce.fig3_hinge import (
    PAPER_WEIGHT_DECAY,
    QUICK_AUGMENT_COPIES,
    HingeFitError,
    RefitCache,
    augmented_digits,
    fit_full,
    fit_hinge_svm,
    hinge_losses,
    smooth_hinge_loo,
    study,
)
from influencekit.reproduce.runner import run_experiment
from influencekit.solvers import Direct

# The solver's unit tests on the 252 plain digits use λ = 0.1, where several margin violators
# can be removed without moving any other point across the margin.
DIGITS_WEIGHT_DECAY = 0.1


@pytest.fixture(scope="module")
def digits17():
    return digits(classes=(1, 7))


@pytest.fixture(scope="module")
def svm_cache(digits17) -> RefitCache:
    X, y = digits17.X_train.numpy(), signed_labels(digits17.y_train).numpy()
    return RefitCache(X, y, DIGITS_WEIGHT_DECAY, fit_hinge_svm(X, y, DIGITS_WEIGHT_DECAY))


@pytest.fixture(scope="module")
def augmented():
    return augmented_digits(seed=0, copies=QUICK_AUGMENT_COPIES)


@pytest.fixture(scope="module")
def augmented_cache(augmented) -> RefitCache:
    return fit_full(augmented[0], PAPER_WEIGHT_DECAY)


# ---------------------------------------------------------------- augmentation


def test_jittered_copies_are_seeded_grouped_and_keep_the_originals(digits17) -> None:
    X = digits17.X_train.numpy()
    A, source = jitter_images(X, 5, seed=3)
    assert A.shape == (5 * len(X), 64) and source.shape == (5 * len(X),)
    np.testing.assert_array_equal(source, np.repeat(np.arange(len(X)), 5))
    np.testing.assert_array_equal(A[::5], X)  # each image's first row is itself
    assert A.min() >= 0.0 and A.max() <= 1.0
    B, _ = jitter_images(X, 5, seed=3)
    np.testing.assert_array_equal(A, B)
    assert not np.array_equal(A, jitter_images(X, 5, seed=4)[0])
    copies = A.reshape(len(X), 5, 64)[:, 1:]
    assert (np.abs(copies - X[:, None]).max(axis=2) > 0.0).all()  # every copy is changed...
    # ...but stays a digit of its class: its nearest original almost always has its label.
    labels = digits17.y_train.numpy()
    distance = np.linalg.norm(copies.reshape(-1, 1, 64) - X[None], axis=2)
    assert (labels[distance.argmin(axis=1)] == np.repeat(labels, 4)).mean() >= 0.98
    # Flat and (n, h, w) layouts give the same copies; without originals all rows are jittered.
    images, _ = jitter_images(X.reshape(-1, 8, 8), 5, seed=3)
    np.testing.assert_array_equal(images.reshape(-1, 64), A)
    fresh, _ = jitter_images(X, 2, seed=3, keep_originals=False)
    assert (np.abs(fresh[::2] - X).max(axis=1) > 0.0).all()


def test_jitter_identity_and_bad_inputs(digits17) -> None:
    X = digits17.X_train.numpy()[:10]
    still = Jitter(shift=0.0, rotation=0.0, scale=0.0, shear=0.0, noise=0.0)
    A, _ = jitter_images(X, 3, jitter=still, keep_originals=False)
    np.testing.assert_allclose(A, np.repeat(X, 3, axis=0), atol=1e-12)
    assert "elastic" in Jitter(elastic=0.5).describe()
    assert jitter_images(X, 2, jitter=Jitter(elastic=0.5))[0].shape == (20, 64)
    with pytest.raises(ValueError, match="at least 1"):
        jitter_images(X, 0)
    with pytest.raises(ValueError, match="not square"):
        jitter_images(X[:, :60], 2)


def test_augmented_digits_change_only_the_training_images(digits17, augmented) -> None:
    split, source = augmented
    assert len(split.y_train) == 252 * QUICK_AUGMENT_COPIES
    torch.testing.assert_close(split.X_test, digits17.X_test, rtol=0, atol=0)
    torch.testing.assert_close(split.y_test, digits17.y_test, rtol=0, atol=0)
    torch.testing.assert_close(split.y_train, digits17.y_train[source], rtol=0, atol=0)
    assert f"×{QUICK_AUGMENT_COPIES}" in split.name and "test images untouched" in split.name


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


def test_certified_refits_at_the_papers_lambda_on_augmented_data(augmented_cache) -> None:
    """n = 4,032, λ = 0.01: the warm-started primal active-set refit equals a cold fit for a
    removed violator, margin point and outside point, and all are certified."""
    cache = augmented_cache
    assert cache.full.duality_gap <= 1e-12 and cache.full.kkt_violation <= 1e-9
    partition = cache.full.partition()
    assert (partition == 1).sum() >= 1 and (partition == 2).sum() >= 100
    for side in (0, 1, 2):
        i = int(np.flatnonzero(partition == side)[0])
        warm = cache.without(i)
        assert warm.duality_gap <= 1e-12 and warm.kkt_violation <= 1e-9
        keep = np.arange(len(cache.y)) != i
        cold = fit_hinge_svm(cache.X[keep], cache.y[keep], PAPER_WEIGHT_DECAY)
        np.testing.assert_allclose(warm.weights, cold.weights, atol=1e-10)


def test_without_augmentation_the_papers_lambda_is_out_of_regime(digits17, augmented,
                                                                  augmented_cache) -> None:
    """252 images at λ = 0.01: a removal moves the margins by ‖x‖²/(nλ) ≈ 6, few points are on
    or inside the margin, and the smooth hinge predicts the refits worse (at this seed; it rests
    on a few large steps) than on the augmented set (‖x‖²/(nλ) ≈ 0.3), where every top point
    matters and each removal moves a small fraction of the points across the margin."""
    plain = fit_full(digits17, PAPER_WEIGHT_DECAY)
    for cache, low, high in ((plain, 3.0, 10.0), (augmented_cache, 0.1, 0.6)):
        scale = (cache.X ** 2).sum(1).mean() / (len(cache.y) * PAPER_WEIGHT_DECAY)
        assert low <= scale <= high
    plain_head = study(digits17, plain, 50, 1)[0]
    augmented_head = study(augmented[0], augmented_cache, 50, 1)[0]
    assert (plain.full.partition()[plain_head.removed] > 0).sum() <= 25
    assert (augmented_cache.full.partition()[augmented_head.removed] > 0).all()
    assert np.median(augmented_head.crossings) <= 0.01 * len(augmented_cache.y)
    assert plain_head.pearson(0.001) <= augmented_head.pearson(0.001) - 0.1


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
    assert m["weight_decay"] == PAPER_WEIGHT_DECAY  # the paper's λ, on augmented digits
    assert m["n_train"] == 252 * QUICK_AUGMENT_COPIES
    assert m["removal_margin_scale"] < 1.0  # the regime in which influence can predict refits
    assert m["pearson_t0.001"] >= 0.95
    assert m["pearson_t0.001"] >= m["pearson_t0"] + 0.2  # the plain hinge (H = λI) is worse
    assert m["pearson_t0.001"] > m["pearson_t0.1"]  # too much smoothing costs accuracy
    assert m["select_t0_pearson_t0.001"] >= m["select_t0_pearson_t0"] + 0.2
    assert m["max_duality_gap"] <= 1e-12 and m["max_kkt_violation"] <= 1e-9
    assert "augmented ×" in record.outcome.data and "test images untouched" in record.outcome.data
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
