"""A cache of the training gradients, in memory or on disk, tied to what produced it.

The training side of every score is the (n, p) matrix of training gradients ∇_θ L(z_i). Kept, it
lets each new batch of test points cost only its own gradients, one solve and one matrix
product. On disk the matrix is stored with a fingerprint of everything it depends on:

- θ̂ (the tracked parameters), and every untracked parameter and buffer of the model (they enter
  the forward pass: a frozen backbone, batch-norm statistics);
- the model's structure: ``repr(model)`` (module types and settings such as a LayerNorm's eps or
  the activation) and how many hooks each module carries (Python code in ``forward()`` cannot
  be fingerprinted);
- the tracked parameter names and the dtype;
- the objective's class and every one of its settings, and the per-coordinate weight decay it
  resolves to (a function-valued weight decay is recorded by the λ it gives);
- the training data: a SHA-256 over every example's bytes, streamed through the data in chunks
  for a Dataset or DataLoader as for tensors, or, if the caller passes one, an explicit
  ``data_id`` (for data too large to hash on every run). A file made with a ``data_id`` is used
  only when the same ``data_id`` is passed again.

Loading for anything else is refused with the fields that differ, never silently mixed; the
array's shape and dtype are checked too. The file is safetensors (the fingerprint in its string
metadata), written by :mod:`influencekit.io`'s atomic writer; no pickle is read or written.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from .data import ExampleSet
from .errors import CacheMismatchError, InputTypeError
from .io import atomic_write_bytes
from .objective import Objective
from .parameters import TrackedParameters
from .snapshot import digest, named_state, structure

__all__ = ["CacheMismatchError", "digest", "fingerprint", "load", "model_digest", "save"]


def model_digest(model: nn.Module, skip: set[str] | None = None) -> str:
    """SHA-256 over every parameter and buffer of ``model`` (names included), except ``skip``."""
    hasher = hashlib.sha256()
    for name, tensor in named_state(model):
        if skip and name in skip:
            continue
        hasher.update(name.encode())
        hasher.update(digest(tensor).encode())
    return hasher.hexdigest()


def fingerprint(tracked: TrackedParameters, theta: Tensor, objective: Objective,
                decay: float | Tensor, data: ExampleSet, data_id: str | None = None) -> dict:
    """What the training gradients depend on, as strings (see the module docstring)."""
    if data_id is not None and not (isinstance(data_id, str) and data_id):
        raise InputTypeError(f"data_id must be a non-empty string naming the training data, "
                             f"got {data_id!r}.")
    return {
        "theta": digest(theta),
        "untracked_parameters_and_buffers": model_digest(tracked.model, set(tracked.names)),
        "model_structure": hashlib.sha256(
            structure(tracked.model, with_identities=False).encode()).hexdigest(),
        "parameters": ",".join(tracked.names),
        "objective": repr(sorted(objective.settings().items())),
        "weight_decay": digest(decay) if isinstance(decay, Tensor) else float(decay).hex(),
        "dtype": str(theta.dtype),
        "num_train": str(len(data)),
        "data": f"data_id {data_id}" if data_id is not None else data.content_digest(),
    }


def save(path: str | Path, gradients: Tensor, meta: dict) -> Path:
    """Write the gradients (safetensors, with the fingerprint as its string metadata)
    atomically through :mod:`influencekit.io`; no pickle."""
    payload = save_tensors({"gradients": gradients.detach().cpu().contiguous()},
                           metadata={key: str(value) for key, value in meta.items()})
    return atomic_write_bytes(path, payload)


def load(path: str | Path, expected: dict, shape: tuple[int, int],
         dtype: torch.dtype) -> Tensor:
    """The cached gradients if made for ``expected`` with this shape and dtype, else
    :class:`CacheMismatchError` naming what differs."""
    try:
        payload = Path(path).read_bytes()
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_tensors(payload)
    except Exception as error:  # a truncated or foreign file: say so, do not guess
        raise CacheMismatchError(
            f"The gradient cache {path} cannot be read as an influencekit cache ({error}). "
            "Delete it or pass another path to recompute.") from error
    differing = sorted(k for k in expected if meta.get(k) != str(expected[k]))
    if differing:
        details = "; ".join(f"{k}: file {_short(meta.get(k))} vs now {_short(expected[k])}"
                            for k in differing)
        hint = (" The file was made with a data_id; pass the same data_id." if
                "data" in differing and str(meta.get("data", "")).startswith("data_id") else "")
        raise CacheMismatchError(
            f"The gradient cache {path} was made for something else ({details}).{hint} Delete "
            "it or pass another path to recompute; influencekit never mixes caches."
        )
    gradients = tensors.get("gradients")
    if not isinstance(gradients, Tensor) or tuple(gradients.shape) != shape \
            or gradients.dtype != dtype:
        found = (f"{tuple(gradients.shape)} {gradients.dtype}" if isinstance(gradients, Tensor)
                 else "no gradients")
        raise CacheMismatchError(
            f"The gradient cache {path} holds {found}, expected an array of shape {shape} and "
            f"dtype {dtype}. Delete it or pass another path to recompute.")
    return gradients


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
