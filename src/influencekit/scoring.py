"""Scores from each layer's inputs and output gradients, never forming a per-example gradient.

A score is sᵀg_i, s = A⁻¹∇L_test a preconditioned query and g_i the training gradient of example
i. For a Linear or Conv2d layer g_i restricted to the layer is G_i = Σ_t s_it a_itᵀ (output
gradients s, inputs a with the bias folded in; see :mod:`influencekit.layers`), and the layer's
share of the score is ⟨Q, G_i⟩ = Σ_t s_itᵀ Q a_it with Q the query restricted to the layer as an
(out × in) matrix. One forward and one backward pass of the summed training loss over a chunk
gives every a and s; the shares are then batched products, chosen per layer by their cost
(multiply-adds per example, m queries, T positions):

- ``"direct"``: (Q a_it) for every query, then the dot with s_it: m·T·out·in. The choice for
  T = 1 (fully connected layers), where it never costs more than the next and needs no
  (out × in) per-example array.
- ``"outer"``: G_i = Σ_t s_it a_itᵀ once (T·out·in), then one matrix product with all queries
  (m·out·in): cheaper when T > 1 and m > 1 (convolutions).
- ``"low-rank"`` (with ``query_rank=r``): each query's Q truncated to its r largest singular
  triplets, Q ≈ U Vᵀ, and the share is Σ_t (Uᵀ s_it)·(Vᵀ a_it): m·T·r·(out + in). An
  approximation (kronfluence's ``query_gradient_rank``); the relative error ‖Q − Q_r‖_F/‖Q‖_F
  is reported per layer and for the whole query. Used for a layer only where it is cheaper.

Tracked parameters outside such layers are differentiated alone, per example, and the
regulariser's share sᵀ(λ ⊙ θ̂) is added to every score. :class:`ScoringReport` says what was done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .inputs import batch_size
from .layers import find_blocks, layer_signals, weight_matrix

if TYPE_CHECKING:
    from .influence import Influence


@dataclass
class ScoringReport:
    """How the training side of the last scores was computed.

    Attributes:
        method: ``"layers"`` (this module) or ``"per-example gradients"``.
        layers: per Linear/Conv2d layer name, ``"direct"``, ``"outer"`` or ``"low-rank"``.
        query_rank: r of the low-rank queries, or ``None``.
        query_error: per layer, ‖Q − Q_r‖_F / ‖Q‖_F (largest over the queries), when truncated.
        total_query_error: the same over all parameters of each query (largest over queries);
            0 when nothing was truncated.
        rest_parameters: tracked parameters differentiated per example (outside the layers).
    """

    method: str
    layers: dict[str, str] = field(default_factory=dict)
    query_rank: int | None = None
    query_error: dict[str, float] = field(default_factory=dict)
    total_query_error: float = 0.0
    rest_parameters: int = 0


def layer_path_applies(influence: Influence) -> bool:
    """Whether any tracked parameter sits in a Linear/Conv2d layer (else: per-example only)."""
    blocks, _ = find_blocks(influence.tracked_)
    return bool(blocks)


class LayerScorer:
    """sᵀg_i for a block of queries S (m, p) and any batch of training examples."""

    def __init__(self, influence: Influence, S: Tensor, query_rank: int | None = None) -> None:
        self.influence = influence
        tracked = influence.tracked_
        self.blocks, self.rest = find_blocks(tracked)
        covered = {f"{b.name}.weight" if b.name else "weight" for b in self.blocks} | {
            f"{b.name}.bias" if b.name else "bias" for b in self.blocks if b.bias is not None}
        self.rest_names = [name for name in tracked.names if name not in covered]
        self.queries = [weight_matrix(block, S) for block in self.blocks]  # (m, out, in)
        self.rest_queries = S[:, self.rest]
        gradients = influence.gradients_
        self.regulariser = S @ (gradients.decay * influence.theta_)
        self.report = ScoringReport("layers", query_rank=query_rank,
                                    rest_parameters=int(self.rest.numel()))
        self.factors: list[tuple[Tensor, Tensor] | None] = [None] * len(self.blocks)
        self.m = S.shape[0]
        if query_rank is not None:
            self._truncate(query_rank, S)

    def _truncate(self, rank: int, S: Tensor) -> None:
        """Q ≈ U Vᵀ per query and layer, from the r largest singular triplets (float64 SVD)."""
        squared_errors = torch.zeros(self.m, dtype=torch.float64, device=S.device)
        for index, (block, Q) in enumerate(zip(self.blocks, self.queries, strict=True)):
            r = min(rank, *Q.shape[1:])
            if r >= min(Q.shape[1:]):
                continue  # not smaller than the matrix: nothing to gain
            U, sigma, Vh = torch.linalg.svd(Q.double(), full_matrices=False)
            dropped = sigma[:, r:].pow(2).sum(dim=1)
            squared_errors += dropped
            norms = Q.double().flatten(1).pow(2).sum(dim=1).clamp_min(1e-300)
            self.report.query_error[block.name] = float((dropped / norms).sqrt().max())
            self.factors[index] = ((U[:, :, :r] * sigma[:, None, :r]).to(Q.dtype),
                                   Vh[:, :r, :].transpose(1, 2).to(Q.dtype))
        total = S.double().pow(2).sum(dim=1).clamp_min(1e-300)
        self.report.total_query_error = float((squared_errors / total).sqrt().max())

    def _method(self, index: int, T: int, out_features: int, in_features: int) -> str:
        costs = {"direct": self.m * T * out_features * in_features,
                 "outer": T * out_features * in_features + self.m * out_features * in_features}
        if self.factors[index] is not None:
            r = self.factors[index][0].shape[2]
            costs["low-rank"] = self.m * T * r * (out_features + in_features)
        return min(costs, key=costs.__getitem__)

    def scores(self, X: Tensor, y: Tensor) -> Tensor:
        """(m, b): sᵀg_i for the queries and the examples of the batch."""
        influence = self.influence
        gradients, theta = influence.gradients_, influence.theta_

        def summed_loss(outputs: Tensor) -> tuple[Tensor, None]:
            return gradients.objective.train_loss(outputs, y).sum(), None

        b = batch_size(X)
        total = self.regulariser[:, None].expand(self.m, b).clone()
        signals = layer_signals(gradients.tracked, theta, X, self.blocks, summed_loss)[1]
        for index, (block, Q, (a, s)) in enumerate(zip(self.blocks, self.queries, signals,
                                                       strict=True)):
            s = s[0]  # (b, T, out)
            method = self._method(index, a.shape[1], block.out_features, block.in_features)
            self.report.layers[block.name] = method
            if method == "low-rank":
                U, V = self.factors[index]
                total += torch.einsum("mbtr,mbtr->mb", torch.einsum("mir,bti->mbtr", V, a),
                                      torch.einsum("mor,bto->mbtr", U, s))
            elif method == "direct":
                total += torch.einsum("mbto,bto->mb", torch.einsum("moi,bti->mbto", Q, a), s)
            else:
                G = torch.einsum("bto,bti->boi", s, a)
                total += Q.flatten(1) @ G.flatten(1).T
        if self.rest_names:
            blocks = gradients.train_blocks(theta, X, y, self.rest_names)
            total += self.rest_queries @ torch.cat(blocks, dim=1).T
        return total
