"""Examples in, index-stable batches out.

Training and test data may be given as

- a pair ``(X, y)`` of tensors or NumPy arrays (X may also be a dict or tuple of tensors,
  see :mod:`influencekit.inputs`);
- a ``torch.utils.data.Dataset`` (map-style) whose items are ``(input, target)`` pairs, or a
  ``DataLoader`` over one (its collate function and workers are used, read in order);
- an ``IterableDataset``, or a DataLoader over one, of unknown length: a stream that need not fit
  in memory. It is read in order, one pass per need, in the loader's own batches; its length is
  counted on the first pass. It must give the same examples in the same order on every pass.

A dict with ``input_ids`` (a tokenizer's output for the whole set, or the items or batches of a
Dataset or DataLoader) needs no ``batch_fn``: :func:`influencekit.huggingface.causal_lm_batch`
makes the targets (``labels``, or the input ids with padding ignored).
With ``batch_fn`` any batch (or item) is turned into ``(inputs, targets)`` by that function, e.g.
``lambda batch: ({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
batch["labels"])`` for Hugging Face style dict batches, whose collate function may pad sequences
of different lengths. Whatever the form, example ``i`` is the i-th example of the data, so score
columns line up with the user's own indexing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)
from torch.utils.data.dataloader import default_collate

from . import arguments, distributed
from .errors import (
    EmptyDatasetError,
    IndexOutOfRangeError,
    InputTypeError,
    NonFiniteError,
    ShapeMismatchError,
)
from .huggingface import LANGUAGE_MODEL_KEYS, causal_lm_batch, is_language_model_batch
from .inputs import Inputs, as_inputs, as_tensor, batch_size, convert, leaves, rows_of, signature

BatchFn = Callable[[Any], tuple[Any, Any]]


class ExampleSet:
    """A fixed, ordered set of ``(input, target)`` examples (see the module docstring).

    Args:
        data: ``(X, y)``, a Dataset, an IterableDataset or a DataLoader over either.
        name: what to call this set in error messages (``"training data"``, ``"test data"``).
        batch_fn: turns a batch (or an item) of the data into ``(inputs, targets)``.
    """

    def __init__(self, data: Any, name: str = "data", batch_fn: BatchFn | None = None) -> None:
        self.name = name
        self.batch_fn = batch_fn
        if batch_fn is not None and not callable(batch_fn):
            raise InputTypeError(f"{name}: batch_fn must be a function batch -> (inputs, "
                                 f"targets), got {type(batch_fn).__name__}.")
        self._tensors: tuple[Inputs, Tensor] | None = None
        self._dataset: Dataset | None = None
        self._stream: Any = None  # an iterable of batches (a DataLoader or IterableDataset)
        self._stream_batched = True
        self._keep: Tensor | None = None  # rows of the stream kept by without()
        self._length: int | None = None
        self._collate = default_collate
        self._num_workers = 0
        self._cached_loader: tuple[int, DataLoader] | None = None
        if batch_fn is None and is_language_model_batch(data):
            data = causal_lm_batch(data)  # tokenizer output for the whole set: (n, T) tensors
        if isinstance(data, ExampleSet):
            self.__dict__.update(data.__dict__)
            self.name = name
        elif isinstance(data, DataLoader) and isinstance(data.dataset, IterableDataset):
            self._stream, self._stream_batched = data, data.batch_size is not None
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
        elif isinstance(data, IterableDataset):
            self._stream = DataLoader(data, batch_size=256, collate_fn=default_collate)
        elif isinstance(data, Dataset):
            self._dataset = data
        elif isinstance(data, tuple | list) and len(data) == 2:
            X = as_inputs(data[0], f"{name}: inputs")
            y = as_tensor(data[1], f"{name}: targets")
            n = y.shape[0] if y.ndim else -1
            if y.ndim == 0 or any(t.ndim == 0 or t.shape[0] != n for t in leaves(X)):
                raise ShapeMismatchError(
                    f"{name}: inputs and targets must have the same number of examples (first "
                    f"dimension); got inputs {[tuple(t.shape) for t in leaves(X)]} and targets "
                    f"{tuple(y.shape)}."
                )
            self._tensors = (X, y)
        else:
            hint = ""
            if isinstance(data, dict):
                hint = (f" A dict is taken as a tokenizer's output (targets made by "
                        f"influencekit.huggingface.causal_lm_batch) only when it has input_ids "
                        f"and no keys but {sorted(LANGUAGE_MODEL_KEYS)}; this one has "
                        f"{sorted(data)}. Pass (inputs, targets) instead, or a Dataset with "
                        "batch_fn=... mapping a batch to (inputs, targets).")
            raise InputTypeError(
                f"{name} must be a pair (X, y) of tensors, a Dataset of (input, target) pairs, an "
                f"IterableDataset or a DataLoader; got {type(data).__name__}.{hint}"
            )
        if len(self) == 0:
            raise EmptyDatasetError(f"{name} has no examples; at least one is needed.")
        if self._dataset is not None and batch_fn is None:
            first = self._dataset[0]
            if not ((isinstance(first, tuple | list) and len(first) == 2)
                    or is_language_model_batch(first)):
                raise InputTypeError(
                    f"{name}: each item of the dataset must be an (input, target) pair; item 0 is "
                    f"a {type(first).__name__}. For dict items pass batch_fn=..., a function "
                    "from a batch to (inputs, targets)."
                )

    # ------------------------------------------------------------------ what it holds

    @property
    def tensors(self) -> tuple[Inputs, Tensor] | None:
        """The ``(X, y)`` tensors when the data was given as tensors, else ``None``."""
        return self._tensors

    @property
    def streamed(self) -> bool:
        """Whether the data is a stream (an IterableDataset): no random access."""
        return self._stream is not None

    def __len__(self) -> int:
        if self._tensors is not None:
            return int(self._tensors[1].shape[0])
        if self._dataset is not None:
            return len(self._dataset)  # type: ignore[arg-type]
        if self._length is None:  # a stream: counted once, on the first pass
            self._length = sum(batch_size(X) for _, X, _ in self._stream_batches())
        return self._length

    def _first(self) -> tuple[Inputs, Tensor]:
        """The first example as a batch of one."""
        if self._tensors is not None:
            X, y = self._tensors
            return rows_of(X, slice(0, 1)), y[:1]
        return self.take([0])

    @property
    def input_shape(self) -> tuple:
        """What must agree between training and test inputs: the shape of one input without
        the batch dimension (dict or tuple inputs: :func:`influencekit.inputs.signature`)."""
        return signature(self._first()[0])

    def describe(self) -> str:
        """``"n examples: inputs ..., targets ..."`` for error messages."""
        n = len(self)
        X, y = self._first()
        shapes = [(n, *t.shape[1:]) for t in leaves(X)]
        shown = shapes[0] if len(shapes) == 1 else shapes
        return f"{n} examples: inputs {shown}, targets {(n, *y.shape[1:])}"

    def content_digest(self, chunk_size: int = 1024) -> str:
        """SHA-256 over every example's inputs and target (shape, dtype and bytes), in order.

        Streams the data in chunks for a Dataset or a stream, so nothing beyond a chunk is held.
        Two sets with the same examples in the same order get the same digest.
        """
        hasher = hashlib.sha256()
        hasher.update(str(len(self)).encode())
        for _, X, y in self.batches(chunk_size):
            for part in [*leaves(X), y]:
                hasher.update(f"{tuple(part.shape[1:])}{part.dtype}".encode())
                hasher.update(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                              .numpy().tobytes())
        return hasher.hexdigest()

    # ------------------------------------------------------------------ access

    def take(self, indices: Tensor | list[int], device: torch.device | None = None,
             dtype: torch.dtype | None = None) -> tuple[Inputs, Tensor]:
        """The examples at ``indices`` as a batch ``(X, y)``, in the order given.

        Vectorised: tensors and a ``TensorDataset`` are indexed directly, a Dataset with
        ``__getitems__`` is asked for all items at once (only other Datasets are read item by
        item); a stream's items are read once up to the largest index and collated by its
        loader's collate function.
        """
        idx = self._indices(indices)
        if not idx.numel():
            raise EmptyDatasetError(
                f"{self.name}: no indices given; pass at least one example index.")
        if self._tensors is not None:
            X, y = self._tensors
            return self._converted(rows_of(X, idx), y[idx.to(y.device)], device, dtype)
        if self._dataset is not None:
            dataset, positions = self._dataset, idx.tolist()
            if isinstance(dataset, TensorDataset):
                batch = tuple(t[idx] for t in dataset.tensors)
            elif hasattr(dataset, "__getitems__"):
                batch = self._collate(dataset.__getitems__(positions))
            else:
                batch = self._collate([dataset[i] for i in positions])
            return self._convert(batch, device, dtype)
        return self._take_from_stream(idx, device, dtype)

    def _take_from_stream(self, idx: Tensor, device: torch.device | None,
                          dtype: torch.dtype | None) -> tuple[Inputs, Tensor]:
        """One read of the stream's items up to the largest index; the chosen items are put
        together by the loader's own collate function (so padding is the user's)."""
        base = idx if self._keep is None else torch.nonzero(self._keep).flatten()[idx]
        stream = self._stream
        dataset = stream.dataset if isinstance(stream, DataLoader) else stream
        collate = (stream.collate_fn if isinstance(stream, DataLoader)
                   and stream.batch_size is not None else default_collate)
        wanted: dict[int, Any] = dict.fromkeys(base.tolist())
        last = max(wanted)
        for position, item in enumerate(dataset):
            if position in wanted:
                wanted[position] = item
            if position >= last:
                break
        return self._convert(collate([wanted[i] for i in base.tolist()]), device, dtype)

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
            reduced = ExampleSet((rows_of(X, keep), y[keep.to(y.device)]), self.name,
                                 self.batch_fn)
            return reduced
        if self._dataset is not None:
            subset = ExampleSet(Subset(self._dataset, torch.nonzero(keep).flatten().tolist()),  # type: ignore[arg-type]
                                self.name, self.batch_fn)
            subset._collate, subset._num_workers = self._collate, self._num_workers
            subset._cached_loader = None
            return subset
        view = ExampleSet(self, self.name)  # a filtered view of the same stream
        view._keep = keep if self._keep is None else _compose(self._keep, keep)
        view._length = int(keep.sum())
        return view

    def _loader(self, chunk_size: int) -> DataLoader:
        """An in-order loader, kept so that its worker processes persist across passes."""
        if self._cached_loader is None or self._cached_loader[0] != chunk_size:
            loader = DataLoader(self._dataset, batch_size=chunk_size, shuffle=False,  # type: ignore[arg-type]
                                collate_fn=self._collate, num_workers=self._num_workers,
                                persistent_workers=self._num_workers > 0)
            self._cached_loader = (chunk_size, loader)
        return self._cached_loader[1]

    def _stream_batches(self) -> Iterator[tuple[slice, Inputs, Tensor]]:
        """The stream's own batches, converted, with their row ranges (after ``without``)."""
        start, kept_start = 0, 0
        for batch in self._stream:
            if not self._stream_batched:
                batch = default_collate([batch])
            X, y = self._convert(batch, None, None)
            size = batch_size(X)
            if self._keep is not None:
                mask = self._keep[start : start + size]
                start += size
                if not bool(mask.any()):
                    continue
                X, y = rows_of(X, mask), y[mask.to(y.device)]
                size = batch_size(X)
            else:
                start += size
            yield slice(kept_start, kept_start + size), X, y
            kept_start += size

    def batches(self, chunk_size: int, device: torch.device | None = None,
                dtype: torch.dtype | None = None,
                rows: slice | None = None) -> Iterator[tuple[slice, Inputs, Tensor]]:
        """Consecutive batches ``(rows, X, y)`` covering the examples in order (only those in
        ``rows``, a ``slice(start, stop)`` of example indices, if given).

        ``rows`` of each batch is the slice of example indices it holds. A stream comes in its
        own batches (trimmed to ``rows``), not in chunks of ``chunk_size``.
        """
        arguments.positive_integer("chunk_size", chunk_size)
        n = len(self)
        first, last = (0, n) if rows is None else (rows.start or 0, min(rows.stop, n))
        if self._tensors is not None:
            X, y = self._tensors
            for start in range(first, last, chunk_size):
                stop = min(start + chunk_size, last)
                yield (slice(start, stop),
                       *self._converted(rows_of(X, slice(start, stop)), y[start:stop], device,
                                        dtype))
            return
        if self._stream is not None:
            for part, X, y in self._stream_batches():
                lo, hi = max(part.start, first), min(part.stop, last)
                if lo < hi:
                    inside = slice(lo - part.start, hi - part.start)
                    yield slice(lo, hi), *self._converted(rows_of(X, inside), y[inside],
                                                          device, dtype)
                if part.stop >= last:
                    break
            return
        if rows is None:
            loader = self._loader(chunk_size)
        else:
            loader = DataLoader(Subset(self._dataset, range(first, last)),  # type: ignore[arg-type]
                                batch_size=chunk_size, shuffle=False, collate_fn=self._collate,
                                num_workers=self._num_workers)
        start = first
        for batch in loader:
            X, y = self._convert(batch, device, dtype)
            stop = start + batch_size(X)
            yield slice(start, stop), X, y
            start = stop

    def local_rows(self, chunk_size: int) -> slice:
        """The rows this process visits in a pass (all of them without torch.distributed)."""
        return distributed.local_rows(len(self), chunk_size)

    def local_batches(self, chunk_size: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None
                      ) -> Iterator[tuple[slice, Inputs, Tensor]]:
        """:meth:`batches` over this process's rows (:mod:`influencekit.distributed`)."""
        return self.batches(chunk_size, device, dtype, self.local_rows(chunk_size))

    # ------------------------------------------------------------------ conversion

    def _convert(self, batch: Any, device: torch.device | None,
                 dtype: torch.dtype | None) -> tuple[Inputs, Tensor]:
        """A raw batch as (inputs, targets), through ``batch_fn`` if there is one."""
        if self.batch_fn is not None:
            batch = self.batch_fn(batch)
        elif is_language_model_batch(batch):
            batch = causal_lm_batch(batch)
        if not (isinstance(batch, tuple | list) and len(batch) == 2):
            raise InputTypeError(
                f"{self.name}: a batch must be an (inputs, targets) pair, got "
                f"{type(batch).__name__}. For dict batches pass batch_fn=..., a function from a "
                "batch to (inputs, targets).")
        X = as_inputs(batch[0], f"{self.name}: inputs")
        y = as_tensor(batch[1], f"{self.name}: targets")
        return self._converted(X, y, device, dtype)

    @staticmethod
    def _converted(X: Inputs, y: Tensor, device: torch.device | None,
                   dtype: torch.dtype | None) -> tuple[Inputs, Tensor]:
        if dtype is not None and y.is_floating_point():
            y = y.to(dtype)
        return convert(X, device, dtype), (y.to(device) if device is not None else y)


def _compose(outer: Tensor, inner: Tensor) -> Tensor:
    """A mask over the base rows from ``outer`` (over the base) then ``inner`` (over the kept)."""
    combined = outer.clone()
    combined[torch.nonzero(outer).flatten()] = inner
    return combined


def raise_if_flagged(bad: Tensor, rows: slice, message: str) -> None:
    """Raise :class:`NonFiniteError` if any row of the batch ``rows`` is flagged in ``bad``.

    ``message`` is formatted with ``where``, the dataset indices of the first flagged rows.
    """
    if bool(bad.any()):
        indices = (torch.nonzero(bad).flatten() + rows.start).tolist()
        where = f"{indices[:10]}{' ...' if len(indices) > 10 else ''}"
        raise NonFiniteError(message.format(where=where))


def check_finite(X: Inputs, y: Tensor, rows: slice, name: str) -> None:
    """Raise :class:`NonFiniteError` naming the first examples whose input or target is NaN/inf."""
    bad = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    for part in [*leaves(X), y]:
        if part.is_floating_point() or part.is_complex():
            bad |= ~torch.isfinite(part.reshape(part.shape[0], -1)).all(dim=1).to(bad.device)
    raise_if_flagged(bad, rows, f"{name} contains NaN or infinite values at example(s) {{where}}. "
                                "Remove or impute them before computing influence.")


def check_compatible(reference_shape: tuple, data: ExampleSet) -> None:
    """Raise :class:`ShapeMismatchError` if ``data``'s inputs differ in shape from the reference."""
    shape = data.input_shape
    if shape != reference_shape:
        raise ShapeMismatchError(
            f"{data.name} has inputs of shape {shape} per example, but the training inputs have "
            f"shape {reference_shape}. Pass inputs shaped like the training inputs."
        )
