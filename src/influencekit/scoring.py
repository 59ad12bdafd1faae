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
- ``"low-rank"`` (with ``query_rank=r``): each query's Q truncated to its r leading singular
  triplets (a seeded randomized SVD), Q ≈ U Vᵀ, and the share is Σ_t (Uᵀ s_it)·(Vᵀ a_it):
  m·T·r·(out + in). An approximation (kronfluence's ``query_gradient_rank``); the relative
  error ‖Q − Q_r‖_F/‖Q‖_F is reported per layer and for the whole query. Used for a layer only
  where it is cheaper.

Tracked parameters outside such layers are differentiated alone, per example, and the
regulariser's share sᵀ(λ ⊙ θ̂) is added to every score. :class:`ScoringReport` says what was done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import randomness
from .inputs import batch_size
from .layers import find_blocks, layer_signals, weight_matrix

if TYPE_CHECKING:
    from .factored_queries import LayerQueries
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


#: extra sketch columns and power iterations of the randomized range finder
OVERSAMPLING, POWER_ITERATIONS = 10, 2
#: the most bytes of float64 query matrices truncated at once
TRUNCATION_BYTES = 64 * 2**20


def leading_singular_triplets(Q: Tensor, rank: int, seed: int = 0, first: int = 0
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """The r leading singular triplets of each matrix of Q (m, out, in): U (m, out, r),
    σ (m, r), Vᴴ (m, r, in), with U σ Vᴴ = U Uᵀ Q.

    A randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4): Y = (Q Qᵀ)^q Q Ω for a
    seeded Gaussian Ω of r + 10 columns, re-orthonormalised between products, then the SVD of
    the small Yᵀ Q. It costs O(out·in·(r + 10)) per product instead of a full SVD's
    O(out·in·min(out, in)); when r + 10 ≥ min(out, in) the range is exact and so is the SVD.
    U Uᵀ Q is the approximation used, so ‖Q‖²_F − Σσ² is its exact squared error. Matrix j's Ω
    is drawn from ``seed + first + j`` alone, so a query's truncation does not depend on which
    other queries are truncated with it (``first``: the position of Q[0] among them).
    """
    m, rows, columns = Q.shape
    if rank + OVERSAMPLING >= min(rows, columns):
        U, sigma, Vh = torch.linalg.svd(Q, full_matrices=False)
        return U[:, :, :rank], sigma[:, :rank], Vh[:, :rank, :]
    omega = torch.stack([
        torch.randn(columns, rank + OVERSAMPLING, dtype=Q.dtype, device=Q.device,
                    generator=randomness.generator(seed + first + j, Q.device))
        for j in range(m)])
    basis = torch.linalg.qr(Q @ omega).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(Q @ torch.linalg.qr(Q.transpose(1, 2) @ basis).Q).Q
    U_small, sigma, Vh = torch.linalg.svd(basis.transpose(1, 2) @ Q, full_matrices=False)
    return (basis @ U_small[:, :, :rank]), sigma[:, :rank], Vh[:, :rank, :]


def layer_path_applies(influence: Influence) -> bool:
    """Whether any tracked parameter sits in a Linear/Conv2d layer (else: per-example only)."""
    blocks, _ = find_blocks(influence.tracked_)
    return bool(blocks)


class LayerScorer:
    """sᵀg_i for a block of queries S (m, p) and any batch of training examples."""

    def __init__(self, influence: Influence, S: Tensor, query_rank: int | None = None) -> None:
        self._layout(influence, query_rank)
        self.queries = [weight_matrix(block, S) for block in self.blocks]  # (m, out, in)
        self.rest_queries = S[:, self.rest]
        self.regulariser = S @ (influence.gradients_.decay * influence.theta_)
        self.m = S.shape[0]
        if query_rank is not None:
            self._truncate(query_rank, S)

    def _layout(self, influence: Influence, query_rank: int | None) -> None:
        self.influence = influence
        tracked = influence.tracked_
        self.blocks, self.rest = find_blocks(tracked)
        covered = {f"{b.name}.weight" if b.name else "weight" for b in self.blocks} | {
            f"{b.name}.bias" if b.name else "bias" for b in self.blocks if b.bias is not None}
        self.rest_names = [name for name in tracked.names if name not in covered]
        self.report = ScoringReport("layers", query_rank=query_rank,
                                    rest_parameters=int(self.rest.numel()))
        self.factors: list[tuple[Tensor, Tensor] | None] = [None] * len(self.blocks)

    @classmethod
    def from_factors(cls, influence: Influence, layers: list[LayerQueries],
                     query_rank: int) -> LayerScorer:
        """A scorer for queries already kept as Q ≈ U Vᵀ in every layer
        (:mod:`influencekit.factored_queries`); every tracked parameter must sit in a layer.
        The regulariser's share is Σ_l u_lᵀ (λ ⊙ W) v_l per layer."""
        scorer = cls.__new__(cls)
        scorer._layout(influence, query_rank)
        if scorer.rest_names:
            raise ValueError("factored queries need every tracked parameter in a layer")
        scorer.m = layers[0].U.shape[0]
        scorer.layer_queries = layers
        dtype = influence.theta_.dtype
        decayed = (influence.gradients_.decay * influence.theta_)[None]
        scorer.queries = [None] * len(scorer.blocks)
        scorer.rest_queries = None
        scorer.regulariser = torch.zeros(scorer.m, dtype=torch.float64,
                                         device=influence.theta_.device)
        squared_errors = torch.zeros_like(scorer.regulariser)
        squared_norms = torch.zeros_like(scorer.regulariser)
        for index, (block, layer) in enumerate(zip(scorer.blocks, layers, strict=True)):
            W = weight_matrix(block, decayed)[0].double()  # (out, in)
            scorer.regulariser += ((W @ layer.V.double()) * layer.U.double()).sum(dim=(1, 2))
            squared_errors += layer.squared_error
            squared_norms += layer.squared_norm
            scorer.report.query_error[block.name] = float(
                (layer.squared_error / layer.squared_norm.clamp_min(1e-300)).sqrt().max())
            U, V = layer.U.to(dtype), layer.V.to(dtype)
            scorer.factors[index] = (U.permute(1, 0, 2).reshape(U.shape[1], -1),
                                     V.permute(1, 0, 2).reshape(V.shape[1], -1))
        scorer.regulariser = scorer.regulariser.to(dtype)
        scorer.report.total_query_error = float(
            (squared_errors / squared_norms.clamp_min(1e-300)).sqrt().max())
        return scorer

    def _truncate(self, rank: int, S: Tensor) -> None:
        """Q ≈ U Vᵀ per query and layer: Q projected on the span of its r leading left singular
        vectors (float64; see :func:`leading_singular_triplets`), with the error of exactly that
        approximation reported."""
        squared_errors = torch.zeros(self.m, dtype=torch.float64, device=S.device)
        for index, (block, Q) in enumerate(zip(self.blocks, self.queries, strict=True)):
            r = min(rank, *Q.shape[1:])
            if r >= min(Q.shape[1:]):
                continue  # not smaller than the matrix: nothing to gain
            group = max(1, TRUNCATION_BYTES // (Q[0].numel() * 8))  # float64 queries at a time
            parts = [leading_singular_triplets(Q[j:j + group].double(), r, first=j)
                     for j in range(0, self.m, group)]
            U, sigma, Vh = (torch.cat(tensors) for tensors in zip(*parts, strict=True))
            norms = torch.cat([Q[j:j + group].double().flatten(1).pow(2).sum(dim=1)
                               for j in range(0, self.m, group)])
            dropped = (norms - sigma.pow(2).sum(dim=1)).clamp_min(0)  # ‖Q − U Uᵀ Q‖²_F
            squared_errors += dropped
            self.report.query_error[block.name] = float(
                (dropped / norms.clamp_min(1e-300)).sqrt().max())
            # as (out, m·r) and (in, m·r) matrices: one matrix product per chunk
            U_r = (U[:, :, :r] * sigma[:, None, :r]).to(Q.dtype)  # (m, out, r)
            V_r = Vh[:, :r, :].transpose(1, 2).to(Q.dtype)  # (m, in, r)
            self.factors[index] = (U_r.permute(1, 0, 2).reshape(U_r.shape[1], -1),
                                   V_r.permute(1, 0, 2).reshape(V_r.shape[1], -1))
        rows = max(1, TRUNCATION_BYTES // (S.shape[1] * 8))
        total = torch.cat([S[j:j + rows].double().pow(2).sum(dim=1)
                           for j in range(0, self.m, rows)]).clamp_min(1e-300)
        self.report.total_query_error = float((squared_errors / total).sqrt().max())

    def _method(self, index: int, T: int, out_features: int, in_features: int) -> str:
        if self.queries[index] is None:
            return "low-rank"  # kept factored (from_factors): no dense query to use
        costs = {"direct": self.m * T * out_features * in_features,
                 "outer": T * out_features * in_features + self.m * out_features * in_features}
        if self.factors[index] is not None:
            r = self.factors[index][0].shape[1] // self.m
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
            T = a.shape[1]
            if method == "low-rank":  # Σ_t (U_jᵀ s_it)·(V_jᵀ a_it), as two matrix products
                U, V = self.factors[index]
                projected = (a.reshape(b * T, -1) @ V) * (s.reshape(b * T, -1) @ U)
                total += projected.reshape(b, T * self.m, -1).sum(dim=2).reshape(
                    b, T, self.m).sum(dim=1).T
            elif method == "direct":  # Σ_t s_itᵀ (Q_j a_it): (b·T, in) @ (in, m·out)
                products = a.reshape(b * T, -1) @ Q.reshape(-1, Q.shape[2]).T
                total += (products.reshape(b, T, self.m, -1) * s[:, :, None, :]).sum(
                    dim=(1, 3)).T
            else:
                G = torch.einsum("bto,bti->boi", s, a)
                total += Q.flatten(1) @ G.flatten(1).T
        if self.rest_names:
            blocks = gradients.train_blocks(theta, X, y, self.rest_names)
            total += self.rest_queries @ torch.cat(blocks, dim=1).T
        return total
