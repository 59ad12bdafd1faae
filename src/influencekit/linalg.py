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
