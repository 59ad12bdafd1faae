"""Fig. 1: the components of influence, and what is lost without each of them.

Paper: binary logistic regression (no bias, λ = 0.01) on MNIST 1 vs 7. For one test point and
every training point z = (x, y), the closed form (labels ±1, σ the logistic function)

    −I_up,loss(z, z_test) = y_test·y · σ(−y_test θᵀx_test) · σ(−y θᵀx) · x_testᵀ H⁻¹ x

is plotted against three ablations:

- without the train-loss factor: σ(−y θᵀx) dropped (the reference code uses −y·x as the
  training gradient), so well-fitted points look as influential as badly fitted ones;
- without H: H⁻¹ replaced by I, leaving y_test·y·σ(−y_test θᵀx_test)·σ(−y θᵀx)·x_testᵀx, whose
  sign is the sign of y_test·y because pixels are non-negative: every same-label point looks
  helpful and every other-label point harmful;
- without both: the scaled Euclidean inner product y_test·y·σ(−y_test θᵀx_test)·x_testᵀx.

Reading of the figure: each ablation is compared with the true influence over *all* training
points (the paper's scatter plots put the ablation against the true −I_up,loss, one dot per
training point). That is the faithful reading and gives the keys ``pearson_no_loss_factor``,
``pearson_no_hessian`` and ``pearson_neither``. As a check against ground truth, every variant
(and the true influence) is also correlated with the actual change of the test loss after
refitting without each point (all training points on digits; a random 1,000 on MNIST):
``pearson_*_vs_actual``. The medians over test points (``median_pearson_*``) show that the
conclusion does not hinge on the test point chosen.

The true influence comes from the library (:class:`~influencekit.Influence`, direct solver); its
training gradient carries λθ, which shifts −I_up,loss by the same constant λ·sᵀθ for every
training point (s = H⁻¹∇L_test) and leaves every correlation unchanged. The ablations use the
closed form above (data term only), as the paper's text does.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..datasets import Split
from ..influence import Influence
from ..objective import BinaryLogisticObjective
from ..randomness import generator
from ..report import plots
from ..solvers import Direct
from ..validation import actual_loo_changes, correlations
from .base import Experiment, Outcome, RunSettings
from .common import fit_linear, hardest_misclassified, image_data

WEIGHT_DECAY = 0.01
CLASSES = (1, 7)
VARIANTS = ("no_loss_factor", "no_hessian", "neither")
TITLES = {"no_loss_factor": "Without train loss", "no_hessian": "Without H⁻¹",
          "neither": "Without train loss & H⁻¹"}
Y_LABELS = {"no_loss_factor": "−I_up,loss without σ(−y θᵀx)", "no_hessian": "−I_up,loss with H = I",
            "neither": "y_test·y·σ(−y_test θᵀx_test)·x_testᵀx"}
MAX_REFITS = 1000  # actual leave-one-out refits for the ground-truth check (all points on digits)
MAX_TEST_POINTS = 200  # test points for the medians over test points


def signed_labels(y: Tensor) -> Tensor:
    """Labels {0, 1} → {−1, +1} in float64, shape ``(n,)``."""
    return 2.0 * y.double() - 1.0


def ablated_scores(theta: Tensor, X: Tensor, y: Tensor, test_gradient: Tensor,
                   s_test: Tensor) -> dict[str, Tensor]:
    """−I_up,loss of every training point for the three ablations, each ``(n,)``.

    With g = ∇_θ ℓ(z_test) ``(p,)`` and s = H⁻¹g ``(p,)``, the data part of the training gradient
    is ∇ℓ(z_i) = −y_i σ(−y_i θᵀx_i) x_i, and −I_up,loss = sᵀ∇ℓ(z_i). The ablations:

    - ``no_loss_factor``: sᵀ(−y_i x_i)
    - ``no_hessian``:     gᵀ(−y_i σ(−y_i θᵀx_i) x_i)
    - ``neither``:        gᵀ(−y_i x_i)

    Args:
        theta: ``(p,)`` weights of the linear model (no bias).
        X: ``(n, p)`` training inputs; y: ``(n,)`` labels in {0, 1}.
    """
    ys = signed_labels(y)
    raw = -ys[:, None] * X  # the training gradient without its loss factor σ(−y θᵀx)
    loss_factor = torch.sigmoid(-ys * (X @ theta))
    return {"no_loss_factor": raw @ s_test,
            "no_hessian": loss_factor * (raw @ test_gradient),
            "neither": raw @ test_gradient}


def sign_follows_label(scores: Tensor, y: Tensor, y_test: int) -> float:
    """Fraction of training points with −I > 0 exactly when they share the test label."""
    same = (y == y_test).double() * 2.0 - 1.0
    return float((torch.sign(scores) == same).double().mean())


def _refit_indices(n: int, quick: bool, seed: int) -> Tensor:
    """All training points if there are at most MAX_REFITS (100 when quick), else a sample."""
    cap = 100 if quick else MAX_REFITS
    if n <= cap:
        return torch.arange(n)
    return torch.randperm(n, generator=generator(seed))[:cap].sort().values


def _median_over_tests(influence: Influence, X_test: Tensor, y_test: Tensor,
                       theta: Tensor, X: Tensor, y: Tensor) -> dict[str, float]:
    """Median Pearson R (true vs each ablation, over training points) across test points."""
    m = X_test.shape[0]
    rows = torch.linspace(0, m - 1, min(m, MAX_TEST_POINTS)).round().long().unique()
    test = (X_test[rows], y_test[rows])
    true = -influence.influence(test)
    G = influence.test_gradients(test)
    S = influence.solve(G)
    values: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for k in range(len(rows)):
        for name, scores in ablated_scores(theta, X, y, G[k], S[k]).items():
            values[name].append(correlations(true[k], scores)[0])
    return {f"median_pearson_{name}": float(np.nanmedian(v)) for name, v in values.items()}


def draw_components(true: np.ndarray, ablations: dict[str, np.ndarray], same_label: np.ndarray,
                    pearsons: dict[str, float], path: Path) -> Path:
    """Fig. 1-style panels: x = true −I_up,loss, y = each ablation; green same label, red other."""
    figure, axes = plots.new_figure(1, len(ablations), figsize=(4.2 * len(ablations), 3.9))
    for axis, (name, scores) in zip(axes[0], ablations.items(), strict=True):
        for mask, colour, label in ((~same_label, "#d62728", "other label"),
                                    (same_label, "#2ca02c", "same label as test")):
            axis.scatter(true[mask], scores[mask], s=10, color=colour, alpha=0.75,
                         edgecolors="none", label=label)
        axis.axhline(0.0, color="0.6", lw=0.8, zorder=0)
        axis.axvline(0.0, color="0.6", lw=0.8, zorder=0)
        axis.set_xlabel("−I_up,loss (true)")
        axis.set_ylabel(Y_LABELS[name])
        axis.set_title(TITLES[name], fontsize=10)
        axis.text(0.04, 0.96, f"Pearson R = {pearsons[name]:.3f}", transform=axis.transAxes,
                  va="top", fontsize=9)
        axis.grid(alpha=0.25)
    axes[0, 0].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return plots.save_figure(figure, path)


def draw_harmful_same_label(model: nn.Module, test: tuple[Tensor, Tensor], X: Tensor, y: Tensor,
                            true: Tensor, path: Path, k: int = 5) -> Path:
    """The test image and the k same-label training images with the most negative −I_up,loss."""
    y_test = int(test[1][0])
    candidates = torch.nonzero(y == y_test).flatten()
    harmful = candidates[true[candidates].argsort()[:k]]
    with torch.no_grad():
        score = float(model(test[0]).reshape(()))
    return plots.influential_images(
        _image(test[0][0]), f"label {CLASSES[y_test]}, score {score:+.2f}",
        [("same label as the test image, yet harmful (most negative −I_up,loss)",
          np.stack([_image(X[i]) for i in harmful]),
          [f"#{int(i)}: {float(true[i]):+.3g}" for i in harmful])], path)


def _image(x: Tensor) -> np.ndarray:
    side = math.isqrt(x.numel())
    return x.reshape(side, side).cpu().numpy()


def run(settings: RunSettings) -> Outcome:
    split = image_data(settings, classes=CLASSES)
    objective = BinaryLogisticObjective(weight_decay=WEIGHT_DECAY)
    model = fit_linear(objective, split, outputs=1)
    j = hardest_misclassified(model, objective, split.X_test, split.y_test)
    test = (split.X_test[j : j + 1], split.y_test[j : j + 1])
    X, y = split.X_train, split.y_train
    theta = model.weight.detach().reshape(-1)

    influence = Influence(model, objective, split.train, solver=Direct()).fit()
    true = -influence.influence(test)[0]
    test_gradient = influence.test_gradients(test)[0]
    s_test = influence.solve(test_gradient[None])[0]
    ablations = ablated_scores(theta, X, y, test_gradient, s_test)
    pearsons = {name: correlations(true, scores)[0] for name, scores in ablations.items()}

    refit = _refit_indices(len(y), settings.quick, settings.seed)
    actual = actual_loo_changes(model, objective, split.train, test, refit)[0]
    n = len(y)
    against_actual = {"true": correlations(true[refit] / n, actual)[0]}
    against_actual.update({name: correlations(scores[refit], actual)[0]
                           for name, scores in ablations.items()})

    y_test = int(split.y_test[j])
    same_label = (y == y_test).numpy()
    figure = draw_components(true.numpy(), {k: v.numpy() for k, v in ablations.items()},
                             same_label, pearsons, settings.out / "fig1_components.png")
    images = draw_harmful_same_label(model, test, X, y, true, settings.out
                                     / "fig1_harmful_same_label.png")

    metrics = {f"pearson_{name}": value for name, value in pearsons.items()}
    metrics.update({f"pearson_{name}_vs_actual": value for name, value in against_actual.items()})
    metrics.update(_median_over_tests(influence, split.X_test, split.y_test, theta, X, y))
    metrics.update(
        sign_follows_label_true=sign_follows_label(true, y, y_test),
        sign_follows_label_no_hessian=sign_follows_label(ablations["no_hessian"], y, y_test),
        test_index=j, n_train=n, n_refits=len(refit))
    return Outcome(
        metrics=metrics,
        data=f"{split.name}; {n} training images",
        figures=[figure, images],
        notes=[("Test point: the highest-loss test image (none is misclassified)"
                if _all_correct(model, split) else
                "Test point: the misclassified test image with the highest loss")
               + f", #{j}; the paper's was MNIST test #30.",
               "Pearson R of each ablation against the true −I_up,loss over all training points "
               "(the paper shows the scatter plots only); also against actual refits "
               f"({len(refit)} leave-one-out refits, Newton to ‖∇R‖ ≤ 1e-10)."]
        + ([] if settings.data is not None else
           [f"scikit-learn's 8×8 digits stand in for MNIST ({n} training images of 1 and 7 "
            "instead of about 13,000)."]),
    )


def _all_correct(model: nn.Module, split: Split) -> bool:
    with torch.no_grad():
        predicted = (model(split.X_test).reshape(-1) > 0).long()
    return bool((predicted == split.y_test).all())


EXPERIMENT = Experiment(
    name="fig1-components",
    title="Fig. 1: influence vs ablations without the train-loss factor, without H, without both",
    keys=("pearson_no_loss_factor", "pearson_no_hessian", "pearson_neither"),
    paper={"pearson_no_loss_factor": "qualitative: far from the diagonal",
           "pearson_no_hessian": "qualitative: sign set by the label alone",
           "pearson_neither": "qualitative: far from the diagonal"},
    run=run,
    headline="pearson_no_hessian",
)
