"""A cache of the training gradients, in memory or on disk, tied to what produced it.

The training side of every score is the (n, p) matrix of training gradients ∇_θ L(z_i). Kept, it
lets each new batch of test points cost only its own gradients, one solve and one matrix
product. On disk the matrix is stored with a fingerprint (a hash of θ̂, the tracked parameter
names, the objective, the dtype and the training data); loading it for anything else is refused
with the fields that differ, never silently mixed. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .data import ExampleSet
from .errors import InputError


class CacheMismatchError(InputError):
    """A cache file was made for another model, objective, parameter set or training set."""


def _digest(*tensors: Tensor) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(str(tuple(tensor.shape)).encode())
        hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                      .tobytes())
    return hasher.hexdigest()[:16]


def fingerprint(theta: Tensor, names: list[str], objective: object, data: ExampleSet) -> dict:
    """What the training gradients depend on, as short strings."""
    tensors = data.tensors
    return {
        "theta": _digest(theta),
        "parameters": ",".join(names),
        "objective": repr(objective),
        "dtype": str(theta.dtype),
        "num_train": str(len(data)),
        "data": _digest(*tensors) if tensors is not None else f"dataset of {len(data)} items",
    }


def save(path: str | Path, gradients: Tensor, meta: dict) -> Path:
    """Write the gradients and their fingerprint atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save({"gradients": gradients.detach().cpu(), "meta": meta}, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path, expected: dict) -> Tensor:
    """The cached gradients if made for ``expected``, else :class:`CacheMismatchError`."""
    payload = torch.load(Path(path), weights_only=True)
    meta = payload.get("meta", {})
    differing = sorted(k for k in expected if meta.get(k) != expected[k])
    if differing:
        details = "; ".join(f"{k}: file {meta.get(k)!r} vs now {expected[k]!r}" for k in differing)
        raise CacheMismatchError(
            f"The gradient cache {path} was made for something else ({details}). Delete it or "
            "pass another path to recompute; influencekit never mixes caches."
        )
    return payload["gradients"]
