"""Typed errors and warnings.

Every message says what was expected, what was received, and how to fix it. Value problems
(bad input) subclass ``ValueError`` (and ``TypeError`` or ``IndexError`` where that is what a
caller would catch); problems found while computing (an indefinite Hessian, a diverging solver,
a call before ``fit``) subclass ``RuntimeError``. Every error raised on purpose by influencekit is
an :class:`InfluenceKitError`.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class InfluenceKitError(Exception):
    """Base class of every error raised by influencekit."""


class InputError(InfluenceKitError, ValueError):
    """Base class of errors about what the caller passed in."""


class InvalidSettingError(InputError):
    """An argument with a value outside its range (a negative size, an unknown option name)."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type (a bool where a number is expected, a list for a tensor)."""


class DeviceMismatchError(InputError):
    """A model whose parameters and buffers are not all on one device (or are on ``meta``)."""


class ShapeMismatchError(InputError):
    """Arrays whose shapes do not fit together (inputs vs targets, test vs train, (p, k) vs
    (k, p) right-hand sides)."""


class DtypeError(InputError, TypeError):
    """A dtype influencekit cannot compute in (bfloat16, half) or would have to round silently
    (a float64 right-hand side on a float32 model)."""


class IndexOutOfRangeError(InputError, IndexError):
    """A training or test index outside [-n, n)."""


class ObjectiveMismatchError(InputError):
    """The model's output or the targets do not fit the objective (1-D cross-entropy logits)."""


class NonFiniteError(InputError):
    """NaN or infinity in the data, the parameters, the model output or the loss."""


class EmptyDatasetError(InputError):
    """A training or test set with no examples."""


class UnknownSolverError(InputError):
    """A solver name that is not registered."""


class UnknownParameterError(InputError):
    """A parameter name (or prefix) that matches none of the model's parameters."""


class CacheMismatchError(InputError):
    """A cache file was made for another model, objective, parameter set, dtype or training set,
    or holds an array of the wrong shape."""


class UnsupportedModelError(InfluenceKitError, NotImplementedError):
    """The model needs an operation torch cannot differentiate the way a solver needs (e.g. the
    second derivative of ``nn.EmbeddingBag``); the message names the solvers that work."""


class UnsupportedEstimatorError(InputError):
    """A scikit-learn estimator, or a setting of one, that ``from_sklearn`` cannot convert
    exactly; the message names what is supported."""


class NotFittedError(InfluenceKitError, RuntimeError):
    """A method that needs ``fit()`` was called before it."""


class StaleFitError(NotFittedError):
    """The model's parameters or buffers changed after ``fit()``: the fitted state describes
    another model. Call ``fit()`` again."""


class IndefiniteHessianError(InfluenceKitError, RuntimeError):
    """The damped curvature is not positive definite (or is numerically singular), so its
    inverse is not the influence the paper means."""


class SolverDivergedError(InfluenceKitError, RuntimeError):
    """A solver produced NaN/inf or grew without bound."""


#: errors that the vectorised-to-loop fallbacks must not swallow (they would fail again, slower)
OUT_OF_MEMORY: tuple[type[BaseException], ...] = (MemoryError, torch.OutOfMemoryError)


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance."""


class StationarityWarning(UserWarning):
    """θ̂ is far from a stationary point of the objective that influence is taken for."""


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside influencekit: the line of the
    user's code that led to it, however many of the package's frames lie in between."""
    frame = sys._getframe(1)
    level = 2  # the caller of warn
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
