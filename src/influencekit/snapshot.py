"""What a fit was made for: a snapshot of the model, the objective and the training tensors.

``Influence.fit()`` binds θ̂ and prepares solvers (factors, eigendecompositions, spectra) for the
model as it is then. If anything they depend on changes afterwards, the fitted state describes
another model, and mixing the two would give scores of neither. A snapshot records, and every
later call compares:

- every parameter and buffer, by a checksum of its bits computed where it lives: the wrapped
  sums Σ b_i and Σ b_i·w_i of the integers b_i the elements' bit patterns read as, with odd
  weights w_i, so any single changed element (one ulp included), and any realistic set of
  them, changes the checksum. Changes made through ``.data`` (which bypass version counters),
  ``load_state_dict``, optimiser steps, ``model.float()`` and batch-norm statistics all count;
  rewriting the same values does not;
- the model's structure: ``repr(model)`` (module types and their settings, such as a
  LayerNorm's eps or a swapped activation) and the hooks registered on its modules;
- the objective's settings (:meth:`~influencekit.objective.Objective.settings`);
- the training inputs and targets when they were given as tensors (a Dataset cannot be
  re-read cheaply on every call; its examples are fingerprinted only by the gradient cache).

Python code inside ``forward()`` cannot be fingerprinted: a change there goes unnoticed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .inputs import Inputs, leaves

#: elements summed at once by :func:`checksum` (bounds its temporary memory)
CHUNK = 1 << 22
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def digest(*tensors: Tensor) -> str:
    """SHA-256 over the shapes, dtypes and bytes of ``tensors`` (copied to the CPU)."""
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                      .tobytes())
    return hasher.hexdigest()


def checksum(tensor: Tensor) -> tuple:
    """(shape, dtype, device, Σ b_i, Σ b_i·w_i) over the elements' bit patterns b_i, computed on
    the tensor's device in wrapping int64 arithmetic, with odd weights w_i."""
    flat = tensor.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    bits = flat.contiguous().view(_BITS[flat.element_size()]) if flat.numel() else flat
    plain = torch.zeros((), dtype=torch.int64, device=flat.device)
    weighted = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), CHUNK):
        block = bits[start : start + CHUNK].to(torch.int64)
        weights = torch.arange(start, start + block.numel(), dtype=torch.int64,
                               device=flat.device).mul_(2654435761).mul_(2).add_(1)
        plain += block.sum()
        weighted += (block * weights).sum()
    return (tuple(tensor.shape), tensor.dtype, tensor.device, int(plain), int(weighted))


def named_state(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Every parameter and buffer of ``model`` by name (parameters first)."""
    return [*model.named_parameters(), *model.named_buffers()]


def structure(model: nn.Module, with_identities: bool = True) -> str:
    """``repr(model)`` and the hooks on each module (their identities if asked: those are only
    meaningful within one process)."""
    hooks = []
    for name, module in model.named_modules():
        registries = [module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                      getattr(module, "_backward_pre_hooks", {})]
        counts = [len(registry) for registry in registries]
        if any(counts):
            identities = [sorted(id(hook) for hook in registry.values())
                          for registry in registries] if with_identities else []
            hooks.append(f"{name}: {counts} {identities}")
    return repr(model) + "\nhooks: " + "; ".join(hooks)


class ModelSnapshot:
    """The model (parameters, buffers, structure), the objective's settings and the training
    tensors at the time of the snapshot.

    Args:
        model: the network; it is only read.
        settings: a function returning the objective's settings (called now and on checks).
        data: the training inputs and targets if they are tensors, else ``None``.
    """

    def __init__(self, model: nn.Module, settings: Callable[[], Any],
                 data: tuple[Inputs, Tensor] | None = None) -> None:
        self.model = model
        self._settings_of = settings
        self._data = data
        self._structure = structure(model)
        self._checksums = self._state_checksums()
        self._settings = settings()
        self._data_checksums = self._tensor_checksums()

    def _state_checksums(self) -> dict[str, tuple]:
        return {name: checksum(tensor) for name, tensor in named_state(self.model)}

    def _tensor_checksums(self) -> list[tuple] | None:
        if self._data is None:
            return None
        X, y = self._data
        return [checksum(t) for t in [*leaves(X), y]]

    def changed(self) -> list[str]:
        """What differs from the snapshot: names of parameters and buffers, and
        ``"model structure or hooks"``, ``"objective settings"``, ``"training tensors"``."""
        now = self._state_checksums()
        names = sorted(set(now) | set(self._checksums))
        differing = [name for name in names if now.get(name) != self._checksums.get(name)]
        if structure(self.model) != self._structure:
            differing.append("model structure or hooks")
        if self._settings_of() != self._settings:
            differing.append("objective settings")
        if self._tensor_checksums() != self._data_checksums:
            differing.append("training tensors")
        return differing
