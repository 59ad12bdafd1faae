"""Data that ships with the dependencies (no downloads): scikit-learn's bundled sets, split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor


@dataclass
class Split:
    """A train/test split as tensors; ``name`` says which data it is (shown in outputs)."""

    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    name: str

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        return self.X_train, self.y_train

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        return self.X_test, self.y_test


def digits(test_size: float = 0.3, seed: int = 0, classes: tuple[int, ...] | None = None,
           dtype: torch.dtype = torch.float64) -> Split:
    """scikit-learn's 8×8 handwritten digits (1,797 images), pixels scaled to [0, 1].

    A stratified split (70/30 by default: 1,257 training and 540 test images for all ten
    classes). Inputs are flat ``(n, 64)``; labels ``(n,)`` int64. With ``classes`` (e.g. (1, 7)),
    only those digits are kept and relabelled 0, 1, ... in the order given.
    """
    bunch = load_digits()
    X = bunch.data.astype(np.float64) / 16.0
    y = bunch.target.astype(np.int64)
    name = "scikit-learn digits (8×8)"
    if classes is not None:
        keep = np.isin(y, classes)
        X, y = X[keep], np.searchsorted(np.array(classes), y[keep], sorter=np.argsort(classes))
        y = np.argsort(np.argsort(classes))[y] if list(classes) != sorted(classes) else y
        name += f", digits {' vs '.join(map(str, classes))}"
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_size, random_state=seed, stratify=y)
    return Split(torch.tensor(X_train, dtype=dtype), torch.tensor(y_train),
                 torch.tensor(X_test, dtype=dtype), torch.tensor(y_test), name)
