"""Image data: scikit-learn's bundled digits, and MNIST from its IDX files (never downloaded)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

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


def _select_classes(X: np.ndarray, y: np.ndarray,
                    classes: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """Keep only ``classes`` and relabel them 0, 1, ... in the order given."""
    if classes is None:
        return X, y
    keep = np.isin(y, classes)
    lookup = {c: i for i, c in enumerate(classes)}
    return X[keep], np.array([lookup[int(v)] for v in y[keep]], dtype=np.int64)


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
    X, y = _select_classes(X, y, classes)
    if classes is not None:
        name += f", digits {' vs '.join(map(str, classes))}"
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_size, random_state=seed, stratify=y)
    return Split(torch.tensor(X_train, dtype=dtype), torch.tensor(y_train),
                 torch.tensor(X_test, dtype=dtype), torch.tensor(y_test), name)


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; ``.gz`` is decompressed) into an array.

    Layout: two zero bytes, a type byte, a byte with the number of dimensions d, d big-endian
    uint32 sizes, then the values.
    """
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(
            f"{path} is not an IDX file: expected the magic bytes 00 00 <type> <dims> (e.g. "
            f"00 00 08 03 for MNIST images), got {raw[:4].hex(' ') if raw else 'an empty file'}."
        )
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    offset = 4 + 4 * dims
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: the header promises shape {shape} ({expected} bytes of data) "
                         f"but the file holds {len(raw) - offset} bytes; it may be truncated.")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{folder} has no {stem} or {stem}.gz. Expected the four MNIST files "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (optionally gzipped)."
    )


def mnist(folder: str | Path, classes: tuple[int, ...] | None = None,
          dtype: torch.dtype = torch.float64, max_train: int | None = None) -> Split:
    """MNIST from its original IDX files in ``folder`` (never downloaded), pixels in [0, 1].

    Inputs are flat ``(n, 784)``; the official train/test split is kept. ``classes`` keeps and
    relabels digits as in :func:`digits`; ``max_train`` keeps the first training images.
    """
    folder = Path(folder)
    parts = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{folder}: {prefix} images {images.shape} and labels "
                             f"{labels.shape} do not form an (n, rows, cols) / (n,) pair.")
        X = images.reshape(images.shape[0], -1).astype(np.float64) / 255.0
        parts.append(_select_classes(X, labels.astype(np.int64), classes))
    (X_train, y_train), (X_test, y_test) = parts
    if max_train is not None:
        X_train, y_train = X_train[:max_train], y_train[:max_train]
    side = round(X_train.shape[1] ** 0.5)
    name = f"MNIST from {folder} ({side}×{side})"
    if classes is not None:
        name += f", digits {' vs '.join(map(str, classes))}"
    return Split(torch.tensor(X_train, dtype=dtype), torch.tensor(y_train),
                 torch.tensor(X_test, dtype=dtype), torch.tensor(y_test), name)
