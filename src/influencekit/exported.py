"""``torch.export`` archives as ordinary modules for influencekit's passes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


class ExportedModule(nn.Module):
    """A ``torch.export`` program's module, shielded from ``train()``/``eval()`` (which an
    exported module refuses; its graph is already fixed in the mode it was exported in).

    Its parameters are the program's own, under the prefix ``program.``. Shapes: as exported.
    Export with a dynamic batch dimension so that any batch size runs:
    ``torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))``.
    """

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.program(x)


def exported_module(path: str | Path) -> ExportedModule:
    """The module of the ``torch.export`` archive at ``path`` (``torch.export.load``)."""
    return ExportedModule(torch.export.load(str(path)).module())
