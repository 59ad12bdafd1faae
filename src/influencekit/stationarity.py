"""Is θ̂ a stationary point of the objective influence is taken for? Measured, not assumed.

Influence functions describe how the minimiser θ̂ of R(θ) = (1/n) Σ L(z_i, θ) moves when a point
is up-weighted; at a θ̂ where ∇R is far from zero, the same formulas describe something else. The
check compares ‖∇R(θ̂)‖ with the typical size of one example's gradient, the root mean square of
‖∇L(z_i, θ̂)‖ over an evenly spaced sample of the training set: at a minimum the per-example
gradients cancel and the ratio is tiny (1e-9 for a convex model fitted by Newton's method), while
a model trained with AdamW's decoupled decay, with biases left out of the decay, or stopped early
keeps a ratio of order 0.1–1. Above ``tol`` (0.05 by default) one :class:`StationarityWarning`
gives the figures and the remedies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import StationarityWarning

__all__ = ["Stationarity", "StationarityWarning", "message"]


@dataclass(frozen=True)
class Stationarity:
    """How far θ̂ is from a stationary point.

    Attributes:
        gradient_norm: ‖∇R(θ̂)‖, regulariser included.
        example_gradient_rms: √(mean_i ‖∇L(z_i, θ̂)‖²) over the sample.
        sample: training points in the sample.
        tol: the ratio above which the fit is reported as not stationary (``None``: never).
    """

    gradient_norm: float
    example_gradient_rms: float
    sample: int
    tol: float | None

    @property
    def ratio(self) -> float:
        """‖∇R(θ̂)‖ / RMS ‖∇L(z_i)‖ (0 when every per-example gradient is zero)."""
        if self.example_gradient_rms > 0:
            return self.gradient_norm / self.example_gradient_rms
        return 0.0 if self.gradient_norm == 0 else math.inf

    @property
    def stationary(self) -> bool:
        """Whether the ratio is within ``tol`` (always, without a tol)."""
        return self.tol is None or self.ratio <= self.tol


def message(check: Stationarity, weight_decay: str, curvature: str) -> str:
    """The warning for a θ̂ that is not stationary: the figures, then the remedies."""
    remedies = [
        "pass the weight decay the model was trained with (now weight_decay="
        f"{weight_decay}); a model trained with AdamW's decoupled decay minimises no "
        "L2-regularised loss, so no weight_decay makes it stationary: use the next remedies",
        "if biases or normalisation weights were not decayed in training, say so: "
        "weight_decay={'': λ, 'bias': 0.0} (or a function of the name and parameter)",
        "fit θ̂ to the objective first (ik.training.minimize, e.g. on the last layer), or",
    ]
    if curvature == "hessian":
        remedies.append("use curvature='gauss-newton' with damping (it needs no minimum, and "
                        "the scores become those of the Gauss-Newton model of the loss)")
    else:
        remedies.append("keep curvature='gauss-newton' with enough damping, and read the scores "
                        "as those of the Gauss-Newton model of the loss")
    listed = "; ".join(f"({i}) {text}" for i, text in enumerate(remedies, start=1))
    return (
        f"θ̂ is not a stationary point of the objective influence is taken for: ‖∇R(θ̂)‖ = "
        f"{check.gradient_norm:.3g} is {check.ratio:.3g} times the typical per-example gradient "
        f"norm {check.example_gradient_rms:.3g} (RMS over {check.sample} training points; "
        f"stationarity_tol={check.tol:g}). Influence functions assume θ̂ minimises "
        f"R = mean loss + (λ/2)‖θ‖², so these scores may not predict retraining. Remedies: "
        f"{listed}."
    )
