"""Small dense linear-algebra helpers shared by the solvers and the spectrum estimates."""

from __future__ import annotations

import torch
from torch import Tensor


def orthonormal_columns(Z: Tensor, relative_floor: float | None = None) -> Tensor:
    """An orthonormal basis of the columns of Z (p, k), dropping numerically dependent ones.

    A thin QR in Z's own precision; a column whose |R_jj| falls below ``relative_floor`` × the
    largest (default 1e-10 in float64, 1e-5 in lower precisions) adds nothing new and is dropped.
    Returns ``(p, r)`` with r ≤ k.
    """
    if Z.shape[1] == 0:
        return Z
    if relative_floor is None:
        relative_floor = 1e-10 if Z.dtype == torch.float64 else 1e-5
    Q, R = torch.linalg.qr(Z)
    diagonal = R.diagonal().abs()
    keep = diagonal > relative_floor * diagonal.max().clamp_min(torch.finfo(Z.dtype).tiny)
    return Q if bool(keep.all()) else Q[:, keep]  # a column gather copies the whole block


#: elements checked at once by :func:`finite_rows` (torch.isfinite makes float temporaries)
FINITE_CHECK_ELEMENTS = 2**24


def finite_rows(X: Tensor) -> Tensor:
    """Whether each row of X (k, p) is free of NaN and inf, as a (k,) bool tensor, checked a
    block of rows at a time so that the temporaries stay small for large p."""
    rows = max(1, FINITE_CHECK_ELEMENTS // max(1, X[0].numel() if X.shape[0] else 1))
    return torch.cat([torch.isfinite(X[j:j + rows]).flatten(1).all(dim=1)
                      for j in range(0, X.shape[0], rows)]) if X.shape[0] else \
        torch.ones(0, dtype=torch.bool, device=X.device)
