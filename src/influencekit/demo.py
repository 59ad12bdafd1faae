"""The main job: explain a misclassified digit and check the explanation against retraining.

10-class logistic regression (no bias, λ = 0.01, as in the paper's Fig. 2) on scikit-learn's
bundled 8×8 digits. Picks the misclassified test image with the highest loss, finds its most
helpful and most harmful training images, and compares the predicted leave-one-out changes of
the most influential training points with actual refits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .datasets import digits
from .influence import Influence
from .io import atomic_write_json
from .objective import CrossEntropyObjective
from .randomness import seeded
from .report import plots
from .training import minimize
from .validation import validate


@dataclass
class DemoResult:
    """What the demo found, with the paths of the files it wrote."""

    test_index: int
    true_label: int
    predicted_label: int
    helpful: list[int]
    harmful: list[int]
    pearson: float
    spearman: float
    files: list[Path]


def run_demo(out: Path, num_check: int = 50, k: int = 5, weight_decay: float = 0.01,
             solver: str = "direct", progress: bool = True,
             echo: Callable[[str], None] = lambda _: None) -> DemoResult:
    """Run the demo; write figures and ``results.json`` under ``out``; report lines to ``echo``."""
    started = time.perf_counter()
    data = digits(dtype=torch.float64)
    n = data.X_train.shape[0]
    echo(f"Data: {data.name} — {n} training / {data.X_test.shape[0]} test images, pixels in [0, 1]")
    echo(f"Model: 10-class logistic regression, no bias, L2 weight decay λ = {weight_decay}")

    with seeded(0):  # the same initial weights every run; the caller's random state is kept
        model = torch.nn.Linear(64, 10, bias=False).double()
    objective = CrossEntropyObjective(weight_decay=weight_decay)
    fit = minimize(model, objective, data.train, tol=1e-10)
    with torch.no_grad():
        logits = model(data.X_test)
        losses = objective.test_loss(logits, data.y_test)
        predictions = logits.argmax(dim=1)
    accuracy = float((predictions == data.y_test).double().mean())
    echo(f"[1/4] Trained to ‖∇R‖ = {fit.gradient_norm:.1e} (Newton, float64); "
         f"test accuracy {100 * accuracy:.1f}%")

    wrong = torch.nonzero(predictions != data.y_test).flatten()
    j = int(wrong[losses[wrong].argmax()]) if wrong.numel() else int(losses.argmax())
    test = (data.X_test[j : j + 1], data.y_test[j : j + 1])
    true_label, predicted_label = int(data.y_test[j]), int(predictions[j])

    influence = Influence(model, objective, data.train, solver=solver, progress=progress).fit()
    top = influence.top_k(test, k=k)
    echo(f"[2/4] Influence with the {solver} solver — {influence.last_solve_report}")
    echo(f"Test image #{j}: true label {true_label}, predicted {predicted_label} "
         f"(test loss {float(losses[j]):.3f})")
    echo("  loo_change = −I_up,loss/n = predicted change of this test loss if the training image "
         "is removed")
    for title, indices, scores in (("Most helpful", top.helpful[0], top.helpful_scores[0]),
                                   ("Most harmful", top.harmful[0], top.harmful_scores[0])):
        echo(f"  {title} training images (index: label, loo_change):")
        for i, score in zip(indices.tolist(), scores.tolist(), strict=True):
            echo(f"    #{i:<5d} label {int(data.y_train[i])}   {score:+.5f}")

    echo(f"[3/4] Leave-one-out check: refitting without each of the {num_check} training images "
         "with the largest |influence| ...")
    check = validate(influence, test, num_points=num_check, progress=progress)
    echo(f"  Pearson R = {check.pearson:.4f}, Spearman R = {check.spearman:.4f} between predicted "
         f"and actual changes of the test loss ({len(check.indices)} refits)")

    out.mkdir(parents=True, exist_ok=True)
    image = data.X_test[j].reshape(8, 8).numpy()
    rows = []
    for title, indices, scores in (("helpful", top.helpful[0], top.helpful_scores[0]),
                                   ("harmful", top.harmful[0], top.harmful_scores[0])):
        images = data.X_train[indices].reshape(-1, 8, 8).numpy()
        captions = [f"#{i} label {int(data.y_train[i])}\n{s:+.4f}"
                    for i, s in zip(indices.tolist(), scores.tolist(), strict=True)]
        rows.append((f"most {title} (loo_change)", images, captions))
    files = [
        plots.influential_images(image, f"#{j} true {true_label}, predicted {predicted_label}",
                                 rows, out / "training_images.png"),
        plots.predicted_vs_actual(check.predicted.numpy(), check.actual.numpy(),
                                  out / "predicted_vs_actual.png",
                                  f"Digits logistic regression, test image #{j}",
                                  check.pearson, check.spearman),
    ]
    files.append(atomic_write_json(out / "results.json", {
        "data": data.name, "test_index": j, "true_label": true_label,
        "predicted_label": predicted_label, "helpful": top.helpful[0].tolist(),
        "harmful": top.harmful[0].tolist(), "pearson": check.pearson,
        "spearman": check.spearman, "num_checked": len(check.indices),
        "weight_decay": weight_decay, "solver": solver,
        "seconds": round(time.perf_counter() - started, 2),
    }))
    files.append(_report(model, objective, data, j, k, solver, influence.damping_, out))
    echo("[4/4] Wrote:")
    for path in files:
        echo(f"  {path}")
    return DemoResult(j, true_label, predicted_label, top.helpful[0].tolist(),
                      top.harmful[0].tolist(), check.pearson, check.spearman, files)


def _report(model: torch.nn.Module, objective: CrossEntropyObjective, data, j: int, k: int,
            solver: str, damping: float, out: Path) -> Path:
    """The HTML report of ``influencekit explain`` for the demo's test image (report.html,
    with scores.npz and explain.json)."""
    from .explain import Subject, explain
    from .files import Examples

    def shown(X: torch.Tensor, y: torch.Tensor) -> Examples:
        return Examples(X.numpy(), y.numpy(), "image", images=X.reshape(-1, 8, 8).numpy(),
                        source=data.name)

    subject = Subject(model, objective, data.train, (data.X_test, data.y_test),
                      shown(data.X_train, data.y_train), shown(data.X_test, data.y_test),
                      "torch", class_names=[str(c) for c in range(10)], damping=damping,
                      curvature="hessian")
    explain(subject, out, test_index=[j], top_k=k, solver=solver)
    return out / "report.html"
