"""Index-stable access to tensors, NumPy arrays, Datasets and DataLoaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from influencekit.data import ExampleSet
from influencekit.errors import ShapeMismatchError


def _pairs(n: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(2 * n, dtype=torch.float32).reshape(n, 2), torch.arange(n)


def test_every_form_yields_the_examples_in_order() -> None:
    X, y = _pairs()
    forms = [(X, y), (X.numpy(), y.numpy()), TensorDataset(X, y),
             DataLoader(TensorDataset(X, y), batch_size=3, shuffle=True)]
    for form in forms:
        data = ExampleSet(form)
        assert len(data) == 11 and data.input_shape == (2,)
        rows = list(data.batches(4, dtype=torch.float64))
        assert [r.start for r, _, _ in rows] == [0, 4, 8]
        torch.testing.assert_close(torch.cat([b for _, b, _ in rows]), X.double())
        torch.testing.assert_close(torch.cat([t for _, _, t in rows]), y)


def test_take_and_without() -> None:
    X, y = _pairs()
    for form in [(X, y), TensorDataset(X, y)]:
        data = ExampleSet(form)
        Xs, ys = data.take([3, 0, 3])
        assert ys.tolist() == [3, 0, 3]
        torch.testing.assert_close(Xs[0], X[3])
        rest = data.without([0, 5])
        assert len(rest) == 9
        _, kept = rest.take(list(range(9)))
        assert kept.tolist() == [1, 2, 3, 4, 6, 7, 8, 9, 10]


def test_integer_inputs_keep_their_dtype() -> None:
    data = ExampleSet((np.arange(6).reshape(3, 2), np.zeros(3)))
    _, X, y = next(data.batches(8, dtype=torch.float64))
    assert X.dtype == torch.int64 and y.dtype == torch.float64


def test_boolean_masks_select_the_true_rows() -> None:
    X, y = _pairs(5)
    for form in [(X, y), TensorDataset(X, y)]:
        data = ExampleSet(form)
        mask = torch.tensor([False, False, True, False, True])
        assert data.take(mask)[1].tolist() == [2, 4]
        assert data.without(mask).take([0, 1, 2])[1].tolist() == [0, 1, 3]


def test_bad_indices_are_explained() -> None:
    data = ExampleSet(_pairs(5))
    with pytest.raises(ShapeMismatchError, match=r"one entry per example \(5\); got 3"):
        data.take(torch.tensor([True, False, True]))
    with pytest.raises(TypeError, match="integers or a boolean mask"):
        data.take(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="no indices given"):
        data.take([])
    assert data.take([-1])[1].tolist() == [4]


def test_a_dataloader_without_batching_is_batched_by_influencekit() -> None:
    X, y = _pairs(7)
    data = ExampleSet(DataLoader(TensorDataset(X, y), batch_size=None))
    torch.testing.assert_close(torch.cat([b for _, b, _ in data.batches(3)]), X)
