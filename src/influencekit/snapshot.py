"""What a fit was made for: a snapshot of every parameter and buffer of the model.

``Influence.fit()`` binds θ̂ and prepares solvers (factors, eigendecompositions, spectra) for the
model as it is then. If the model changes afterwards — an optimiser step, ``load_state_dict``,
``model.float()``, batch-norm statistics updated by a forward pass in training mode — the fitted
state describes another model, and mixing the two would give scores of neither. A snapshot tells:
cheaply, by each tensor's identity, storage and version counter (bumped by every in-place
change), and when any of those moved, by comparing SHA-256 digests of the values, so that
rewriting a tensor with the same values does not count as a change.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn


def digest(*tensors: Tensor) -> str:
    """SHA-256 over the shapes, dtypes and bytes of ``tensors``."""
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                      .tobytes())
    return hasher.hexdigest()


def named_state(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Every parameter and buffer of ``model`` by name (parameters first)."""
    return [*model.named_parameters(), *model.named_buffers()]


class ModelSnapshot:
    """The parameters and buffers of ``model`` at the time of the snapshot.

    Args:
        model: the network; it is only read.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._signature = self._quick_signature()
        self._digests = {name: digest(tensor) for name, tensor in named_state(model)}

    def _quick_signature(self) -> tuple:
        return tuple((name, id(tensor), tensor._version, tensor.data_ptr(), tuple(tensor.shape),
                      tensor.dtype, tensor.device) for name, tensor in named_state(self.model))

    def changed(self) -> list[str]:
        """Names of the parameters and buffers whose values (or shapes, dtypes, presence) differ
        from the snapshot; empty if none."""
        signature = self._quick_signature()
        if signature == self._signature:
            return []
        now = {name: digest(tensor) for name, tensor in named_state(self.model)}
        names = sorted(set(now) | set(self._digests))
        differing = [name for name in names if now.get(name) != self._digests.get(name)]
        if not differing:
            self._signature = signature  # rewritten with the same values: nothing to refit
        return differing
