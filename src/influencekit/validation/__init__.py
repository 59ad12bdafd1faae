"""Ground truth by retraining, and how well predicted scores match it.

- :mod:`~influencekit.validation.loo`: leave-one-out retraining (the paper's Fig. 2) and
  :func:`validate`, which puts ``Influence.loo_change`` beside it.
- :mod:`~influencekit.validation.lds`: retraining on random subsets and the linear datamodeling
  score (LDS, Park et al. 2023) of any ``(m, n)`` attribution; higher is better.
"""

from .lds import (
    LDSResult,
    SubsetGroundTruth,
    linear_datamodeling_score,
    loss_measurement,
    retrain_on_subsets,
    subset_masks,
)
from .loo import (
    ContinuedTraining,
    ConvexRefit,
    Retraining,
    ValidationResult,
    actual_loo_changes,
    correlations,
    measured_test_losses,
    validate,
)

__all__ = [
    "ContinuedTraining",
    "ConvexRefit",
    "LDSResult",
    "Retraining",
    "SubsetGroundTruth",
    "ValidationResult",
    "actual_loo_changes",
    "correlations",
    "linear_datamodeling_score",
    "loss_measurement",
    "measured_test_losses",
    "retrain_on_subsets",
    "subset_masks",
    "validate",
]
