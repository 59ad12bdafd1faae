"""A training-gradient store: per-example training gradients on disk, optionally projected.

``Influence.index(folder, projection=None)`` writes ∇_θ L(z_i) (regulariser included) for every
training point, ``shard_size`` rows per shard (:mod:`influencekit.store.shards`: .npy shards
with commit records, resumed after a kill). With a projection
(:mod:`influencekit.projection`) each row is Pg_i instead, k numbers:

- ``RandomProjection(dim=k)``: the full per-example gradients of a chunk are formed, then
  projected;
- ``KroneckerProjection(input_dim, output_dim, rest_dim)``: for Linear and Conv2d layers the
  projected gradient Σ_t (P_out s_t)(P_in a_t)ᵀ is formed from the layer's inputs and output
  gradients, never the full gradient; other parameters are differentiated alone and projected
  by a ``RandomProjection`` of ``rest_dim``.

The distortion a projection introduces is measured on the store's first rows (up to 64, and up to
one chunk) against their full gradients and kept in ``distortion.json``. A shard holds at most
16 chunks and 256 MiB by default. A store depends only on the model, the
objective and the training data (its manifest holds their fingerprint), so it serves any
solver: ``Influence.score(test, out, gradients=store)`` then costs one solve and one streamed
pass over the store, scoring the projected query Ps against each Pg_i.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import arguments, cache, distributed
from ..errors import CacheMismatchError, InputTypeError
from ..layers import find_blocks, layer_signals, weight_matrix
from ..memory import SHARD_BYTES
from ..parameters import evaluation_mode
from ..projection import KroneckerProjection, RandomProjection, measure_distortion
from ..version import __version__
from .shards import ShardFolder

if TYPE_CHECKING:
    from ..influence import Influence

FORMAT = "influencekit-gradient-store"
VERSION = 1
DISTORTION_SAMPLE = 64
Projection = RandomProjection | KroneckerProjection


class Projector:
    """Training rows and queries in a store's coordinates: the full ones, Pg, or LoGra's."""

    def __init__(self, influence: Influence, projection: Projection | None) -> None:
        if projection is not None and not isinstance(projection, Projection):
            raise InputTypeError(
                f"projection must be None, ik.RandomProjection(dim=k) or "
                f"ik.KroneckerProjection(...), got {type(projection).__name__}.")
        self.influence, self.projection = influence, projection
        tracked = influence.tracked_
        p = tracked.dim
        if isinstance(projection, KroneckerProjection):
            self.blocks, self.rest = find_blocks(tracked)
            dtype, device = tracked.dtype, tracked.device
            self.factors = [projection.factors(i, b.out_features, b.in_features, dtype, device)
                            for i, b in enumerate(self.blocks)]
            self.rest_names = [n for n in tracked.names
                               if not any(n in (f"{b.name}.weight" if b.name else "weight",
                                                f"{b.name}.bias" if b.name else "bias")
                                          for b in self.blocks)]
            self.dim = sum(P_out.shape[0] * P_in.shape[0] for P_out, P_in in self.factors) + \
                projection.rest().output_dim(int(self.rest.numel()))
        elif isinstance(projection, RandomProjection):
            self.dim = projection.output_dim(p)
        else:
            self.dim = p

    def settings(self) -> dict[str, Any] | None:
        return None if self.projection is None else self.projection.settings()

    def queries(self, S: Tensor) -> Tensor:
        """Ps for each row s of S (m, p)."""
        if self.projection is None:
            return S
        if isinstance(self.projection, RandomProjection):
            return self.projection.project(S)
        parts = [(P_out @ weight_matrix(block, S) @ P_in.T).flatten(1)
                 for block, (P_out, P_in) in zip(self.blocks, self.factors, strict=True)]
        parts.append(self.projection.rest().project(S[:, self.rest]))
        return torch.cat(parts, dim=1)

    def rows(self, X: Tensor, y: Tensor) -> Tensor:
        """Pg_i (b, k) for a batch of training examples, regulariser included."""
        influence = self.influence
        gradients, theta = influence.gradients_, influence.theta_
        if not isinstance(self.projection, KroneckerProjection):
            full = gradients.train(theta, X, y)
            return full if self.projection is None else self.projection.project(full)
        def summed_loss(outputs: Tensor) -> tuple[Tensor, None]:
            return gradients.objective.train_loss(outputs, y).sum(), None

        signals = layer_signals(gradients.tracked, theta, X, self.blocks, summed_loss)[1]
        decay_theta = (gradients.decay * theta)[None, :]
        parts = []
        for block, (a, s), (P_out, P_in) in zip(self.blocks, signals, self.factors,
                                                 strict=True):
            a_p = a @ P_in.T  # (b, T, k_in)
            s_p = s[0] @ P_out.T  # (b, T, k_out)
            projected = torch.einsum("bto,bti->boi", s_p, a_p)
            regulariser = P_out @ weight_matrix(block, decay_theta)[0] @ P_in.T
            parts.append((projected + regulariser).flatten(1))
        if self.rest.numel():
            blocks = gradients.train_blocks(theta, X, y, self.rest_names)
            rest = torch.cat(blocks, dim=1) + decay_theta[:, self.rest]
            parts.append(self.projection.rest().project(rest))
        return torch.cat(parts, dim=1).detach()


def _header(influence: Influence, projector: Projector, shard_size: int,
            data_id: str | None) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": VERSION, "influencekit": __version__,
        "fit": cache.fingerprint(influence.tracked_, influence.theta_, influence.objective,
                                 influence.gradients_.decay, influence.train_data, data_id),
        "projection": projector.settings(), "dim": projector.dim,
        "num_train": influence.num_train_, "shard_size": shard_size,
        "chunk_size": influence.chunk_size, "dtype": str(influence.theta_.dtype),
    }


def index(influence: Influence, out: str | Path, projection: Projection | None = None,
          shard_size: int | None = None, data_id: str | None = None) -> GradientStore:
    """Write (or resume) the gradient store ``out``; returns its reader."""
    influence._require_fitted()
    projector = Projector(influence, projection)
    row_bytes = projector.dim * torch.finfo(influence._dtype()).bits // 8
    default = max(1, min(16 * influence.chunk_size, SHARD_BYTES // row_bytes))
    shard_size = arguments.positive_integer(
        "shard_size", shard_size if shard_size is not None else default)
    folder = ShardFolder(out, _header(influence, projector, shard_size, data_id))
    n = influence.num_train_
    blocks = [slice(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]
    device, dtype = influence._device(), influence._dtype()
    with evaluation_mode(influence.model):
        if projection is not None and folder.read_json("distortion") is None \
                and distributed.rank() == 0:
            sample = slice(0, min(DISTORTION_SAMPLE, influence.chunk_size, n))
            X, y = next(influence.train_data.batches(sample.stop, device, dtype, sample))[1:]
            full = influence.gradients_.train(influence.theta_, X, y)
            measured = measure_distortion(full, projector.rows(X, y))
            folder.write_json("distortion", dataclasses.asdict(measured))
        for index_, rows in enumerate(tqdm(blocks, desc="indexing training gradients",
                                           leave=False, disable=not influence.progress)):
            name = f"gradients-{index_:06d}"
            if not distributed.owns(index_) or folder.record(name) is not None:
                continue
            parts = [projector.rows(X, y) for _, X, y in influence.train_data.batches(
                influence.chunk_size, device, dtype, rows)]
            block = torch.cat(parts).cpu()
            if not bool(torch.isfinite(block).all()):
                raise CacheMismatchError(f"Training gradients of rows {rows.start}..{rows.stop} "
                                         "are not finite; nothing was written for them.")
            folder.write(name, block.numpy(), rows=[rows.start, rows.stop])
    distributed.barrier()
    if distributed.rank() == 0:
        folder.write_json("complete", {"shards": len(blocks)})
    distributed.barrier()
    return GradientStore(out)


class GradientStore:
    """A gradient store on disk (see the module docstring), read lazily.

    Attributes:
        manifest: what the store was made with (fit fingerprint, projection, sizes).
        dim: numbers per training point (p, or k with a projection).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._shards = ShardFolder(folder, create=False)
        self.manifest = self._shards.manifest
        if self.manifest.get("format") != FORMAT:
            raise CacheMismatchError(f"{folder} is a {self.manifest.get('format')!r}, not a "
                                     "gradient store.")
        self.dim = self.manifest["dim"]

    @property
    def complete(self) -> bool:
        return self._shards.read_json("complete") is not None

    @property
    def distortion(self) -> dict[str, float] | None:
        """The distortion measured at indexing (``None`` without a projection)."""
        return self._shards.read_json("distortion")

    def projection(self) -> Projection | None:
        """The projection the store was made with."""
        settings = dict(self.manifest["projection"] or {})
        kind = settings.pop("projection", None)
        if kind is None:
            return None
        return (RandomProjection if kind == "random" else KroneckerProjection)(**settings)

    def blocks(self) -> list[tuple[slice, np.ndarray]]:
        """(rows, memory-mapped (rows, dim) array) per shard, in order."""
        n, size = self.manifest["num_train"], self.manifest["shard_size"]
        out = []
        for index_, start in enumerate(range(0, n, size)):
            name = f"gradients-{index_:06d}"
            if self._shards.record(name) is None:
                raise CacheMismatchError(f"{self.folder}: shard {name} is not finished; run "
                                         "the indexing job again to complete the store.")
            out.append((slice(start, min(start + size, n)), self._shards.read(name)))
        return out

    def check_for(self, influence: Influence, data_id: str | None = None) -> None:
        """Refuse the store unless it was made for this model, objective and training data."""
        now = cache.fingerprint(influence.tracked_, influence.theta_, influence.objective,
                                influence.gradients_.decay, influence.train_data, data_id)
        saved = self.manifest["fit"]
        differing = sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k))
        if differing or not self.complete:
            why = (f"{', '.join(differing)} differ" if differing else "it is not complete")
            raise CacheMismatchError(f"The gradient store {self.folder} cannot score for this "
                                     f"fit: {why}.")

    def num_shards(self) -> int:
        return math.ceil(self.manifest["num_train"] / self.manifest["shard_size"])
