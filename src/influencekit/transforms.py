"""Telling "torch.func cannot transform this model" apart from a bug in the model.

The vectorised paths (``vmap`` per-example gradients, forward- or reverse-mode Hessian-vector
products) fall back to slower loops only when the error means the transform itself cannot handle
the model: ``.item()`` or data-dependent Python control flow under ``vmap``, an operator without a
batching rule, without forward-mode AD or without a second derivative. Any other error — a shape
mismatch in ``forward``, a ``TypeError`` in the user's objective — is the user's bug; it is
raised as it is, never retried or hidden behind a warning.
"""

from __future__ import annotations

import re

from torch import nn

from .errors import UnsupportedModelError

# messages of torch (2.2 … 2.13) that mean a transform cannot handle an operation or a model
_LIMITATION = re.compile(
    r"vmap|functorch|batching rule|batched tensor|BatchedTensor|data-dependent|\.item\(\)"
    r"|forward AD|forward-mode|forward mode|jvp|derivative for .* is not implemented"
    r"|double backward|does not support.*(?:transform|vmap|grad)|in-place operation.*vmap",
    re.IGNORECASE,
)


def is_transform_limitation(error: BaseException) -> bool:
    """Whether ``error`` says a torch.func transform cannot handle the model (not a user bug).

    ``NotImplementedError`` from torch (a missing batching rule or derivative) always counts;
    a ``RuntimeError`` counts when its message names a transform limitation.
    """
    if isinstance(error, UnsupportedModelError):
        return False
    if isinstance(error, NotImplementedError):
        return True
    return isinstance(error, RuntimeError) and bool(_LIMITATION.search(str(error)))


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` for log messages and warnings."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def unsupported_second_derivatives(model: nn.Module, error: BaseException,
                                   curvature: str) -> UnsupportedModelError:
    """The error to raise when no mode can form curvature-vector products for ``model``."""
    suspects = sorted({type(m).__name__ for m in model.modules()
                       if isinstance(m, nn.EmbeddingBag | nn.RNNBase)})
    named = f" (it contains {', '.join(suspects)})" if suspects else ""
    product = ("Gauss-Newton products need forward-mode derivatives"
               if curvature == "gauss-newton" else
               "Hessian-vector products need second derivatives (or forward-mode derivatives)")
    return UnsupportedModelError(
        f"{product} of every layer, and torch provides neither for a layer of "
        f"{type(model).__name__}{named}: {first_line(error)}. Solvers that use only first "
        "derivatives work: solver='ekfac' or 'kfac' (Kronecker factors for Linear/Conv2d layers, "
        "the Gauss-Newton diagonal from per-example gradients elsewhere; keep their verify=False "
        "and damping explicit, e.g. damping=1e-3). Otherwise track only parameters that such a "
        "layer does not feed (params=[...] after it), or replace nn.EmbeddingBag by nn.Embedding "
        "followed by a sum or mean."
    )
