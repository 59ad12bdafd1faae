"""The orthonormalisations block CG uses: by the Gram matrix where the columns are well
conditioned, by rank-revealing QR where they are not."""

from __future__ import annotations

import pytest
import torch

from influencekit import linalg


def _spans(Q: torch.Tensor, Z: torch.Tensor, tol: float) -> bool:
    """Whether every column of Z lies in the column span of the orthonormal Q."""
    outside = Z - Q @ (Q.T @ Z)
    return bool(outside.norm() <= tol * Z.norm())


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_well_conditioned_columns_come_back_orthonormal_with_the_same_span(
        dtype: torch.dtype, tol: float) -> None:
    generator = torch.Generator().manual_seed(0)
    # columns of very different lengths, but far from dependent (cond of about 10)
    Z = (torch.randn(3000, 40, generator=generator, dtype=torch.float64)
         * torch.logspace(0, 1, 40, dtype=torch.float64)).to(dtype)
    Q = linalg.conditioned_columns(Z)
    assert Q.shape == Z.shape and Q.dtype == dtype
    torch.testing.assert_close(Q.T @ Q, torch.eye(40, dtype=dtype), atol=tol, rtol=0)
    assert _spans(Q.double(), Z.double(), 10 * tol)


def test_nearly_dependent_columns_are_orthonormalised_by_qr() -> None:
    generator = torch.Generator().manual_seed(1)
    Z = torch.randn(2000, 20, generator=generator)
    Z[:, 5] = Z[:, 3] + 1e-3 * Z[:, 5]  # cond far above what the float32 Gram path takes
    gram = torch.linalg.eigvalsh((Z.T @ Z).double())
    assert gram[0] < linalg.GRAM_CONDITION * torch.finfo(torch.float32).eps * gram[-1]
    Q = linalg.conditioned_columns(Z)
    assert Q.shape == (2000, 20)
    torch.testing.assert_close(Q.T @ Q, torch.eye(20), atol=1e-5, rtol=0)
    assert _spans(Q.double(), Z.double(), 1e-5)


def test_dependent_columns_are_dropped() -> None:
    generator = torch.Generator().manual_seed(2)
    Z = torch.randn(500, 6, generator=generator, dtype=torch.float64)
    Z[:, 4] = 2.0 * Z[:, 1] - Z[:, 0]
    Q = linalg.conditioned_columns(Z)
    assert Q.shape == (500, 5)
    torch.testing.assert_close(Q.T @ Q, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
    assert _spans(Q, Z, 1e-12)


def test_a_zero_block_and_an_empty_block() -> None:
    assert linalg.conditioned_columns(torch.zeros(100, 3)).shape == (100, 0)
    assert linalg.conditioned_columns(torch.zeros(100, 0)).shape == (100, 0)


def test_qr_orthonormalisation_keeps_the_span_of_the_columns_after_a_dropped_one() -> None:
    generator = torch.Generator().manual_seed(3)
    Z = torch.randn(400, 8, generator=generator, dtype=torch.float64)
    Z[:, 2] = Z[:, 0] - 3.0 * Z[:, 1]  # dependent: dropped; columns 3 to 7 must stay spanned
    Q = linalg.orthonormal_columns(Z)
    assert Q.shape == (400, 7)
    torch.testing.assert_close(Q.T @ Q, torch.eye(7, dtype=torch.float64), atol=1e-12, rtol=0)
    assert _spans(Q, Z, 1e-12)
