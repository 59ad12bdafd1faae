"""Extreme eigenvalues of a symmetric operator from its matrix-vector products (Lanczos).

Used to set LiSSA's scale, to choose ``damping="auto"``, and to diagnose curvature without
forming the matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .linalg import orthonormal_columns


@dataclass(frozen=True)
class SpectrumEstimate:
    """The extreme eigenvalues of the undamped curvature C (weight decay included), as far as
    they are known.

    Attributes:
        low: the smallest eigenvalue, or an upper bound of it (a Ritz value).
        high: the largest eigenvalue, or a lower bound of it.
        method: how they were found (``"eigendecomposition"``, ``"Lanczos, 30 steps"``, ...).
        exact: whether ``low`` and ``high`` are the eigenvalues themselves.
    """

    low: float
    high: float
    method: str
    exact: bool


def lanczos_ritz_values(matvec: Callable[[Tensor], Tensor], dim: int, num_iter: int = 30,
                        seed: int = 0, dtype: torch.dtype = torch.float64,
                        device: torch.device | str = "cpu") -> Tensor:
    """Ritz values of a symmetric p×p operator after ``num_iter`` Lanczos steps.

    With full reorthogonalisation. The largest Ritz value approaches λ_max from below quickly; the
    smallest approaches λ_min from above, more slowly.

    Args:
        matvec: maps ``(1, p)`` to ``(1, p)``.
        dim: p.

    Returns:
        ``(j,)`` Ritz values in ascending order, j ≤ ``num_iter``.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(dim, generator=generator, dtype=torch.float64).to(device)
    q = q / q.norm()
    basis = [q]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    for step in range(min(num_iter, dim)):
        w = matvec(basis[-1].to(dtype).unsqueeze(0))[0].to(torch.float64)
        alpha = torch.dot(w, basis[-1])
        alphas.append(alpha)
        Q = torch.stack(basis)
        w = w - Q.T @ (Q @ w)
        w = w - Q.T @ (Q @ w)
        beta = w.norm()
        if step == min(num_iter, dim) - 1 or beta <= 1e-12 * alpha.abs().clamp_min(1e-300):
            break
        betas.append(beta)
        basis.append(w / beta)
    T = torch.diag(torch.stack(alphas))
    if betas:
        off = torch.stack(betas[: len(alphas) - 1])
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(T.cpu())


def krylov_eigenpairs(matvec: Callable[[Tensor], Tensor], start: Tensor,
                      size: int, progress: bool = False) -> tuple[Tensor, Tensor]:
    """Ritz pairs of a symmetric operator from a block Krylov space with full reorthogonalisation.

    The space grows from the rows of ``start`` (b, p) by repeated products, each block
    orthogonalised (twice) against all earlier ones, up to ``size`` vectors; Rayleigh-Ritz on it,
    T = Q (A Q)ᵀ = S Θ Sᵀ, gives the Ritz values Θ and vectors Sᵀ Q.

    Args:
        matvec: maps ``(k, p)`` to ``(k, p)`` (rows are vectors).
        start: ``(b, p)`` starting block.
        size: the dimension m of the space (≤ p).
        progress: show a progress bar over the products.

    Returns:
        Ritz values ``(m,)`` in ascending order (float64, from T formed in the dtype of
        ``start``) and Ritz vectors ``(m, p)`` (rows, in the dtype of ``start``).
    """
    p = start.shape[1]
    Q = torch.empty(size, p, dtype=start.dtype, device=start.device)  # basis rows, filled in order
    AQ = torch.empty_like(Q)
    block = orthonormal_columns(start.T).T[:size]
    total = 0
    bar = tqdm(total=size, desc="Krylov vectors", leave=False, disable=not progress)
    while block.shape[0]:
        first, total = total, total + block.shape[0]
        Q[first:total] = block
        AQ[first:total] = matvec(block)
        bar.update(block.shape[0])
        if total >= size:
            break
        W, basis = AQ[first:total], Q[:total]
        for _ in range(2):  # twice is enough in float32 (Kahan: "twice is enough")
            W = W - (W @ basis.T) @ basis
        block = orthonormal_columns(W.T).T[: size - total]
    bar.close()
    Q, AQ = Q[:total], AQ[:total]
    T = (Q @ AQ.T).double()  # in the operator's precision, which bounds the Ritz pairs anyway
    theta, S = torch.linalg.eigh(0.5 * (T + T.T))
    return theta, S.T.to(Q.dtype) @ Q


def preconditioned_krylov_eigenpairs(product: Callable[[Tensor], Tensor],
                                     precondition: Callable[[Tensor], Tensor], start: Tensor,
                                     size: int, progress: bool = False
                                     ) -> tuple[Tensor, Tensor]:
    """Ritz pairs of B = M^½ A M^½ from one product with A and one application of M per vector,
    with no square root of M.

    The block Krylov space of B from U₀ = M^½ G₀ is carried by two bases of rows, Y = M^½ U and
    G = M^-½ U (so G = M⁻¹ Y): the inner product of B's space is uᵢᵀuⱼ = yᵢᵀgⱼ, and a step maps
    a block Y to A·Y (B U in G's coordinates) and M·A·Y (in Y's). Each new block is
    orthogonalised twice against all earlier ones in that inner product (in G's coordinates,
    before its one application of M) and normalised from its Gram matrix (twice, dropping
    directions the projection emptied); Rayleigh-Ritz on
    T = Y (A Y)ᵀ = U B Uᵀ = S Θ Sᵀ gives the Ritz values Θ and the Ritz vectors of B mapped by
    M^½, Z = Sᵀ Y, which is what a deflated preconditioner M + Z D Zᵀ needs. Against a Lanczos
    run on M^½ A M^½ itself this saves one of its two root applications per vector and the root
    applied to the Ritz vectors at the end.

    Args:
        product: v ↦ A·v on rows, ``(k, p)`` to ``(k, p)``.
        precondition: v ↦ M·v on rows, M symmetric positive definite.
        start: ``(b, p)`` starting block G₀ (U₀ = M^½ G₀).
        size: the dimension m of the space (≤ p).
        progress: show a progress bar over the products.

    Returns:
        Ritz values ``(m,)`` in ascending order (float64, from T formed in the dtype of
        ``start``) and ``Z = M^½ (Ritz vectors)`` ``(m, p)`` (rows, in the dtype of ``start``).
    """
    p = start.shape[1]
    Y = torch.empty(size, p, dtype=start.dtype, device=start.device)  # M^½ U, filled in order
    G = torch.empty_like(Y)  # M^-½ U
    AY = torch.empty_like(Y)  # A Y = M^-½ B U
    block_y, block_g = _normalised(precondition(start), start)
    block_y, block_g = _normalised(block_y, block_g)
    block_y, block_g = block_y[:size], block_g[:size]
    total = 0
    bar = tqdm(total=size, desc="Krylov vectors", leave=False, disable=not progress)
    while block_y.shape[0]:
        first, total = total, total + block_y.shape[0]
        Y[first:total], G[first:total] = block_y, block_g
        AY[first:total] = product(block_y)
        bar.update(block_y.shape[0])
        if total >= size:
            break
        W_g = AY[first:total]
        before = float(W_g.norm(dim=1).max())  # relative to which an emptied block is told
        for _ in range(2):  # twice is enough in float32 (Kahan: "twice is enough")
            W_g = W_g - (W_g @ Y[:total].T) @ G[:total]  # uᵢᵀ w = yᵢᵀ (M^-½ w) for each u
        W_y = precondition(W_g)
        W_y, W_g = _normalised(W_y, W_g, _squared_scale(W_y, W_g, before))
        block_y, block_g = _normalised(W_y, W_g)
        block_y, block_g = block_y[: size - total], block_g[: size - total]
    bar.close()
    Y, AY = Y[:total], AY[:total]
    T = (Y @ AY.T).double()
    theta, S = torch.linalg.eigh(0.5 * (T + T.T))
    return theta, S.T.to(Y.dtype) @ Y


def _squared_scale(W_y: Tensor, W_g: Tensor, before: float) -> float:
    """The squared norm ‖w‖² = (M^½w)ᵀ(M^-½w) a block's largest row had before its projection,
    from that row's ‖M^-½w‖ (``before``) and the block now: a row's ratio ‖w‖² / ‖M^-½w‖² is
    kept by a projection up to M's conditioning, so this is a scale, not an exact value."""
    now = (W_y * W_g).sum(1)
    ratio = float((now / W_g.pow(2).sum(1).clamp_min(1e-300)).max()) if now.numel() else 1.0
    return ratio * before**2


def _normalised(W_y: Tensor, W_g: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """The block W (rows, given as M^½W and M^-½W) made orthonormal: W ↦ C W with C K Cᵀ = I
    for its Gram matrix K = W_y W_gᵀ = W Wᵀ. Directions whose squared norm falls below 100 ε
    of ``scale`` (the largest squared norm before the projection that made W, so that a block
    the projection emptied is not blown up from its rounding; default: K's largest eigenvalue)
    are dropped as dependent. One pass loses some orthogonality to K's rounding, so callers
    normalise twice."""
    if not W_y.shape[0]:
        return W_y, W_g
    gram = (W_y @ W_g.T).double()
    values, vectors = torch.linalg.eigh(0.5 * (gram + gram.T))
    if scale is None:
        scale = float(values.abs().max())
    keep = values > 100 * torch.finfo(W_y.dtype).eps * max(scale, 1e-300)
    C = (vectors[:, keep] / values[keep].sqrt()).T.to(W_y.dtype)
    return C @ W_y, C @ W_g
