"""Typed errors and warnings.

Every message says what was expected, what was received, and how to fix it. Value problems
(bad input) subclass ``ValueError``; problems found while computing (an indefinite Hessian, a
diverging solver, a call before ``fit``) subclass ``RuntimeError``.
"""

from __future__ import annotations

import torch


class InfluenceKitError(Exception):
    """Base class of every error raised by influencekit."""


class InputError(InfluenceKitError, ValueError):
    """Base class of errors about what the caller passed in."""


class ShapeMismatchError(InputError):
    """Arrays whose shapes do not fit together (inputs vs targets, test vs train)."""


class ObjectiveMismatchError(InputError):
    """The model's output or the targets do not fit the objective (1-D cross-entropy logits)."""


class NonFiniteError(InputError):
    """NaN or infinity in the data, the model output or the loss."""


class EmptyDatasetError(InputError):
    """A training or test set with no examples."""


class UnknownSolverError(InputError):
    """A solver name that is not registered."""


class UnknownParameterError(InputError):
    """A parameter name (or prefix) that matches none of the model's parameters."""


class NotFittedError(InfluenceKitError, RuntimeError):
    """A method that needs ``fit()`` was called before it."""


class IndefiniteHessianError(InfluenceKitError, RuntimeError):
    """The damped Hessian is not positive definite, so H⁻¹ is not the influence the paper means."""


class SolverDivergedError(InfluenceKitError, RuntimeError):
    """An iterative solver produced NaN or grew without bound."""


#: errors that the vectorised-to-loop fallbacks must not swallow (they would fail again, slower)
OUT_OF_MEMORY: tuple[type[BaseException], ...] = (MemoryError, torch.OutOfMemoryError)


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance."""
