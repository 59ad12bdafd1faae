"""Linear, Conv2d and Embedding layers among the tracked parameters, their inputs and output
gradients.

For such a layer the gradient of its weights (bias folded in as a trailing input 1) at one
example is a sum of outer products, G = Σ_t s_t a_tᵀ, of its inputs a_t and the gradients s_t
with respect to its outputs, over the T positions t (the pixels of a convolution, the extra
dimensions of a Linear input; T = 1 otherwise). K-FAC builds its factors from a and s, and the
Kronecker projection of a gradient store projects them, without forming G. This module finds
the layers, runs the model with hooks that capture a and the outputs z, and puts a and ∂/∂z in
the (b, T, in) and (K, b, T, out) layouts. An nn.Embedding is the Linear map of one-hot token
vectors (in = vocabulary, out = embedding size, weight stored transposed), so its input factor
is diagonal. A layer called several times in one forward pass
(weights shared between uses) contributes every call: its gradient is the sum over the calls,
so the calls' positions are concatenated along t.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inputs import Inputs, batch_size, rows_of
from .parameters import TrackedParameters


@dataclass
class LayerBlock:
    """One Linear/Conv2d layer: where its weight and bias sit in θ, and what a pass captured."""

    module: nn.Module
    weight: slice
    bias: slice | None
    out_features: int
    in_features: int  # including the bias column
    name: str = ""
    captured: dict[str, Tensor] = field(default_factory=dict)
    transposed: bool = False  # the weight is stored (in, out), as nn.Embedding's (V, d)


def offsets(names: list[str], numels: list[int]) -> dict[str, slice]:
    """Where each named parameter sits in the flat θ."""
    out, start = {}, 0
    for name, size in zip(names, numels, strict=True):
        out[name] = slice(start, start + size)
        start += size
    return out


EMBEDDING_LIMIT = 4096  # vocabularies up to this size get a block (one-hot inputs are dense)


def supported(module: nn.Module) -> bool:
    """Linear; Conv2d without groups, non-zero padding modes or ``padding="same"``; and
    nn.Embedding of at most :data:`EMBEDDING_LIMIT` rows without ``padding_idx`` (its row gets
    no gradient), ``max_norm``, ``scale_grad_by_freq`` or sparse gradients."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Embedding):
        return (module.padding_idx is None and module.max_norm is None
                and not module.scale_grad_by_freq and not module.sparse
                and module.num_embeddings <= EMBEDDING_LIMIT)
    return (isinstance(module, nn.Conv2d) and module.groups == 1
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def find_blocks(tracked: TrackedParameters, block_type: type[LayerBlock] = LayerBlock
                ) -> tuple[list[LayerBlock], Tensor]:
    """The supported layers whose weight is tracked (a bias is folded in if tracked too), and
    the θ indices of every other tracked parameter, ``(r,)``. Layers in
    ``tracked.indirect_layers`` (see :func:`indirect_layers`) count as other parameters."""
    where = offsets(tracked.names, tracked.numels)
    blocks, covered = [], set()
    for prefix, module in tracked.model.named_modules():
        name_w = f"{prefix}.weight" if prefix else "weight"
        name_b = f"{prefix}.bias" if prefix else "bias"
        if not supported(module) or name_w not in where or prefix in tracked.indirect_layers:
            continue
        if isinstance(module, nn.Embedding):  # a Linear map of one-hot token vectors
            blocks.append(block_type(module, where[name_w], None, module.embedding_dim,
                                     module.num_embeddings, prefix, transposed=True))
            covered.add(name_w)
            continue
        bias = where.get(name_b) if module.bias is not None else None
        in_features = module.weight[0].numel() + (1 if bias is not None else 0)
        blocks.append(block_type(module, where[name_w], bias, module.weight.shape[0],
                                 in_features, prefix))
        covered.add(name_w)
        if bias is not None:
            covered.add(name_b)
    rest = [i for name in tracked.names if name not in covered
            for i in range(where[name].start, where[name].stop)]
    return blocks, torch.tensor(rest, dtype=torch.long, device=tracked.device)


def forward_with_capture(tracked: TrackedParameters, theta: Tensor, X: Tensor,
                         blocks: list[LayerBlock]) -> Tensor:
    """The model output at θ with every call's input (detached) and output (in the graph) of
    every block captured in the lists ``block.captured["a"]`` and ``["z"]``."""
    theta = theta.detach().requires_grad_(True)
    handles = []
    for block in blocks:
        block.captured.clear()

        def hook(module: nn.Module, inputs: tuple, output: Tensor,
                 block: LayerBlock = block) -> None:
            block.captured.setdefault("a", []).append(inputs[0].detach())
            block.captured.setdefault("z", []).append(output)

        handles.append(block.module.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            return tracked.forward(theta, X)
    finally:
        for handle in handles:
            handle.remove()


def _call_activations(block: LayerBlock, a: Tensor) -> Tensor:
    module = block.module
    if isinstance(module, nn.Embedding):  # token ids (b, ...) -> one-hot rows (b, T, V)
        one_hot = F.one_hot(a.long(), module.num_embeddings).to(module.weight.dtype)
        return one_hot.reshape(a.shape[0], -1, module.num_embeddings)
    if isinstance(module, nn.Conv2d):
        a = F.unfold(a, module.kernel_size, module.dilation, module.padding,
                     module.stride).transpose(1, 2)
    else:
        a = a.reshape(a.shape[0], -1, a.shape[-1])
    if block.bias is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return a


def activations(block: LayerBlock) -> Tensor:
    """a_it with the bias 1 appended, every call's positions in a row: (b, T, in)."""
    return torch.cat([_call_activations(block, a) for a in block.captured["a"]], dim=1)


def output_gradients(block: LayerBlock, s: Tensor) -> Tensor:
    """∂/∂z as (K, b, T, out) from (K, b, *z.shape[1:]) for Linear (…, out) or Conv2d
    (out, H, W) outputs."""
    K, b = s.shape[:2]
    if isinstance(block.module, nn.Conv2d):
        return s.reshape(K, b, block.out_features, -1).transpose(2, 3)
    return s.reshape(K, b, -1, block.out_features)


def layer_signals(tracked: TrackedParameters, theta: Tensor, X: Tensor,
                  blocks: list[LayerBlock],
                  target: Callable[[Tensor], tuple[Tensor, Tensor | None]]
                  ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """One forward and one backward pass: the model output, and for each block
    (a (b, T, in), s (K, b, T, out)).

    ``target(outputs)`` returns what to differentiate and the vectors to pull back: a scalar and
    ``None`` (s = its gradient, K = 1, e.g. the summed loss), or the outputs themselves and a
    (K, *outputs.shape) batch of vectors (K pullbacks at once, e.g. the columns of the output
    Hessian's square roots).
    """
    outputs = forward_with_capture(tracked, theta, X, blocks)
    differentiated, vectors = target(outputs)
    calls = [z for block in blocks for z in block.captured.get("z", [])]
    grads = torch.autograd.grad(differentiated, calls, grad_outputs=vectors,
                                is_grads_batched=vectors is not None,
                                allow_unused=True) if calls else []
    K = 1 if vectors is None else vectors.shape[0]
    signals, position = [], 0
    for block in blocks:
        parts = []
        for z in block.captured.get("z", []):
            g = grads[position]
            position += 1
            g = torch.zeros(K, *z.shape, dtype=z.dtype, device=z.device) if g is None else \
                (g.detach() if vectors is not None else g.detach().unsqueeze(0))
            parts.append(output_gradients(block, g))
        b = outputs.shape[0]
        if not parts:  # the layer took no part in this forward pass: no positions, no gradient
            like = dict(dtype=outputs.dtype, device=outputs.device)
            signals.append((torch.zeros(b, 0, block.in_features, **like),
                            torch.zeros(K, b, 0, block.out_features, **like)))
            continue
        signals.append((activations(block), torch.cat(parts, dim=2)))
        block.captured.clear()
    return outputs.detach(), signals


def indirect_layers(tracked: TrackedParameters, theta: Tensor, X: Inputs,
                    loss: Callable[[Tensor], Tensor]) -> list[str]:
    """The supported layers whose captured inputs and output gradients do not give autograd's
    gradient of their weights, Σ_{i,t} s_it a_itᵀ ≠ ∂loss/∂W, on the batch X.

    That happens when the forward pass uses a layer's weight without calling the layer (as
    ``nn.MultiheadAttention`` does with its ``out_proj``, through ``F.linear`` on the weight),
    uses it both ways (a tied embedding and output layer), or calls the layer on an input
    without the batch dimension (a position embedding of ``arange(T)``). Layer-structured
    methods (K-FAC's factors, layer scoring, Kronecker
    projections) would silently miss those uses, so such layers are treated like any other
    parameter. ``loss(outputs)`` is the summed training loss of the batch (a scalar).
    """
    blocks, _ = find_blocks(tracked)
    if not blocks:
        return []

    def summed(outputs: Tensor) -> tuple[Tensor, None]:
        return loss(outputs), None

    b = batch_size(X)
    unbatched = set()  # layers whose calls do not carry the batch dimension, seen on two sizes
    for rows in ([slice(0, b), slice(0, b - 1)] if b > 1 else [slice(0, b)]):
        for block in blocks:
            block.captured.clear()
        forward_with_capture(tracked, theta, rows_of(X, rows), blocks)
        size = rows.stop - rows.start
        unbatched |= {block.name for block in blocks
                      if any(a.shape[0] != size for a in block.captured.get("a", []))}
    for block in blocks:
        block.captured.clear()
    blocks = [block for block in blocks if block.name not in unbatched]
    signals = layer_signals(tracked, theta, X, blocks, summed)[1]
    theta = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        true, = torch.autograd.grad(loss(tracked.forward(theta, X)), theta)
    tolerance = 1e-8 if theta.dtype == torch.float64 else 1e-3
    found = sorted(unbatched)
    for block, (a, s) in zip(blocks, signals, strict=True):
        G = torch.einsum("bto,bti->oi", s[0], a)  # (out, in), bias column last
        expected = weight_matrix(block, true[None])[0]
        scale = float(expected.norm()) + float(G.norm())
        if float((G - expected).norm()) > tolerance * max(scale, 1e-30):
            found.append(block.name)
    return found


def weight_matrix(block: LayerBlock, V: Tensor) -> Tensor:
    """Rows of V (k, p) restricted to the block as (k, out, in) matrices, bias column last."""
    k = V.shape[0]
    if block.transposed:
        return V[:, block.weight].reshape(k, block.in_features, block.out_features) \
            .transpose(1, 2)
    W = V[:, block.weight].reshape(k, block.out_features, -1)
    if block.bias is not None:
        W = torch.cat([W, V[:, block.bias].reshape(k, block.out_features, 1)], dim=2)
    return W
