"""Per-example gradient norms from each layer's inputs and output gradients.

‖∇_θ L(z_i)‖² with ∇_θ L(z_i) = ∇ℓ_i + λ ⊙ θ is, over the parameters of a Linear, Conv2d or
Embedding layer (gradient G_i = Σ_t s_it a_itᵀ, see :mod:`influencekit.layers`, and W_λ the
layer's part of λ ⊙ θ as an (out × in) matrix),

    ‖G_i + W_λ‖² = ‖G_i‖² + 2 Σ_t s_itᵀ W_λ a_it + ‖W_λ‖²,
    ‖G_i‖² = Σ_{t,t'} (s_itᵀ s_it')(a_itᵀ a_it')         (or ‖G_i‖² formed, when cheaper),

so no per-example gradient is formed: one forward and one backward pass of the summed loss give
every a and s (for T = 1 the norm is ‖s_i‖²‖a_i‖²). Parameters outside such layers are
differentiated per example as usual.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gradients import GradientComputer
from .inputs import Inputs, batch_size
from .layers import find_blocks, layer_signals, weight_matrix


def squared_gradient_norms(gradients: GradientComputer, theta: Tensor, X: Inputs,
                           y: Tensor) -> Tensor:
    """``(b,)``: ‖∇_θ L(z_i)‖² (regulariser included) for the examples of the batch."""
    tracked = gradients.tracked
    blocks, _ = find_blocks(tracked)
    decayed = (gradients.decay * theta.detach()).expand_as(theta)  # λ ⊙ θ, (p,)
    b = batch_size(X)
    total = torch.zeros(b, dtype=theta.dtype, device=theta.device)
    covered: set[str] = set()
    if blocks:
        def summed(outputs: Tensor) -> tuple[Tensor, None]:
            return gradients.objective.train_loss(outputs, y).sum(), None

        signals = layer_signals(tracked, theta, X, blocks, summed)[1]
        for block, (a, s) in zip(blocks, signals, strict=True):
            covered.add(f"{block.name}.weight" if block.name else "weight")
            if block.bias is not None:
                covered.add(f"{block.name}.bias" if block.name else "bias")
            s = s[0]  # (b, T, out)
            W = weight_matrix(block, decayed[None])[0]  # (out, in)
            T, out_features, in_features = a.shape[1], block.out_features, block.in_features
            if T * T * (out_features + in_features) <= T * out_features * in_features:
                norms = ((s @ s.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum(dim=(1, 2))
            else:
                norms = torch.einsum("bto,bti->boi", s, a).pow(2).sum(dim=(1, 2))
            cross = ((a @ W.T) * s).sum(dim=(1, 2))  # Σ_t s_tᵀ W_λ a_t
            total += norms + 2 * cross + W.pow(2).sum()
    rest_names = [name for name in tracked.names if name not in covered]
    if rest_names:
        G = torch.cat(gradients.train_blocks(theta, X, y, rest_names), dim=1)
        _, rest = find_blocks(tracked)
        total += (G + decayed[rest]).pow(2).sum(dim=1)
    return total
