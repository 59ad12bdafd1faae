"""Per-token scores: how much each token of a training sequence contributes to its score.

A sequence's training loss is a sum over its tokens, ℓ_i = Σ_t ℓ_it (for a causal LM, ℓ_it is
−log p(token t | tokens before t)), so its gradient splits the same way and so does its score
against a solved query s_j = (C + λ_d·I)⁻¹ ∇L_test(z_j):

    I_up,loss(z_j, z_i) = −s_jᵀ(Σ_t ∇ℓ_it + λ ⊙ θ̂) = Σ_t T[j, i, t] + r_j,
    T[j, i, t] = −s_jᵀ ∇ℓ_it,        r_j = −s_jᵀ(λ ⊙ θ̂)  (the regulariser's share).

Every s_jᵀ∇ℓ_it for all t at once is one forward-mode derivative (a JVP) of the map θ ↦ (ℓ_it)_t
in the direction s_j: no per-token gradient is ever formed, for any model. The cost is one
forward pass with tangents per query and chunk of sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jvp, vmap

from .errors import InvalidSettingError
from .inputs import Inputs
from .objective import Objective
from .parameters import TrackedParameters
from .transforms import is_transform_limitation


@dataclass(frozen=True)
class TokenScores:
    """Per-token I_up,loss of training sequences on test points.

    Attributes:
        tokens: ``(m, k, T)``: the share of target token t of training sequence i (the k chosen
            sequences, in the order asked for) in I_up,loss(z_j, z_i); 0 where the token does
            not count (padding, ``ignore_index``, the first token of a shifted LM).
        regularizer: ``(m,)``: the regulariser's share, the same for every sequence.
        indices: ``(k,)`` the training sequences scored.

    ``tokens.sum(-1) + regularizer[:, None]`` equals ``influence(test)[:, indices]``.
    """

    tokens: Tensor
    regularizer: Tensor
    indices: Tensor

    def totals(self) -> Tensor:
        """``(m, k)``: each sequence's whole score (its tokens plus the regulariser)."""
        return self.tokens.sum(dim=-1) + self.regularizer[:, None]


def check_token_objective(objective: Objective) -> None:
    """Per-token scores need an objective whose loss is a sum of token losses."""
    if not callable(getattr(objective, "token_losses", None)):
        raise InvalidSettingError(
            f"Per-token scores need an objective whose per-example loss is a sum over tokens "
            f"and that says so with token_losses(outputs, targets) -> (b, T), such as "
            f"CausalLMObjective; {type(objective).__name__} has none.")


def token_directional_derivatives(tracked: TrackedParameters, objective: Objective,
                                  theta: Tensor, S: Tensor, X: Inputs, y: Tensor) -> Tensor:
    """``(m, b, T)``: s_jᵀ∇_θ ℓ_it for every query row s_j of ``S`` ``(m, p)`` and every token t
    of every sequence in the batch, by one JVP per query (vmapped where the model allows)."""
    theta = theta.detach()

    def token_losses(th: Tensor) -> Tensor:
        return objective.token_losses(tracked.forward(th, X), y)  # type: ignore[attr-defined]

    def along(s: Tensor) -> Tensor:
        return jvp(token_losses, (theta,), (s,))[1]

    try:
        return vmap(along)(S)
    except Exception as error:
        if not is_transform_limitation(error):
            raise
    return torch.stack([along(s) for s in S])
