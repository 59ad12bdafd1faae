"""Scores streamed to disk, column block by column block, with a running top-k per query.

``Influence.score(test, out=folder, kind="loo_change", top_k=10)`` never holds the (m, n) matrix:

1. it solves the m queries once, S = A⁻¹ ∇_θ L_test (one block solve), and keeps S in the store
   (shard ``queries``), so a resumed job does not solve again; where ``Influence.influence``
   keeps the queries factored (``query_rank`` with K-FAC/EK-FAC,
   :mod:`influencekit.factored_queries`), the store keeps those factors instead;
2. for each block of ``shard_size`` training points it computes the scores of all m queries
   against them (one pass of per-example gradients over the block) and commits them as shard
   ``scores-NNNNNN``, an (m, block) array;
3. once every block is committed, it streams them, in order, through a running top-k per query
   (the k largest and the k smallest scores, ties broken by the lower training index), and
   writes the result.

``kind="self_influence"`` (``test=None``) streams I_up,loss(z_i, z_i) the same way, one (block,)
shard at a time, with the k largest and smallest over all n.

A job killed at any point and started again with the same arguments skips every committed shard
(:mod:`influencekit.store.shards`), re-reads them in order to rebuild the running top-k, and
ends with arrays bit-identical to an uninterrupted run's. The top-k is always built that way,
from the committed shards in order, after they are all written: so under torch.distributed,
where process r writes the shards j with j mod R = r, every process merges the same top-k. A
store made with anything else (fit, solver, damping, queries, kind, sizes) is refused. With
``shard_size`` a multiple of ``chunk_size`` (required), the per-example gradients are computed
in the same chunks as ``Influence.loo_change``, and the stored scores equal its to the bit.

:class:`ScoreStore` reads a store: shards memory-mapped, any block of columns, the whole matrix
on request, and the top-k.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import arguments, cache, distributed
from ..data import ExampleSet
from ..errors import CacheMismatchError, InvalidSettingError
from ..factored_queries import LayerQueries
from ..scoring import LayerScorer
from ..version import __version__
from .gradients import GradientStore, Projector
from .shards import ShardFolder

if TYPE_CHECKING:
    from ..influence import Influence

FORMAT = "influencekit-score-store"
VERSION = 1
KINDS = ("loo_change", "influence", "self_influence")


def _header(influence: Influence, test: ExampleSet | None, kind: str, top_k: int,
            shard_size: int, data_id: str | None,
            gradients: GradientStore | None) -> dict[str, Any]:
    fit = cache.fingerprint(influence.tracked_, influence.theta_, influence.objective,
                            influence.gradients_.decay, influence.train_data, data_id)
    return {
        "format": FORMAT, "version": VERSION, "kind": kind, "influencekit": __version__,
        "fit": fit, "solver": {"solver": type(influence.solver).__name__,
                               "settings": influence.solver.settings()},
        "damping": influence.damping_, "curvature": influence.curvature,
        "scoring": influence.scoring, "query_rank": influence.query_rank,
        "queries": None if test is None else test.content_digest(),
        "num_test": None if test is None else len(test),
        "num_train": influence.num_train_, "shard_size": shard_size, "top_k": top_k,
        "chunk_size": influence.chunk_size, "dtype": str(influence.theta_.dtype),
        "gradient_store": None if gradients is None else {
            "folder": str(gradients.folder.resolve()), "projection": gradients.manifest[
                "projection"], "fit": gradients.manifest["fit"]},
    }


def score(influence: Influence, test: Any, out: str | Path, kind: str = "loo_change",
          top_k: int = 10, shard_size: int | None = None, data_id: str | None = None,
          gradients: GradientStore | str | Path | None = None) -> ScoreStore:
    """Stream ``kind`` scores of ``test`` (``None`` for self-influence) into the store ``out``;
    resume it if it exists with the same settings. With a gradient store the training side is
    read from it (shards of the store's size) instead of recomputed. Returns the reader."""
    influence._require_fitted()
    kind = arguments.choice("kind", kind, KINDS)
    n = influence.num_train_
    top_k = arguments.integer("top_k", top_k, minimum=0, maximum=n)
    store = None
    if gradients is not None:
        store = gradients if isinstance(gradients, GradientStore) else GradientStore(gradients)
        store.check_for(influence, data_id)
        if kind == "self_influence":
            raise InvalidSettingError("Self-influence needs each training point's own solve; "
                                      "score it without a gradient store.")
        shard_size = store.manifest["shard_size"]
    shard_size = arguments.positive_integer(
        "shard_size", shard_size if shard_size is not None else 16 * influence.chunk_size)
    if store is None and shard_size % influence.chunk_size:
        raise InvalidSettingError(
            f"shard_size={shard_size} must be a multiple of chunk_size={influence.chunk_size} "
            "(so that the stored scores equal the in-memory ones to the bit).")
    queries = None
    if kind != "self_influence":
        if test is None:
            raise InvalidSettingError(f"kind={kind!r} needs test points; test=None is only for "
                                      "kind='self_influence'.")
        queries = influence._test_set(test)
        _check_held(influence, len(queries))
    elif test is not None:
        raise InvalidSettingError("kind='self_influence' scores the training points against "
                                  "themselves; pass test=None.")
    folder = ShardFolder(out, _header(influence, queries, kind, top_k, shard_size, data_id,
                                      store))
    blocks = [slice(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]
    S = scorer = None
    if kind != "self_influence":
        if store is None:
            scorer = _factored_queries(influence, test, folder)
        if scorer is None:
            S = _queries(influence, test, folder)
    stored = None
    if store is not None:
        S = Projector(influence, store.projection()).queries(S)
        stored = [array for _, array in store.blocks()]  # memory-mapped, read one at a time
    for index, rows in enumerate(tqdm(blocks, desc=f"scoring ({kind})", leave=False,
                                      disable=not influence.progress)):
        name = f"scores-{index:06d}"
        if folder.record(name) is not None:
            continue
        # self-influence solves are collective: every process takes part in every block
        if not distributed.owns(index) and kind != "self_influence":
            continue
        block = _block(influence, kind, S, rows, None if stored is None else stored[index],
                       scorer)
        if distributed.owns(index):
            folder.write(name, block.cpu().numpy(), rows=[rows.start, rows.stop])
    distributed.barrier()
    ranking = _RunningTopK(top_k)  # from the committed shards, in order: the same on resume
    for index, rows in enumerate(blocks):
        block = torch.from_numpy(np.array(folder.read(f"scores-{index:06d}")))
        ranking.update(block[None, :] if kind == "self_influence" else block, rows.start)
    if distributed.rank() == 0:
        for name, array in ranking.arrays().items():
            if folder.record(name) is None:
                folder.write(name, array)
        folder.write_json("complete", {"shards": len(blocks)})
    distributed.barrier()
    return ScoreStore(out)


def _check_held(influence: Influence, m: int) -> None:
    """Refuse, before anything is written, m solved queries that ``max_memory`` cannot hold."""
    held = influence.queries_held()
    if held is not None and m > held:
        sizes = influence.sizes_
        raise InvalidSettingError(
            f"A score store holds its {m} solved queries while it scores, twice {m} × "
            f"{sizes.parameter_bytes:,} bytes with layer scoring: "
            f"{2 * m * sizes.parameter_bytes / 1e9:.2f} GB, more than the quarter of max_memory "
            f"({sizes.budget / 1e9:.2f} GB) kept for them allows ({held} queries). "
            f"Score them in groups of at most {held}, each into its own store "
            "(out=f'.../scores-{i}'), or raise max_memory.")


def _queries(influence: Influence, test: Any, folder: ShardFolder) -> Tensor:
    """S = A⁻¹ ∇_θ L_test, from the store if a previous run committed it (the solve is
    collective under torch.distributed; process 0 commits it)."""
    if folder.record("queries") is not None:
        S = torch.from_numpy(np.array(folder.read("queries")))
        return S.to(influence._device())
    S = influence._solved(influence._test_set(test))
    if distributed.rank() == 0:
        folder.write("queries", S.detach().cpu().numpy())
    distributed.barrier()
    return S


def _factored_queries(influence: Influence, test: Any, folder: ShardFolder
                      ) -> LayerScorer | None:
    """The queries kept factored through K-FAC/EK-FAC where that route applies (as in
    ``Influence.influence``, so the stored scores equal the in-memory ones), from the store if a
    previous run committed them (shards ``query-factors-L-U``, ``-V``, ``-squared_error``,
    ``-squared_norm`` per layer L); ``None`` where the dense route applies."""
    fields = ("U", "V", "squared_error", "squared_norm")
    if folder.record("query-factors-0-U") is not None:
        layers, index = [], 0
        while folder.record(f"query-factors-{index}-U") is not None:
            arrays = [torch.from_numpy(np.array(folder.read(f"query-factors-{index}-{name}")))
                      .to(influence._device()) for name in fields]
            layers.append(LayerQueries(*arrays))
            index += 1
        return LayerScorer.from_factors(influence, layers, influence.query_rank)
    scorer = influence._factored_scorer(influence._test_set(test))
    if scorer is None:
        return None
    if distributed.rank() == 0:
        for index, layer in enumerate(scorer.layer_queries):
            for name in fields:
                folder.write(f"query-factors-{index}-{name}",
                             getattr(layer, name).detach().cpu().numpy())
    distributed.barrier()
    return scorer


def _block(influence: Influence, kind: str, S: Tensor | None, rows: slice,
           stored: np.ndarray | None, scorer: LayerScorer | None = None) -> Tensor:
    """The scores of shard ``rows``: from the training gradients (or the factored queries of
    ``scorer``) or a gradient store's rows."""
    if kind == "self_influence":
        return influence._self_influence_rows(rows)
    if stored is not None:
        block = -(S @ torch.from_numpy(np.array(stored)).to(S.device, S.dtype).T)
    else:
        block = -influence._dot_train_gradients(S, "scoring training points", rows, scorer)
    return block if kind == "influence" else -block / influence.num_train_


class _RunningTopK:
    """The k largest and k smallest scores per row seen so far, ties to the lower index."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.state: dict[str, tuple[Tensor, Tensor]] = {}

    def update(self, block: Tensor, offset: int) -> None:
        if not self.k:
            return
        indices = torch.arange(offset, offset + block.shape[1]).expand(block.shape[0], -1)
        for side, descending in (("largest", True), ("smallest", False)):
            values, positions = block, indices
            if side in self.state:
                kept_values, kept_positions = self.state[side]
                values = torch.cat([kept_values, block], dim=1)
                positions = torch.cat([kept_positions, indices], dim=1)
            order = torch.sort(values, dim=1, descending=descending, stable=True).indices
            order = order[:, : self.k]
            self.state[side] = (values.gather(1, order), positions.gather(1, order))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for side, (values, positions) in self.state.items():
            out[f"{side}-indices"] = positions.numpy()
            out[f"{side}-scores"] = values.numpy()
        return out


class ScoreStore:
    """A score store on disk (see the module docstring), read lazily.

    Attributes:
        manifest: what the store was made with.
        kind: ``"loo_change"``, ``"influence"`` or ``"self_influence"``.
        shape: ``(m, n)``, or ``(n,)`` for self-influence.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._shards = ShardFolder(folder, create=False)
        self.manifest = self._shards.manifest
        if self.manifest.get("format") != FORMAT:
            raise CacheMismatchError(f"{folder} is a {self.manifest.get('format')!r}, not a "
                                     "score store.")
        self.kind = self.manifest["kind"]
        n = self.manifest["num_train"]
        self.shape = (n,) if self.kind == "self_influence" else (self.manifest["num_test"], n)

    @property
    def complete(self) -> bool:
        """Whether every shard and the top-k were written."""
        return self._shards.read_json("complete") is not None

    def _blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        n, size = self.manifest["num_train"], self.manifest["shard_size"]
        for index, start in enumerate(range(0, n, size)):
            name = f"scores-{index:06d}"
            if self._shards.record(name) is None:
                raise CacheMismatchError(f"{self.folder}: shard {name} is not finished; run the "
                                         "scoring job again to complete the store.")
            yield slice(start, min(start + size, n)), self._shards.read(name)

    def columns(self, start: int, stop: int) -> np.ndarray:
        """Scores of the training points start … stop − 1 (the last axis), read from disk."""
        parts = [array[..., max(start, rows.start) - rows.start : stop - rows.start]
                 for rows, array in self._blocks() if rows.stop > start and rows.start < stop]
        return np.concatenate(parts, axis=-1)

    def to_numpy(self) -> np.ndarray:
        """The whole score array in memory (m × n numbers)."""
        return np.concatenate([np.asarray(array) for _, array in self._blocks()], axis=-1)

    def top(self, side: str = "largest") -> tuple[np.ndarray, np.ndarray]:
        """(indices, scores) of the k ``"largest"`` or ``"smallest"`` scores per query, each
        ``(m, k)`` (``(1, k)`` for self-influence). For ``loo_change`` the largest are the most
        helpful training points and the smallest the most harmful."""
        side = arguments.choice("side", side, ("largest", "smallest"))
        if not self.complete:
            raise CacheMismatchError(f"{self.folder} is not complete; run the scoring job again.")
        return (np.asarray(self._shards.read(f"{side}-indices")),
                np.asarray(self._shards.read(f"{side}-scores")))
