"""Fig. 3: influence for a non-differentiable loss, a linear SVM, through the smooth hinge.

Paper: linear SVM without bias on MNIST 1 vs 7 (~13,000 training images), λ = 0.01, trained on
the hinge loss. Influence is computed at the hinge-trained weights with
SmoothHinge(s, t) = t·log(1 + exp((1 − s)/t)) for t = 0 (the hinge itself: its curvature is
zero almost everywhere, so H = λI), t = 0.001 and t = 0.1, and compared with the actual change
of the (hinge) test loss after refitting the hinge SVM without each of the 100 most influential
training points: R = 0.63, 0.95 and 0.91.

Here:

- Data. ``--data``: MNIST 1 vs 7 from its IDX files, as the paper. Without it, scikit-learn's
  bundled digits 1 vs 7 (8×8; 252 training and 109 test images), with the *training* images
  augmented to the paper's scale (:func:`augmented_digits`): each of the 252 is kept and joined
  by 49 seeded jittered copies (:func:`~influencekit.datasets.augment.jitter_images`: random
  sub-pixel shifts ≤ 0.5 px by bilinear interpolation, rotations ≤ 5°, scaling ≤ 5 %, shear
  ≤ 0.05, Gaussian pixel noise σ = 0.02, clipped to [0, 1]), n = 12,600. The test images are
  the bundled ones, untouched. ``--quick``: ×16, n = 4,032, 50 refits, one test point.
- Why augment: removing one point moves the other margins by about ‖x‖²/(nλ) (w moves by
  y_i x_i/(nλ) for a margin violator), and influence — a derivative at the full solution — can
  predict a hinge refit only when that is well below 1, so that a removal moves few points
  across the margin (the SVM's solution is piecewise linear in the weight of a point; the
  smooth-hinge influence at small t follows its slope). MNIST at λ = 0.01: n ≈ 13,000 and
  ‖x‖² ≈ 50–100 (an estimate; ``--data`` reports ``removal_margin_scale``) give ≈ 0.4–0.8.
  The 252 digits give ‖x‖²/(nλ) ≈ 6.1 at λ = 0.01: only ~25 points are on or inside the
  margin, so the top 100 hold ~15 removals that matter, and each of those moves up to ~5 % of
  the other points across the margin (the full run reports this setting as ``unaugmented_*``;
  its correlation rests on those few large steps and varies strongly with the seed). 12,600
  images give ≈ 0.1: all 100 removals matter, and each moves a median of ~8 of the 12,600
  points (< 0.1 %) across the margin. The copies are correlated (252 handwritings), so the 100
  points refitted come from fewer distinct images (``n_sources_removed``).
- The SVM is solved exactly (:func:`fit_hinge_svm`) and every fit is certified by its duality
  gap (≈ 1e-16) and KKT violation. A cold fit: the dual box QP by L-BFGS-B, then its active set
  (margin violators β = 1, points on the margin 0 < β < 1, the rest β = 0) is identified and the
  KKT system solved directly. A leave-one-out refit: a primal active-set walk from the full
  solution (:func:`_primal_active_set`) that visits only the kinks the removal crosses (~0.05 s
  at n = 12,600). The paper used scikit-learn's ``LinearSVC(loss="hinge")`` at tol 1e-6: ~1e-6
  off in ‖w − w*‖/‖w*‖, and without a certificate; at tol 1e-10 it agrees with this solver to
  ~1e-11 (the tests check that).
- Test points: those with positive hinge loss, highest first (at most ten; the paper picked its
  test point among the ten lowest test margins); the figure and ``pearson_*`` use the highest,
  ``median_pearson_*`` all of them. A test point with margin ≥ 1 has zero loss and gradient.
- The 100 points refitted are those with the largest |influence| at t = 0.001 (the same points for
  every t). The reference code chose them by |influence| at t = 0 instead (its ``maxinf`` on the
  hinge model); those correlations are reported too (``select_t0_*``).
- ``median_margin_crossings``: per removal, how many of the other points the refit moves across
  the margin (0 = the refit stays on one linear piece of the solution path, where the
  smooth-hinge influence at t → 0 is exact); ``pearson_t0.001_same_active_set`` is the
  correlation over such removals (omitted when fewer than 10 qualify).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize as scipy_minimize
from torch import Tensor

from ..datasets import Split, digits
from ..datasets.augment import Jitter, jitter_images
from ..influence import Influence
from ..objective import SmoothHingeObjective
from ..report import plots
from ..solvers import Direct
from ..validation import correlations
from .base import Experiment, Outcome, RunSettings
from .common import image_data, zero_linear

PAPER_WEIGHT_DECAY = 0.01
CLASSES = (1, 7)
TEMPERATURES = (0.0, 0.001, 0.1)
SELECT_BY = 0.001
NUM_POINTS = 100
NUM_TEST_POINTS = 10  # the paper picked its test point among the ten lowest test margins
AUGMENT_COPIES = 50  # 252 digits 1 and 7 → n = 12,600 (MNIST 1 vs 7: 13,007)
QUICK_AUGMENT_COPIES = 16  # n = 4,032 for --quick: ‖x‖²/(nλ) ≈ 0.3
LOO_CHUNK = 4096  # examples per vectorised pass of the influence (few passes at n ≈ 13,000)
# Small on 8×8 images (0.5 px ≈ 1.75 px on MNIST's 28×28): 99.8 % of the copies have a nearest
# original of their own class.
DIGITS_JITTER = Jitter(shift=0.5, rotation=5.0, scale=0.05, shear=0.05, noise=0.02)


class HingeFitError(RuntimeError):
    """The exact hinge-SVM solver could not certify its solution."""


@dataclass(frozen=True)
class HingeSVM:
    """Exact minimiser of R(w) = (1/n) Σ max(0, 1 − y_i wᵀx_i) + (λ/2)‖w‖², with its certificate.

    Attributes:
        weights: ``(p,)`` w = Σ β_i y_i x_i / (nλ).
        dual: ``(n,)`` β ∈ [0, 1]: 1 for margin violators, 0 outside the margin, between on it.
        duality_gap: R(w) − D(β) with D(β) = (1/n) Σ β_i − (λ/2)‖w‖² (zero at the optimum).
        kkt_violation: largest violation of the optimality conditions (box, margins).
    """

    weights: np.ndarray
    dual: np.ndarray
    duality_gap: float
    kkt_violation: float

    def partition(self) -> np.ndarray:
        """``(n,)`` int: 0 outside the margin (β = 0), 1 on it (0 < β < 1), 2 violating it."""
        return np.where(self.dual >= 1.0, 2, np.where(self.dual > 0.0, 1, 0))


def _dual_weights(Z: np.ndarray, beta: np.ndarray, weight_decay: float) -> np.ndarray:
    """w(β) = Zᵀβ / (nλ) for Z = y[:, None]·X ``(n, p)``."""
    return Z.T @ beta / (Z.shape[0] * weight_decay)


def _certificate(Z: np.ndarray, beta: np.ndarray,
                 weight_decay: float) -> tuple[np.ndarray, float, float]:
    """w(β), the duality gap R(w) − D(β), and the KKT violation of (w, β)."""
    w = _dual_weights(Z, beta, weight_decay)
    margins = Z @ w
    regulariser = 0.5 * weight_decay * float(w @ w)
    gap = float(np.maximum(0.0, 1.0 - margins).mean() + regulariser
                - (beta.mean() - regulariser))
    violation = np.where(beta <= 0.0, np.maximum(0.0, 1.0 - margins),
                         np.where(beta >= 1.0, np.maximum(0.0, margins - 1.0),
                                  np.abs(margins - 1.0)))
    box = np.maximum(0.0, np.maximum(-beta, beta - 1.0))
    return w, gap, float(max(violation.max(), box.max()))


def _dual_lbfgsb(Z: np.ndarray, beta: np.ndarray, weight_decay: float,
                 gtol: float) -> np.ndarray:
    """Approximate dual by L-BFGS-B: min_β ‖Zᵀβ‖²/(2nλ) − Σβ over [0, 1]ⁿ (gradient Zw − 1)."""
    n = Z.shape[0]

    def value_and_gradient(b: np.ndarray) -> tuple[float, np.ndarray]:
        v = Z.T @ b
        return float(v @ v) / (2 * n * weight_decay) - float(b.sum()), Z @ v / (
            n * weight_decay) - 1.0

    result = scipy_minimize(value_and_gradient, beta, jac=True, method="L-BFGS-B",
                            bounds=[(0.0, 1.0)] * n,
                            options={"maxiter": 50_000, "ftol": 0.0, "gtol": gtol,
                                     "maxcor": 30})
    return np.clip(result.x, 0.0, 1.0)


def _active_set(Z: np.ndarray, beta: np.ndarray, weight_decay: float,
                max_iter: int = 50) -> np.ndarray | None:
    """Primal-dual active-set iteration from ``beta``; ``None`` if the sets do not settle.

    Each step predicts the sets from β + (1 − m) (violators > 1, outside < 0, on the margin
    otherwise), sets β = 1 / 0 on the first two and solves m_i = 1 for the rest:
    (Z_F Z_Fᵀ) β_F = nλ·1 − Z_F Z_Uᵀ 1.
    """
    n = Z.shape[0]
    previous = None
    for _ in range(max_iter):
        score = beta + 1.0 - Z @ _dual_weights(Z, beta, weight_decay)
        upper, lower = score > 1.0, score < 0.0
        free = ~(upper | lower)
        key = (upper.tobytes(), free.tobytes())
        if key == previous:
            return beta
        previous = key
        Z_free = Z[free]
        rhs = n * weight_decay - Z_free @ Z[upper].sum(axis=0)
        beta = np.zeros(n)
        beta[upper] = 1.0
        beta[free] = np.linalg.lstsq(Z_free @ Z_free.T, rhs, rcond=None)[0]
    return None


def _primal_active_set(Z: np.ndarray, w: np.ndarray, weight_decay: float,
                       margin_tol: float = 1e-9, max_iter: int = 20_000) -> np.ndarray | None:
    """Exact dual β by a primal active-set walk from the weights ``w``; ``None`` if it stalls.

    R(w) is quadratic between the kinks m_j = z_jᵀw = 1. With V = {m < 1} (β = 1), the points
    held on the margin F (m = 1) and the rest (β = 0), its minimiser on the face {Z_F w = 1} is
    w* = (Σ_V z_j + Z_Fᵀβ_F)/(nλ) with (Z_F Z_Fᵀ) β_F = nλ·1 − Z_F Σ_V z_j. Each step moves from
    w towards w* until the first point outside F reaches its kink (it joins F); at w* itself, a
    point of F with β_j < 0 is released above the margin and one with β_j > 1 below it (the
    active-set method for convex QPs: R decreases at every step, and at w* with β_F ∈ [0, 1]
    the KKT conditions hold). From a nearby problem's solution (a leave-one-out refit) only the
    few points whose kinks the removal crosses are visited.
    """
    n = Z.shape[0]
    scale = n * weight_decay
    margins = Z @ w
    on = np.abs(margins - 1.0) <= margin_tol
    below = (margins < 1.0) & ~on
    held = list(np.flatnonzero(on))
    if held:  # put w on the face exactly: the least-norm correction with Z_F w = 1
        Z_F = Z[held]
        w = w + Z_F.T @ np.linalg.lstsq(Z_F @ Z_F.T, 1.0 - Z_F @ w, rcond=None)[0]
        margins = Z @ w
    for _ in range(max_iter):
        in_face = np.zeros(n, bool)
        in_face[held] = True
        Z_F = Z[held]
        pulled = Z[below].sum(axis=0)
        try:
            beta_F = np.linalg.solve(Z_F @ Z_F.T, scale - Z_F @ pulled) if held else np.zeros(0)
        except np.linalg.LinAlgError:
            return None
        target = (pulled + Z_F.T @ beta_F) / scale
        step = Z @ (target - w)
        # Points below the margin reach it moving up, points above it moving down.
        rising = below & ~in_face & (step > 0.0)
        falling = ~below & ~in_face & (step < 0.0)
        alpha = np.full(n, np.inf)
        alpha[rising] = np.maximum(1.0 - margins[rising], 0.0) / step[rising]
        alpha[falling] = np.maximum(margins[falling] - 1.0, 0.0) / -step[falling]
        j = int(np.argmin(alpha))
        if alpha[j] < 1.0:
            w = w + alpha[j] * (target - w)
            margins = Z @ w
            held.append(j)
            below[j] = False
            continue
        w, margins = target, Z @ target
        worst = int(np.argmax(np.maximum(-beta_F, beta_F - 1.0))) if held else -1
        if not held or max(-beta_F[worst], beta_F[worst] - 1.0) <= 1e-12:
            beta = below.astype(float)
            beta[held] = np.clip(beta_F, 0.0, 1.0)
            return beta
        released = held.pop(worst)
        below[released] = beta_F[worst] > 1.0
    return None


def fit_hinge_svm(X: np.ndarray, y: np.ndarray, weight_decay: float,
                  start: np.ndarray | None = None, gap_tol: float = 1e-12,
                  kkt_tol: float = 1e-9) -> HingeSVM:
    """The exact linear SVM (no bias) for inputs ``(n, p)`` and labels ±1 ``(n,)``.

    Minimises (1/n) Σ max(0, 1 − y_i wᵀx_i) + (λ/2)‖w‖² — the objective of
    ``LinearSVC(loss="hinge", C=1/(nλ), fit_intercept=False)`` divided by nC. ``start`` is a
    weight vector ``(p,)`` to begin from (e.g. the full data's solution for a leave-one-out
    refit): a primal active-set walk from it (:func:`_primal_active_set`) usually needs a few
    steps. Without it, or if that fails, the dual is refined by L-BFGS-B and polished by an
    active-set solve. Raises :class:`HingeFitError` unless the duality gap is ≤ ``gap_tol`` and
    the KKT violation ≤ ``kkt_tol``.
    """
    Z = y[:, None] * X
    gap, violation = float("nan"), float("nan")

    def candidates() -> Iterator[np.ndarray | None]:
        if start is not None:
            yield _primal_active_set(Z, np.asarray(start, dtype=float), weight_decay)
        beta = np.full(len(y), 0.5)
        for gtol in (1e-4, 1e-9, 1e-12):
            beta = _dual_lbfgsb(Z, beta, weight_decay, gtol)
            yield _active_set(Z, beta, weight_decay)
            yield _primal_active_set(Z, _dual_weights(Z, beta, weight_decay), weight_decay)

    for polished in candidates():
        if polished is None:
            continue
        w, gap, violation = _certificate(Z, polished, weight_decay)
        if abs(gap) <= gap_tol and violation <= kkt_tol:
            return HingeSVM(w, polished, abs(gap), violation)
    raise HingeFitError(
        f"The hinge SVM (n = {len(y)}, λ = {weight_decay}) was not solved exactly: duality gap "
        f"{gap:.3g} (need ≤ {gap_tol:g}), KKT violation {violation:.3g} (need ≤ {kkt_tol:g}). "
        "The active set did not settle; duplicated or degenerate points can cause this.")


def hinge_losses(weights: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """max(0, 1 − y·wᵀx) per row, ``(m,)``."""
    return np.maximum(0.0, 1.0 - y * (X @ weights))


@dataclass
class RefitCache:
    """Leave-one-out hinge refits, each computed once, warm-started from the full solution."""

    X: np.ndarray
    y: np.ndarray
    weight_decay: float
    full: HingeSVM
    fits: dict[int, HingeSVM] = field(default_factory=dict)

    def without(self, i: int) -> HingeSVM:
        """The exact SVM on all points but i (same λ, mean over the n − 1 others)."""
        if i not in self.fits:
            keep = np.arange(len(self.y)) != i
            self.fits[i] = fit_hinge_svm(self.X[keep], self.y[keep], self.weight_decay,
                                         start=self.full.weights)
        return self.fits[i]

    def crossings(self, i: int) -> int:
        """How many of the other points change side of the margin (violating / on / outside)
        when point i is removed."""
        before = np.delete(self.full.partition(), i)
        return int((before != self.without(i).partition()).sum())

    def same_active_set(self, i: int) -> bool:
        """Whether point i is off the margin and removing it moves no other point across it.

        Then the refit lies on the same linear piece of the SVM's solution path, which the
        smooth-hinge influence at small t follows exactly (up to O(t)).
        """
        return bool(self.full.partition()[i] != 1 and self.crossings(i) == 0)


def smooth_hinge_loo(weights: np.ndarray, split: Split, temperature: float,
                     weight_decay: float, rows: np.ndarray) -> Tensor:
    """``loo_change`` (−I_up,loss/n) with SmoothHinge(t) at the hinge weights, ``(len(rows), n)``.

    The model is ``nn.Linear(p, 1, bias=False)`` in float64 holding ``weights``; the influence
    uses the explicit Hessian (at t = 0 it is λI), over chunks of :data:`LOO_CHUNK` examples.
    """
    model = zero_linear(weights.shape[0], 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(weights)[None])
    objective = SmoothHingeObjective(temperature=temperature, weight_decay=weight_decay)
    # the paper takes smooth-hinge influence at the hinge SVM's weights, which do not minimise
    # the smooth objective: the stationarity gap is measured (influence.stationarity_), not warned
    influence = Influence(model, objective, split.train, solver=Direct(),
                          chunk_size=LOO_CHUNK, stationarity_tol=None).fit()
    return influence.loo_change((split.X_test[rows], split.y_test[rows]))


@dataclass
class TestPointResult:
    """Predicted and actual leave-one-out changes for one test point."""

    index: int
    removed: np.ndarray                 # (k,) training indices
    actual: np.ndarray                  # (k,) change of the hinge test loss after the refit
    predicted: dict[float, np.ndarray]  # t -> (k,) loo_change
    crossings: np.ndarray               # (k,) other points each removal moves across the margin
    same_active_set: np.ndarray         # (k,) bool

    def pearson(self, t: float, mask: np.ndarray | None = None) -> float:
        """Pearson R between predicted (at ``t``) and actual, over ``mask`` (default all)."""
        keep = np.ones(len(self.actual), bool) if mask is None else mask
        return correlations(torch.as_tensor(self.predicted[t][keep]),
                            torch.as_tensor(self.actual[keep]))[0]

    def spearman(self, t: float) -> float:
        """Spearman R between predicted (at ``t``) and actual."""
        return correlations(torch.as_tensor(self.predicted[t]),
                            torch.as_tensor(self.actual))[1]


def _highest_loss_tests(split: Split, weights: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` test points with the highest hinge loss, those with zero loss dropped.

    A test point with margin ≥ 1 has zero hinge loss and gradient: its influence at t = 0 is
    zero, so it cannot be studied. At least the highest one is returned.
    """
    y = 2.0 * split.y_test.numpy() - 1.0
    losses = hinge_losses(weights, split.X_test.numpy(), y)
    order = np.argsort(-losses, kind="stable")[:count]
    return order[: max(1, int((losses[order] > 0.0).sum()))]


def fit_full(split: Split, weight_decay: float) -> RefitCache:
    """The exact hinge SVM on the whole training set, with an empty cache of refits."""
    X, y = split.X_train.numpy(), 2.0 * split.y_train.numpy() - 1.0
    return RefitCache(X, y, weight_decay, fit_hinge_svm(X, y, weight_decay))


def study(split: Split, cache: RefitCache, num_points: int, num_tests: int,
          select_by: float = SELECT_BY) -> list[TestPointResult]:
    """Score with every t at the hinge weights; refit without each test point's top points.

    For each of the ``num_tests`` highest-loss test points (positive loss only), the
    ``num_points`` training points with the largest |loo_change| at t = ``select_by`` are
    removed one at a time.
    """
    weights, weight_decay = cache.full.weights, cache.weight_decay
    rows = _highest_loss_tests(split, weights, num_tests)
    predicted = {t: smooth_hinge_loo(weights, split, t, weight_decay, rows).numpy()
                 for t in TEMPERATURES}
    x_test = split.X_test.numpy()
    y_test = 2.0 * split.y_test.numpy() - 1.0
    results = []
    for r, j in enumerate(rows):
        order = np.argsort(-np.abs(predicted[select_by][r]), kind="stable")
        removed = order[: min(num_points, len(cache.y))]
        test = (x_test[j : j + 1], y_test[j : j + 1])
        base = hinge_losses(weights, *test)[0]
        actual = np.array([hinge_losses(cache.without(int(i)).weights, *test)[0] - base
                           for i in removed])
        crossings = np.array([cache.crossings(int(i)) for i in removed])
        same = np.array([cache.same_active_set(int(i)) for i in removed])
        results.append(TestPointResult(int(j), removed, actual,
                                       {t: predicted[t][r][removed] for t in TEMPERATURES},
                                       crossings, same))
    return results


def augmented_digits(seed: int, copies: int,
                     jitter: Jitter = DIGITS_JITTER) -> tuple[Split, np.ndarray]:
    """scikit-learn's digits 1 vs 7 with each training image kept plus ``copies`` − 1 jittered.

    The split is :func:`~influencekit.datasets.digits` (``seed``); only its training images are
    augmented (:func:`~influencekit.datasets.augment.jitter_images`, seeded by ``seed``), the
    test images are left as they are. Returns the split (n = 252·``copies`` training rows,
    grouped by source image) and each training row's source index into the original 252.
    """
    base = digits(seed=seed, classes=CLASSES)
    X, source = jitter_images(base.X_train.numpy(), copies, shape=(8, 8), jitter=jitter,
                              seed=seed)
    name = (f"{base.name}, training images augmented ×{copies} by {jitter.describe()} "
            f"(each original kept), n = {len(source):,}; test images untouched "
            f"({len(base.y_test)})")
    return Split(torch.as_tensor(X, dtype=base.X_train.dtype), base.y_train[source],
                 base.X_test, base.y_test, name), source


def _smooth_hinge(s: np.ndarray, t: float) -> np.ndarray:
    if t == 0.0:
        return np.maximum(0.0, 1.0 - s)
    return t * np.logaddexp(0.0, (1.0 - s) / t)


def draw_hinge_figure(result: TestPointResult, path: Path) -> Path:
    """Fig. 3 layout: (a) SmoothHinge(s, t) near s = 1; then predicted vs actual for each t.

    Removals that move other points across the margin are drawn in orange when only some do.
    """
    figure, grid = plots.new_figure(1, 1 + len(TEMPERATURES), figsize=(17, 4.0))
    axes = grid[0]
    s = np.linspace(0.8, 1.2, 801)
    for t in (0.0, 0.001, 0.01, 0.1):
        axes[0].plot(s, _smooth_hinge(s, t), label="t=0 (Hinge)" if t == 0 else f"t={t:g}")
    axes[0].set(xlim=(0.8, 1.2), ylim=(0.0, 0.3), xlabel="s", ylabel="SmoothHinge(s, t)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("(a) smooth approximations of the hinge", fontsize=10)
    moved = ~result.same_active_set
    for axis, t in zip(axes[1:], TEMPERATURES, strict=True):
        title = "t=0 (Hinge)" if t == 0 else f"t={t:g}"
        plots.draw_predicted_vs_actual(axis, result.predicted[t], result.actual, title,
                                       result.pearson(t))
        if 0 < moved.sum() < len(moved):
            axis.scatter(result.actual[moved], result.predicted[t][moved], s=14,
                         color="#ff7f0e", edgecolors="none",
                         label="removal changes the active set")
    if 0 < moved.sum() < len(moved):
        axes[1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return plots.save_figure(figure, path)


def _keys(result: TestPointResult, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}pearson_t{t:g}": result.pearson(t) for t in TEMPERATURES}


def _removal_margin_scale(cache: RefitCache) -> float:
    """mean ‖x‖² / (nλ): how far removing one point moves the others' margins."""
    return float((cache.X ** 2).sum(1).mean() / (len(cache.y) * cache.weight_decay))


def run(settings: RunSettings) -> Outcome:
    """The default: augmented digits ×50 (``--quick``: ×16, 50 refits, one test point); MNIST
    with ``--data`` (three test points, or one with ``--quick``). λ = 0.01 throughout."""
    copies = QUICK_AUGMENT_COPIES if settings.quick else AUGMENT_COPIES
    if settings.data is None:
        split, source = augmented_digits(settings.seed, copies)
    else:
        split = image_data(settings, classes=CLASSES)
        source = np.arange(len(split.y_train))
    weight_decay = PAPER_WEIGHT_DECAY
    num_points = 50 if settings.quick else NUM_POINTS
    cache = fit_full(split, weight_decay)
    # MNIST refits cost more (p = 784): fewer test points for the medians there.
    num_tests = 1 if settings.quick else NUM_TEST_POINTS if settings.data is None else 3
    results = study(split, cache, num_points, num_tests)
    head = results[0]
    n = len(cache.y)
    metrics = _keys(head)
    metrics.update({f"spearman_t{t:g}": head.spearman(t) for t in TEMPERATURES})
    same = head.same_active_set
    partition = cache.full.partition()
    metrics.update({
        "n_train": float(n), "n_points": float(len(head.removed)),
        "n_sources_removed": float(len(np.unique(source[head.removed]))),
        "test_index": float(head.index), "n_test_points": float(len(results)),
        "weight_decay": weight_decay,
        "n_margin_violators": float((partition == 2).sum()),
        "n_on_margin": float((partition == 1).sum()),
        "removal_margin_scale": _removal_margin_scale(cache),
        "n_removed_in_margin": float((partition[head.removed] > 0).sum()),
        "median_margin_crossings": float(np.median(head.crossings)),
        "max_margin_crossings": float(head.crossings.max()),
        "n_same_active_set": float(same.sum()),
    })
    if same.sum() >= 10:
        metrics["pearson_t0.001_same_active_set"] = head.pearson(0.001, same)
    if len(results) > 1:
        for t in TEMPERATURES:
            metrics[f"median_pearson_t{t:g}"] = float(np.median([r.pearson(t) for r in results]))
    selected_t0 = study(split, cache, num_points, 1, select_by=0.0)
    metrics.update(_keys(selected_t0[0], "select_t0_"))
    if settings.data is None and not settings.quick:
        # The regime argument's other side: the 252 originals alone at the same λ.
        plain = digits(seed=settings.seed, classes=CLASSES)
        plain_cache = fit_full(plain, weight_decay)
        plain_head = study(plain, plain_cache, num_points, 1)[0]
        metrics.update(_keys(plain_head, "unaugmented_"))
        metrics.update({
            "unaugmented_removal_margin_scale": _removal_margin_scale(plain_cache),
            "unaugmented_n_removed_in_margin": float(
                (plain_cache.full.partition()[plain_head.removed] > 0).sum()),
            "unaugmented_max_margin_crossings": float(plain_head.crossings.max()),
        })
        caches = [cache, plain_cache]
    else:
        caches = [cache]
    fits = [c.full for c in caches] + [f for c in caches for f in c.fits.values()]
    metrics["max_duality_gap"] = max(f.duality_gap for f in fits)
    metrics["max_kkt_violation"] = max(f.kkt_violation for f in fits)
    figure = draw_hinge_figure(head, settings.out / "fig3_hinge.png")
    data = split.name if settings.data is None else f"{split.name}; {n} training images"
    return Outcome(metrics=metrics, data=data, figures=[figure],
                   notes=_notes(settings, head, metrics, num_tests))


def _notes(settings: RunSettings, head: TestPointResult, metrics: dict[str, float],
           num_tests: int) -> list[str]:
    n = int(metrics["n_train"])
    notes = [f"Test point: #{head.index}, the highest hinge loss in the test set (the paper's "
             "was picked among its ten lowest margins)"
             + (f"; median_pearson_* cover the {int(metrics['n_test_points'])} with positive "
                f"loss among the {num_tests} highest." if num_tests > 1 else "."),
             f"{len(head.removed)} points refitted (paper: 100 of ~13,000), chosen by |influence| "
             "at t = 0.001; the reference code chose by t = 0 (select_t0_*).",
             "Hinge SVM solved exactly (dual L-BFGS-B + active-set KKT solve; refits by a primal "
             f"active-set walk from the full solution; duality gap ≤ "
             f"{metrics['max_duality_gap']:.1e}) instead of LinearSVC at tol 1e-6."]
    if settings.data is None:
        notes.append(
            f"λ = {PAPER_WEIGHT_DECAY} as in the paper. scikit-learn's digits have 252 "
            f"training 1s and 7s where MNIST has ~13,000, so the training images were augmented "
            f"to n = {n:,} with jittered copies (the test images are untouched). Why: removing "
            "one point moves the other margins by about ‖x‖²/(nλ), and influence can predict a "
            "hinge refit only when that is well below 1 (few points cross the margin). Here "
            f"{metrics['removal_margin_scale']:.2f} (MNIST ≈ 0.4–0.8, estimated); "
            f"{int(metrics['n_removed_in_margin'])} of the {len(head.removed)} removed points "
            f"are on or inside the margin, and each removal moves a median of "
            f"{metrics['median_margin_crossings']:g} (at most "
            f"{int(metrics['max_margin_crossings'])}) of the {n:,} points across it.")
        if "unaugmented_pearson_t0.001" in metrics:
            notes.append(
                "Without augmentation (252 images, λ = 0.01; unaugmented_*) the scale is "
                f"{metrics['unaugmented_removal_margin_scale']:.1f}: "
                f"{int(metrics['unaugmented_n_removed_in_margin'])} of the "
                f"{len(head.removed)} removed points are on or inside the margin (removing any "
                "other only turns the mean's 1/n into 1/(n − 1), as if λ were lowered by "
                "(n − 1)/n), and each of those moves up to "
                f"{int(metrics['unaugmented_max_margin_crossings'])} of the 252 points across "
                f"it. R(t = 0.001) = {metrics['unaugmented_pearson_t0.001']:.2f} there, resting "
                "on those few large steps, so it varies strongly with the seed.")
        notes.append(
            f"The copies are correlated (252 handwritings): the {len(head.removed)} points "
            f"refitted come from {int(metrics['n_sources_removed'])} distinct source images.")
    return notes


EXPERIMENT = Experiment(
    name="fig3-hinge",
    title="Fig. 3: linear SVM, influence with the smooth hinge (t = 0, 0.001, 0.1) vs refits",
    keys=("pearson_t0", "pearson_t0.001", "pearson_t0.1"),
    paper={"pearson_t0": "0.63", "pearson_t0.001": "0.95", "pearson_t0.1": "0.91"},
    run=run,
    headline="pearson_t0.001",
)
