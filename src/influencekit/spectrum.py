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
