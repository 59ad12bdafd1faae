"""K-FAC / EK-FAC preconditioned queries kept factored: never an (m, p) matrix.

For a fully connected layer (one position per example, T = 1) a query's gradient is the outer
product G = s aᵀ of the layer's output gradient s (out) and input a (in, bias folded in). In the
layer's Kronecker eigenbasis (Q_S, Q_A of :mod:`influencekit.solvers.kfac`) the preconditioned
query is

    Q = Q_S M Q_Aᵀ,    M = (s̃ ãᵀ) ⊘ D = diag(s̃) D⁻¹ diag(ã),    s̃ = Q_Sᵀ s,  ã = Q_Aᵀ a,

with D = Λ + λ_decay + λ_d (out × in) the damped eigenvalues. Applying the preconditioner to the
dense query costs 2·out·in·(out + in) multiply-adds per query; rotating s and a costs
out² + in². The rank-r query that layer scoring uses (``query_rank``) is then built without M:

1. D⁻¹ ≈ U_D V_Dᵀ of rank L = min(2r + 8, out, in), once per layer and damping (a seeded
   randomized SVD; exact, U_D = I or V_D = I, when L = min(out, in)). Then
   M ≈ (s̃ ⊙ U_D)(ã ⊙ V_D)ᵀ, rank L, for every query at O(L·(out + in)).
2. Each query's rank-L factors are recompressed to its best rank r (QR of both factors, SVD of
   the L × L core): P Wᵀ.
3. The factors are rotated back, U = Q_S P and V = Q_A W, and scoring is Σ (Uᵀ s_i)·(Vᵀ a_i).

The error reported is exact, not a bound: ‖M − P Wᵀ‖²_F = ‖M‖² − 2⟨M, P Wᵀ⟩ + ‖P Wᵀ‖² with
‖M‖² = (s̃²)ᵀ D⁻² (ã²) and ⟨M, P Wᵀ⟩ = Σ_l (p_l ⊙ s̃)ᵀ D⁻¹ (w_l ⊙ ã), in float64 (the rotations
are orthogonal, so it is also ‖Q − U Vᵀ‖_F); the subtraction leaves it accurate to about
1e-8·‖Q‖_F (√ of float64's rounding), and it is exactly 0 when nothing was truncated (r ≥
min(out, in)). This is not the per-query optimal rank-r
truncation of M (that needs M), only close to it: at L = 2r + 8 the shared factorisation's error
is below the optimal one on the models measured (README, "Scale").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .scoring import leading_singular_triplets

#: queries whose float64 (out × in) work arrays are formed at once when checking the error
CHUNK_BYTES = 64 * 2**20


def shared_rank(rank: int, out_features: int, in_features: int) -> int:
    """L, the rank of the shared factorisation of D⁻¹ for query rank r."""
    return min(2 * rank + 8, out_features, in_features)


def inverse_factors(denominator: Tensor, rank: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """D⁻¹ ≈ U_D V_Dᵀ, U_D (out, L) and V_D (in, L) in float64, L = ``rank``.

    Exact when L = min(out, in) (U_D = I with V_D = D⁻ᵀ, or U_D = D⁻¹ with V_D = I); otherwise
    the L leading singular triplets of D⁻¹ (:func:`~influencekit.scoring.leading_singular_triplets`,
    seeded).
    """
    inverse = 1.0 / denominator.double()
    out_features, in_features = inverse.shape
    if rank >= min(out_features, in_features):
        if out_features <= in_features:
            return torch.eye(out_features, dtype=inverse.dtype, device=inverse.device), \
                inverse.T.clone()
        return inverse.clone(), torch.eye(in_features, dtype=inverse.dtype,
                                          device=inverse.device)
    U, sigma, Vh = leading_singular_triplets(inverse[None], rank, seed=seed)
    return U[0] * sigma[0], Vh[0].T


@dataclass
class LayerQueries:
    """One layer's preconditioned queries, Q_j ≈ U_j V_jᵀ.

    Attributes:
        U: (m, out, r), the singular values folded in, in the model's dtype.
        V: (m, in, r), in the model's dtype.
        squared_error: (m,) ‖Q_j − U_j V_jᵀ‖²_F.
        squared_norm: (m,) ‖Q_j‖²_F.
    """

    U: Tensor
    V: Tensor
    squared_error: Tensor
    squared_norm: Tensor


def layer_queries(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor, denominator: Tensor,
                  factors: tuple[Tensor, Tensor], rank: int) -> LayerQueries:
    """The rank-r preconditioned queries of one layer from their inputs a (m, in) and output
    gradients s (m, out); ``denominator`` D (out, in); ``factors`` :func:`inverse_factors`.
    All arithmetic in float64 but the rotation back (in the model's dtype)."""
    U_D, V_D = factors
    inverse = 1.0 / denominator.double()
    a_rot = a.double() @ Q_A.double()  # (m, in)
    s_rot = s.double() @ Q_S.double()  # (m, out)
    left = s_rot[:, :, None] * U_D[None]  # (m, out, L)
    right = a_rot[:, :, None] * V_D[None]  # (m, in, L)
    r = min(rank, left.shape[2])
    Q_left, R_left = torch.linalg.qr(left)
    Q_right, R_right = torch.linalg.qr(right)
    core_U, sigma, core_Vh = torch.linalg.svd(R_left @ R_right.transpose(1, 2))
    P = Q_left @ (core_U[:, :, :r] * sigma[:, None, :r])  # (m, out, r)
    W = Q_right @ core_Vh[:, :r, :].transpose(1, 2)  # (m, in, r)
    squared_norm = ((s_rot.pow(2) @ inverse.pow(2)) * a_rot.pow(2)).sum(dim=1)
    # ⟨M, P Wᵀ⟩ = Σ_l (p_l ⊙ s̃)ᵀ D⁻¹ (w_l ⊙ ã), a few queries at a time
    group = max(1, CHUNK_BYTES // (inverse.shape[0] * r * 8))
    inner = torch.cat([
        ((P[j:j + group] * s_rot[j:j + group, :, None])
         * (inverse @ (W[j:j + group] * a_rot[j:j + group, :, None]))).sum(dim=(1, 2))
        for j in range(0, a.shape[0], group)])
    kept = sigma[:, :r].pow(2).sum(dim=1)  # ‖P Wᵀ‖²: W has orthonormal columns
    squared_error = (squared_norm - 2 * inner + kept).clamp_min(0)
    if r == min(inverse.shape):  # D⁻¹ factored exactly and nothing truncated: no error at all
        squared_error = torch.zeros_like(squared_error)
    dtype = Q_S.dtype  # the rotation back in the model's precision, as scoring uses it
    return LayerQueries(Q_S @ P.to(dtype), Q_A @ W.to(dtype), squared_error, squared_norm)
