"""TorchScript files as ordinary modules.

influencekit differentiates a model through ``torch.func`` (per-example gradients, Hessian-
vector products), which cannot run a TorchScript module. A TorchScript file keeps each
submodule's class name (``original_name``), parameters, buffers and constants, so a model built
of standard layers is rebuilt here as the same eager module with the same weights; the caller
then checks that both give the same outputs (:func:`rebuilt_and_checked`). Anything else
(a custom ``forward``) is refused with the advice to save with ``torch.export``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import InputError


class UnsupportedTorchScriptError(InputError):
    """A TorchScript module that cannot be rebuilt as an eager module: the message names the
    layer and the formats that work."""


def _copy_state(source: Any, target: nn.Module) -> nn.Module:
    state = {name: value.detach().clone() for name, value in source.state_dict().items()}
    target.load_state_dict(state)
    return target


def _linear(m: Any) -> nn.Module:
    out_features, in_features = m.weight.shape
    return nn.Linear(in_features, out_features, bias=m.bias is not None,
                     dtype=m.weight.dtype)


def _conv(kind: type[nn.Module]) -> Callable[[Any], nn.Module]:
    def build(m: Any) -> nn.Module:
        out_channels, in_per_group = m.weight.shape[:2]
        return kind(in_per_group * m.groups, out_channels, tuple(m.kernel_size), stride=m.stride,
                    padding=m.padding, dilation=m.dilation, groups=m.groups,
                    bias=m.bias is not None, padding_mode=m.padding_mode, dtype=m.weight.dtype)
    return build


def _norm(kind: type[nn.Module]) -> Callable[[Any], nn.Module]:
    def build(m: Any) -> nn.Module:
        features = m.running_mean.shape[0]
        return kind(features, eps=m.eps, momentum=m.momentum, affine=m.weight is not None,
                    dtype=m.running_mean.dtype)
    return build


def _pool(kind: type[nn.Module]) -> Callable[[Any], nn.Module]:
    def build(m: Any) -> nn.Module:
        arguments = {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                     "ceil_mode": m.ceil_mode}
        if hasattr(m, "dilation"):
            arguments["dilation"] = m.dilation
        return kind(**arguments)
    return build


BUILDERS: dict[str, Callable[[Any], nn.Module]] = {
    "Linear": _linear,
    "Conv1d": _conv(nn.Conv1d), "Conv2d": _conv(nn.Conv2d),
    "BatchNorm1d": _norm(nn.BatchNorm1d), "BatchNorm2d": _norm(nn.BatchNorm2d),
    "MaxPool1d": _pool(nn.MaxPool1d), "MaxPool2d": _pool(nn.MaxPool2d),
    "AvgPool1d": _pool(nn.AvgPool1d), "AvgPool2d": _pool(nn.AvgPool2d),
    "Flatten": lambda m: nn.Flatten(m.start_dim, m.end_dim),
    "ReLU": lambda m: nn.ReLU(), "Tanh": lambda m: nn.Tanh(), "Sigmoid": lambda m: nn.Sigmoid(),
    "GELU": lambda m: nn.GELU(approximate=m.approximate), "SiLU": lambda m: nn.SiLU(),
    "ELU": lambda m: nn.ELU(m.alpha), "Softplus": lambda m: nn.Softplus(m.beta, m.threshold),
    "LeakyReLU": lambda m: nn.LeakyReLU(m.negative_slope),
    "Dropout": lambda m: nn.Dropout(m.p), "Identity": lambda m: nn.Identity(),
    "LayerNorm": lambda m: nn.LayerNorm(tuple(m.normalized_shape), eps=m.eps,
                                        elementwise_affine=m.weight is not None),
}


def eager_module(script: Any, where: str = "the model") -> nn.Module:
    """The eager twin of a TorchScript module made of :data:`BUILDERS`' layers, possibly
    nested in ``nn.Sequential``; weights and buffers copied."""
    name = getattr(script, "original_name", type(script).__name__)
    if name == "Sequential":
        children = [eager_module(child, f"{where}.{key}")
                    for key, child in script.named_children()]
        return nn.Sequential(*children)
    if name not in BUILDERS:
        raise UnsupportedTorchScriptError(
            f"The TorchScript file's {where} is a {name}, which influencekit cannot rebuild "
            f"(torch.func, which influencekit differentiates with, cannot run TorchScript). "
            f"Rebuildable: nn.Sequential of {', '.join(sorted(BUILDERS))}. Save the model "
            f"with torch.export instead (torch.export.save(torch.export.export(model, (x,)), "
            f"'model.pt2')), or pass it with --setup.")
    return _copy_state(script, BUILDERS[name](script)).eval()


def rebuilt_and_checked(script: Any, example: Tensor, source: str | Path = "the model"
                        ) -> nn.Module:
    """The eager twin of the loaded TorchScript module ``script`` (:func:`eager_module`),
    refused unless it gives the scripted module's outputs on ``example`` (to 1e-6 relative).
    ``source`` names the file in the error."""
    eager = eager_module(script)
    with torch.no_grad():
        expected, got = script(example), eager(example)
    scale = float(expected.abs().max()) or 1.0
    if got.shape != expected.shape or float((got - expected).abs().max()) > 1e-6 * scale:
        raise UnsupportedTorchScriptError(
            f"{source}: the rebuilt module's outputs differ from the TorchScript module's (its "
            f"forward is not the plain chain of its layers); save it with torch.export.")
    return eager
