"""Examples in, index-stable batches out.

Training and test data may be given as a pair of tensors (or NumPy arrays) ``(X, y)``, a
``torch.utils.data.Dataset`` whose items are ``(input, target)`` pairs, or a ``DataLoader`` over
such a dataset. Whatever the form, example ``i`` is item ``i`` of the underlying data set (a
shuffling loader is read in order), so score columns line up with the user's own indexing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, Subset
from torch.utils.data.dataloader import default_collate

from . import arguments, distributed
from .errors import (
    EmptyDatasetError,
    IndexOutOfRangeError,
    InputTypeError,
    NonFiniteError,
    ShapeMismatchError,
)


def _as_tensor(array: Any, what: str) -> Tensor:
    if isinstance(array, Tensor):
        return array
    if isinstance(array, np.ndarray):
        try:
            return torch.from_numpy(np.ascontiguousarray(array))
        except TypeError as error:
            raise InputTypeError(f"{what}: a NumPy array of dtype {array.dtype} has no tensor "
                                 "equivalent; convert it to numbers first.") from error
    raise InputTypeError(
        f"{what} must be a torch.Tensor or numpy.ndarray, got {type(array).__name__}.")


class ExampleSet:
    """A fixed, ordered set of ``(input, target)`` examples.

    Args:
        data: ``(X, y)`` tensors/arrays with the same first dimension, a Dataset of pairs, or a
            DataLoader (its dataset, collate function and workers are used, read in order).
        name: what to call this set in error messages (``"training data"``, ``"test data"``).
    """

    def __init__(self, data: Any, name: str = "data") -> None:
        self.name = name
        self._tensors: tuple[Tensor, Tensor] | None = None
        self._dataset: Dataset | None = None
        self._collate = default_collate
        self._num_workers = 0
        self._cached_loader: tuple[int, DataLoader] | None = None
        if isinstance(data, ExampleSet):
            self.__dict__.update(data.__dict__)
            self.name = name
        elif isinstance(data, DataLoader):
            if not isinstance(data.sampler, SequentialSampler | RandomSampler):
                raise InputTypeError(
                    f"{name}: a DataLoader with sampler {type(data.sampler).__name__} selects "
                    "examples in a way influencekit cannot index. Pass a torch.utils.data.Subset "
                    "of the dataset instead (any shuffling is fine)."
                )
            self._dataset = data.dataset
            # batch_size=None loaders convert single items; influencekit batches them itself
            self._collate = data.collate_fn if data.batch_size is not None else default_collate
            self._num_workers = data.num_workers
        elif isinstance(data, Dataset):
            self._dataset = data
        elif isinstance(data, tuple | list) and len(data) == 2:
            X = _as_tensor(data[0], f"{name}: inputs")
            y = _as_tensor(data[1], f"{name}: targets")
            if X.ndim == 0 or y.ndim == 0 or X.shape[0] != y.shape[0]:
                raise ShapeMismatchError(
                    f"{name}: inputs and targets must have the same number of examples (first "
                    f"dimension); got inputs {tuple(X.shape)} and targets {tuple(y.shape)}."
                )
            self._tensors = (X, y)
        else:
            raise InputTypeError(
                f"{name} must be a pair (X, y) of tensors, a Dataset of (input, target) pairs or a "
                f"DataLoader; got {type(data).__name__}."
            )
        if len(self) == 0:
            raise EmptyDatasetError(f"{name} has no examples; at least one is needed.")
        if self._dataset is not None:
            first = self._dataset[0]
            if not (isinstance(first, tuple | list) and len(first) == 2):
                raise InputTypeError(
                    f"{name}: each item of the dataset must be an (input, target) pair; item 0 is "
                    f"a {type(first).__name__}."
                )

    @property
    def tensors(self) -> tuple[Tensor, Tensor] | None:
        """The ``(X, y)`` tensors when the data was given as tensors, else ``None``."""
        return self._tensors

    def __len__(self) -> int:
        if self._tensors is not None:
            return int(self._tensors[0].shape[0])
        return len(self._dataset)  # type: ignore[arg-type]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        if self._tensors is not None:
            return tuple(self._tensors[0].shape[1:])
        return tuple(torch.as_tensor(self._dataset[0][0]).shape)  # type: ignore[index]

    def describe(self) -> str:
        """``"n examples, inputs (n, ...), targets (n, ...)"`` for error messages."""
        n = len(self)
        if self._tensors is not None:
            X, y = self._tensors
            return f"{n} examples: inputs {tuple(X.shape)}, targets {tuple(y.shape)}"
        x, t = self._dataset[0]  # type: ignore[index]
        return (f"{n} examples: inputs ({n}, {', '.join(map(str, torch.as_tensor(x).shape))}), "
                f"targets ({', '.join(map(str, (n, *torch.as_tensor(t).shape)))})")

    def content_digest(self, chunk_size: int = 1024) -> str:
        """SHA-256 over every example's input and target (shape, dtype and bytes), in order.

        Streams the data in chunks for a Dataset or DataLoader, so nothing beyond a chunk is
        held. Two sets with the same examples in the same order get the same digest.
        """
        hasher = hashlib.sha256()
        hasher.update(str(len(self)).encode())
        for _, X, y in self.batches(chunk_size):
            for part in (X, y):
                hasher.update(f"{tuple(part.shape[1:])}{part.dtype}".encode())
                hasher.update(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                              .numpy().tobytes())
        return hasher.hexdigest()

    def take(self, indices: Tensor | list[int], device: torch.device | None = None,
             dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """The examples at ``indices`` as a batch ``(X, y)`` with X ``(k, *input_shape)``."""
        idx = self._indices(indices)
        if not idx.numel():
            raise EmptyDatasetError(
                f"{self.name}: no indices given; pass at least one example index.")
        if self._tensors is not None:
            X, y = self._tensors
            cpu_idx = idx.to(X.device)
            batch = (X[cpu_idx], y[cpu_idx.to(y.device)])
        else:
            batch = self._collate([self._dataset[int(i)] for i in idx])  # type: ignore[index]
        return _convert(batch, device, dtype, self.name)

    def _indices(self, indices: Tensor | list[int]) -> Tensor:
        """Integer indices in [0, n) on the CPU, from integers (negative ones count from the
        end) or from a boolean mask of length n."""
        n = len(self)
        try:
            idx = torch.as_tensor(indices).reshape(-1).cpu()
        except (TypeError, ValueError, RuntimeError) as error:
            raise InputTypeError(f"{self.name}: indices must be integers or a boolean mask, got "
                                 f"{type(indices).__name__} ({error}).") from error
        if not idx.numel():
            return idx.long()
        if idx.dtype == torch.bool:
            if idx.numel() != n:
                raise ShapeMismatchError(
                    f"{self.name}: a boolean mask must have one entry per example ({n}); got "
                    f"{idx.numel()}.")
            return torch.nonzero(idx).flatten()
        if idx.is_floating_point() or idx.is_complex():
            raise InputTypeError(f"{self.name}: indices must be integers or a boolean mask, "
                                 f"got dtype {idx.dtype}.")
        idx = idx.long()
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexOutOfRangeError(
                f"{self.name}: indices must lie in [0, {n}) (or [-{n}, 0), counted from the end); "
                f"got values from {int(idx.min())} to {int(idx.max())}."
            )
        return idx % n

    def without(self, indices: Tensor | list[int]) -> ExampleSet:
        """The same examples minus those at ``indices`` (order kept), e.g. for leave-one-out."""
        n = len(self)
        keep = torch.ones(n, dtype=torch.bool)
        keep[self._indices(indices)] = False
        if self._tensors is not None:
            X, y = self._tensors
            return ExampleSet((X[keep.to(X.device)], y[keep.to(y.device)]), self.name)
        subset = ExampleSet(Subset(self._dataset, torch.nonzero(keep).flatten().tolist()),  # type: ignore[arg-type]
                            self.name)
        subset._collate, subset._num_workers = self._collate, self._num_workers
        subset._cached_loader = None
        return subset

    def _loader(self, chunk_size: int) -> DataLoader:
        """An in-order loader, kept so that its worker processes persist across passes."""
        if self._cached_loader is None or self._cached_loader[0] != chunk_size:
            loader = DataLoader(self._dataset, batch_size=chunk_size, shuffle=False,  # type: ignore[arg-type]
                                collate_fn=self._collate, num_workers=self._num_workers,
                                persistent_workers=self._num_workers > 0)
            self._cached_loader = (chunk_size, loader)
        return self._cached_loader[1]

    def batches(self, chunk_size: int, device: torch.device | None = None,
                dtype: torch.dtype | None = None,
                rows: slice | None = None) -> Iterator[tuple[slice, Tensor, Tensor]]:
        """Consecutive batches ``(rows, X, y)`` covering the examples in order (only those in
        ``rows``, a ``slice(start, stop)`` of example indices, if given).

        ``rows`` of each batch is the slice of example indices it holds.
        """
        arguments.positive_integer("chunk_size", chunk_size)
        n = len(self)
        first, last = (0, n) if rows is None else (rows.start or 0, min(rows.stop, n))
        if self._tensors is not None:
            X, y = self._tensors
            for start in range(first, last, chunk_size):
                stop = min(start + chunk_size, last)
                yield slice(start, stop), *_convert((X[start:stop], y[start:stop]), device,
                                                    dtype, self.name)
            return
        if rows is None:
            loader = self._loader(chunk_size)
        else:
            loader = DataLoader(Subset(self._dataset, range(first, last)),  # type: ignore[arg-type]
                                batch_size=chunk_size, shuffle=False, collate_fn=self._collate,
                                num_workers=self._num_workers)
        start = first
        for batch in loader:
            X, y = _convert(batch, device, dtype, self.name)
            stop = start + X.shape[0]
            yield slice(start, stop), X, y
            start = stop

    def local_rows(self, chunk_size: int) -> slice:
        """The rows this process visits in a pass (all of them without torch.distributed)."""
        return distributed.local_rows(len(self), chunk_size)

    def local_batches(self, chunk_size: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> Iterator[tuple[slice, Tensor, Tensor]]:
        """:meth:`batches` over this process's rows (:mod:`influencekit.distributed`)."""
        return self.batches(chunk_size, device, dtype, self.local_rows(chunk_size))


def _convert(batch: Any, device: torch.device | None, dtype: torch.dtype | None,
             name: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise InputTypeError(
            f"{name}: a batch must be an (inputs, targets) pair, got {type(batch).__name__}.")
    X = _as_tensor(batch[0], f"{name}: inputs")
    y = _as_tensor(batch[1], f"{name}: targets")
    if dtype is not None:
        if X.is_floating_point():
            X = X.to(dtype)
        if y.is_floating_point():
            y = y.to(dtype)
    if device is not None:
        X, y = X.to(device), y.to(device)
    return X, y


def raise_if_flagged(bad: Tensor, rows: slice, message: str) -> None:
    """Raise :class:`NonFiniteError` if any row of the batch ``rows`` is flagged in ``bad``.

    ``message`` is formatted with ``where``, the dataset indices of the first flagged rows.
    """
    if bool(bad.any()):
        indices = (torch.nonzero(bad).flatten() + rows.start).tolist()
        where = f"{indices[:10]}{' ...' if len(indices) > 10 else ''}"
        raise NonFiniteError(message.format(where=where))


def check_finite(X: Tensor, y: Tensor, rows: slice, name: str) -> None:
    """Raise :class:`NonFiniteError` naming the first examples whose input or target is NaN/inf."""
    bad = torch.zeros(X.shape[0], dtype=torch.bool, device=X.device)
    for part in (X, y):
        if part.is_floating_point() or part.is_complex():
            bad |= ~torch.isfinite(part.reshape(part.shape[0], -1)).all(dim=1)
    raise_if_flagged(bad, rows, f"{name} contains NaN or infinite values at example(s) {{where}}. "
                                "Remove or impute them before computing influence.")


def check_compatible(reference_shape: tuple[int, ...], data: ExampleSet) -> None:
    """Raise :class:`ShapeMismatchError` if ``data``'s inputs differ in shape from the reference."""
    shape = data.input_shape
    if shape != reference_shape:
        raise ShapeMismatchError(
            f"{data.name} has inputs of shape {shape} per example, but the training inputs have "
            f"shape {reference_shape}. Pass inputs shaped like the training inputs."
        )
