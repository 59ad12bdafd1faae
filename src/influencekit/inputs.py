"""Model inputs of any structure: a tensor, a dict of tensors, or a tuple of tensors.

A batch of inputs is a tensor ``X`` (the model is called as ``model(X)``), a dict (``model(**X)``,
as Hugging Face models take ``input_ids`` and ``attention_mask``) or a tuple (``model(*X)``),
every tensor with the examples along its first dimension. The helpers here treat the three alike:
they slice, index, convert and check every tensor (the "leaves") of a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from .errors import InputTypeError, ShapeMismatchError

Inputs = Union[Tensor, dict[str, Tensor], tuple[Tensor, ...]]  # noqa: UP007


def as_tensor(array: Any, what: str) -> Tensor:
    """``array`` (a tensor or a NumPy array) as a tensor."""
    if isinstance(array, Tensor):
        return array
    if isinstance(array, np.ndarray):
        try:
            return torch.from_numpy(np.ascontiguousarray(array))
        except TypeError as error:
            raise InputTypeError(f"{what}: a NumPy array of dtype {array.dtype} has no tensor "
                                 "equivalent; convert it to numbers first.") from error
    raise InputTypeError(
        f"{what} must be a torch.Tensor or numpy.ndarray, got {type(array).__name__}.")


def as_inputs(X: Any, what: str) -> Inputs:
    """``X`` with every leaf a tensor: a tensor/array, or a dict or tuple of them."""
    if isinstance(X, dict):
        if not X:
            raise InputTypeError(f"{what}: an empty dict holds no inputs.")
        return {str(key): as_tensor(value, f"{what}[{key!r}]") for key, value in X.items()}
    if isinstance(X, tuple | list) and not isinstance(X, Tensor):
        if not X:
            raise InputTypeError(f"{what}: an empty tuple holds no inputs.")
        return tuple(as_tensor(value, f"{what}[{i}]") for i, value in enumerate(X))
    return as_tensor(X, what)


def leaves(X: Inputs) -> list[Tensor]:
    """The tensors of a batch, in a fixed order (dict keys sorted)."""
    if isinstance(X, dict):
        return [X[key] for key in sorted(X)]
    if isinstance(X, tuple):
        return list(X)
    return [X]


def map_inputs(function: Callable[[Tensor], Tensor], X: Inputs) -> Inputs:
    """``function`` applied to every tensor of the batch, structure kept."""
    if isinstance(X, dict):
        return {key: function(value) for key, value in X.items()}
    if isinstance(X, tuple):
        return tuple(function(value) for value in X)
    return function(X)


def batch_size(X: Inputs) -> int:
    """The number of examples in the batch (the first dimension, the same for every tensor)."""
    sizes = {int(t.shape[0]) if t.ndim else -1 for t in leaves(X)}
    if len(sizes) != 1 or -1 in sizes:
        raise ShapeMismatchError(f"The tensors of a batch of inputs must share their first "
                                 f"dimension (one row per example); got sizes {sorted(sizes)}.")
    return sizes.pop()


def rows_of(X: Inputs, index: Any) -> Inputs:
    """The examples ``index`` (a slice or index tensor) of the batch."""
    return map_inputs(lambda t: t[index], X)


def convert(X: Inputs, device: torch.device | None, dtype: torch.dtype | None) -> Inputs:
    """Floating tensors to ``dtype``, every tensor to ``device`` (integer ids stay integers)."""
    def one(t: Tensor) -> Tensor:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device) if device is not None else t

    return map_inputs(one, X)


def call_arguments(X: Inputs) -> tuple[tuple, dict]:
    """(args, kwargs) to call the model with: ``model(X)``, ``model(*X)`` or ``model(**X)``."""
    if isinstance(X, dict):
        return (), X
    if isinstance(X, tuple):
        return X, {}
    return (X,), {}


def signature(X: Inputs) -> tuple:
    """What must agree between training and test inputs: a tensor's per-example shape; for a
    dict its keys and each tensor's number of dimensions (lengths may vary, e.g. padding)."""
    if isinstance(X, Tensor):
        return tuple(X.shape[1:])
    if isinstance(X, dict):
        return tuple((key, X[key].ndim) for key in sorted(X))
    return tuple(("#", t.ndim) for t in X)
