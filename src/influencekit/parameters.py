"""Which parameters θ influence is taken over, and the flat-vector view of them.

Influence functions need θ as one vector of length p: gradients are ``(p,)``, per-example gradients
``(b, p)``, Hessians ``(p, p)``. :class:`TrackedParameters` selects the parameters (all trainable
ones, or a named subset such as the last layer), flattens them in a fixed order, and evaluates the
model functionally at any θ with ``torch.func.functional_call`` — the model's own parameters and
``requires_grad`` flags are never touched. Untracked parameters and buffers stay at their current
values as constants.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import DtypeError, UnknownParameterError
from .huggingface import model_output
from .inputs import Inputs, call_arguments


def _matches(parameter_name: str, selector: str) -> bool:
    return parameter_name == selector or parameter_name.startswith(selector + ".")


def select_parameter_names(model: nn.Module, names: Sequence[str] | str | None) -> list[str]:
    """Names of the parameters to track, in the model's order.

    Args:
        model: the network.
        names: ``None`` for every parameter with ``requires_grad``; otherwise parameter names or
            module prefixes (``"fc"`` selects ``"fc.weight"`` and ``"fc.bias"``).
    """
    named = dict(model.named_parameters())
    if not named:
        raise UnknownParameterError(
            f"{type(model).__name__} has no parameters, so there is nothing to take influence over."
        )
    if names is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
        if not chosen:
            raise UnknownParameterError(
                "No parameter of the model has requires_grad=True. Name the parameters to track "
                f"with params=[...]; available: {_preview(named)}."
            )
        return chosen
    selectors = [names] if isinstance(names, str) else list(names)
    if not selectors:
        raise UnknownParameterError("params=[] selects nothing; pass None to track all parameters.")
    for selector in selectors:
        if not any(_matches(n, selector) for n in named):
            raise UnknownParameterError(
                f"No parameter is named {selector!r} or starts with {selector + '.'!r}. "
                f"Available parameters: {_preview(named)}."
            )
    return [n for n in named if any(_matches(n, s) for s in selectors)]


def _preview(named: dict[str, Tensor], limit: int = 20) -> str:
    keys = list(named)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


class TrackedParameters:
    """The tracked parameters θ of a model as one flat vector, and the model as a function of θ.

    Args:
        model: the trained network (left unchanged).
        names: see :func:`select_parameter_names`.
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | str | None = None) -> None:
        self.model = model
        self.names = select_parameter_names(model, names)
        named = dict(model.named_parameters())
        tracked = [named[n] for n in self.names]
        dtypes = {p.dtype for p in tracked}
        if len(dtypes) != 1:
            raise DtypeError(
                f"The tracked parameters have mixed dtypes {sorted(map(str, dtypes))}; convert the "
                "model to one dtype first (e.g. model.double() or model.float())."
            )
        self.shapes = [p.shape for p in tracked]
        self.numels = [p.numel() for p in tracked]
        self.dtype = tracked[0].dtype
        self.device = tracked[0].device
        tracked_names = set(self.names)
        self._constants = {n: p.detach() for n, p in named.items() if n not in tracked_names}
        #: Linear/Conv2d modules whose weights the forward pass uses without calling the module
        #: (e.g. nn.MultiheadAttention's out_proj); found at fit by layers.indirect_layers
        self.indirect_layers: frozenset[str] = frozenset()

    def all_names(self) -> list[str]:
        """Every parameter name of the model, tracked or not."""
        return [name for name, _ in self.model.named_parameters()]

    def named_tensors(self) -> list[tuple[str, Tensor]]:
        """The tracked parameters as ``(name, tensor)`` pairs, in θ's order (live, not copies)."""
        named = dict(self.model.named_parameters())
        return [(n, named[n]) for n in self.names]

    @property
    def dim(self) -> int:
        """p, the number of tracked scalars."""
        return sum(self.numels)

    def flat(self) -> Tensor:
        """The current values of θ, detached, shape ``(p,)``."""
        named = dict(self.model.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split a flat ``(p,)`` vector into named tensors of the parameters' shapes."""
        pieces = theta.split(self.numels)
        parts = zip(self.names, pieces, self.shapes, strict=True)
        return {n: piece.view(shape) for n, piece, shape in parts}

    def forward(self, theta: Tensor, inputs: Inputs) -> Tensor:
        """The model's output at θ (untracked parameters and buffers as they are now)."""
        return self.forward_parts(self.unflatten(theta), inputs)

    def forward_parts(self, parts: dict[str, Tensor], inputs: Inputs) -> Tensor:
        """The model's output with the tracked parameters given by name (see :meth:`unflatten`);
        ``inputs`` a tensor, or a dict (``model(**inputs)``) or tuple (``model(*inputs)``)."""
        args, kwargs = call_arguments(inputs)
        with differentiable_attention():
            return model_output(functional_call(self.model, {**self._constants, **parts}, args,
                                                kwargs))

    @torch.no_grad()
    def assign(self, theta: Tensor) -> None:
        """Write θ into the model's tracked parameters in place."""
        named = dict(self.model.named_parameters())
        for n, value in self.unflatten(theta.detach()).items():
            named[n].copy_(value)


@contextmanager
def differentiable_attention() -> Iterator[None]:
    """Attention that torch.func can differentiate twice and in forward mode, for the block.

    ``scaled_dot_product_attention`` runs its math kernel: the fused (flash, memory-efficient)
    kernels have no second derivative, which Hessian-vector products need. The fused fast path
    of ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` in eval mode is switched
    off: it supports neither forward-mode derivatives nor functorch's transforms (it is chosen
    when no input requires grad, which is how parameters look inside those transforms). The
    global fast-path flag is restored on exit.
    """
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode (no dropout, running batch-norm statistics) for the block."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
