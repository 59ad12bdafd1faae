"""The linear datamodeling score (LDS): how well summed attributions rank retrained models.

Park et al. 2023 ("TRAK: Attributing Model Behavior at Scale", §2.2): draw S random subsets
S_1 … S_S of the n training points, each of ⌊α·n⌉ points (α = ``fraction``, 0.5 by default),
retrain on each (with R seeds, averaged) and record each test measurement f_j(S_s). An
attribution τ of shape ``(m, n)`` predicts, for test point j,

    g_j(S_s) = Σ_{i ∈ S_s} τ[j, i].

The LDS of test point j is the Spearman rank correlation over the S subsets between g_j(S_s) and
f_j(S_s); a method's LDS is the mean over test points, here with a bootstrap confidence interval
over test points. **Higher is better**: 1 ranks the retrained models perfectly, 0 is chance.

Orientation: τ[j, i] > 0 must mean that including training point i *raises* measurement j. For the
test loss that is :meth:`Influence.influence` (I_up,loss: up-weighting i by ε changes the test
loss by ε·I_up,loss) and equally ``-loo_change``; a method that scores helpfulness (a
prediction's margin, TRAK's convention) is negated before it is scored against losses.

Ground truth is the expensive part: S·R trainings. :func:`retrain_on_subsets` writes each
training's measurements to a store folder as soon as it finishes (an atomic shard with a commit
record, :class:`~influencekit.store.shards.ShardFolder`), so a killed job started again with the
same arguments trains only what is missing; more subsets or seeds can be added later, since each
subset's points and each training's seed depend only on (seed, subset, draw).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import arguments
from ..data import ExampleSet
from ..errors import InputTypeError, InvalidSettingError, NonFiniteError, ShapeMismatchError
from ..objective import Objective
from ..randomness import derived_seed
from ..store.shards import ShardFolder
from .loo import measured_test_losses

FORMAT = "influencekit-subset-retraining"
FORMAT_VERSION = 1

TrainFunction = Callable[[Tensor, int], nn.Module]
Measurement = Callable[[nn.Module], Tensor]


@dataclass(frozen=True)
class SubsetGroundTruth:
    """Test measurements of models retrained on random subsets of the training data.

    Attributes:
        masks: ``(S, n)`` bool, row s marks the training points of subset s.
        measurements: ``(S, m)`` float64, measurement of each test point, mean over the seeds.
        per_seed: ``(S, R, m)`` float64, every training's measurements.
        fraction: α, the share of the training points in each subset.
        seed: the base seed the subsets and training seeds were derived from.
        folder: the store folder, or ``None`` when kept in memory only.
    """

    masks: Tensor
    measurements: Tensor
    per_seed: Tensor
    fraction: float
    seed: int
    folder: Path | None = None


@dataclass(frozen=True)
class LDSResult:
    """The LDS of one attribution against one ground truth (higher is better).

    Attributes:
        per_point: ``(m,)`` Spearman R over the subsets for each test point (NaN where either
            side is constant, so that a rank correlation is undefined).
        mean: mean of ``per_point`` over the test points where it is defined.
        low, high: bootstrap interval of the mean (test points resampled with replacement).
        confidence: the interval's level (0.95 by default).
        subsets: S, the number of subsets the correlations are taken over.
        defined: how many test points have a defined correlation.
    """

    per_point: Tensor
    mean: float
    low: float
    high: float
    confidence: float
    subsets: int
    defined: int

    def __str__(self) -> str:
        return (f"LDS {self.mean:.3f} [{self.low:.3f}, {self.high:.3f}] "
                f"({self.confidence:.0%} bootstrap interval; {self.defined} test points, "
                f"{self.subsets} subsets)")


def subset_size(n: int, fraction: float) -> int:
    """⌊α·n⌉, checked to leave at least one point in and one point out."""
    k = round(fraction * n)
    if not 1 <= k <= n - 1:
        raise InvalidSettingError(
            f"fraction={fraction:g} of n={n} training points gives subsets of {k} points; a "
            "subset needs at least one point and must leave at least one out. Choose a fraction "
            f"between {1.5 / n:.3g} and {1 - 1.5 / n:.3g}.")
    return k


def subset_mask(n: int, fraction: float, seed: int, subset: int) -> Tensor:
    """``(n,)`` bool: the points of subset number ``subset`` (depends only on n, α, seed and
    the subset's number, so subsets 0 … S−1 are the same whatever S is)."""
    k = subset_size(n, fraction)
    generator = torch.Generator().manual_seed(derived_seed(seed, subset))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:k]] = True
    return mask


def subset_masks(n: int, subsets: int, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """``(S, n)`` bool: the masks of subsets 0 … S−1 (see :func:`subset_mask`)."""
    return torch.stack([subset_mask(n, fraction, seed, s) for s in range(subsets)])


def training_seed(seed: int, subset: int, draw: int) -> int:
    """The seed handed to the training function for draw r of subset s."""
    return derived_seed(seed, subset, draw, 1)


def loss_measurement(objective: Objective, test: Any) -> Measurement:
    """A measurement for :func:`retrain_on_subsets`: each test point's ``objective.test_loss``
    (no regulariser), ``(m,)``, with the model in evaluation mode."""
    test_set = ExampleSet(test, "test data")
    return lambda model: measured_test_losses(model, objective, test_set)


def retrain_on_subsets(train: TrainFunction, measure: Measurement, n: int, subsets: int = 50,
                       fraction: float = 0.5, seeds: int = 1, seed: int = 0,
                       out: str | Path | None = None, key: str = "",
                       progress: bool = True,
                       share: tuple[int, int] = (0, 1)) -> SubsetGroundTruth | None:
    """Retrain on S random subsets (R seeds each) and record the test measurements.

    Args:
        train: ``train(indices, seed) -> model``: trains a model from scratch on the training
            points ``indices`` (``(k,)`` int64, sorted) with all its randomness drawn from
            ``seed``. The same code that trained the model being attributed, on fewer points.
        measure: ``measure(model) -> (m,)`` the test measurements (e.g.
            :func:`loss_measurement`).
        n: the number of training points.
        subsets: S (≥ 3; the literature uses 50–100).
        fraction: α, each subset holds ⌊α·n⌉ points.
        seeds: R trainings per subset, averaged (reduces the training noise in the truth).
        seed: derives each subset's points and each training's seed.
        out: a folder to keep each training's measurements in as it finishes; a job started
            again with the same folder trains only what is missing. A folder made with another
            n, fraction, seed or key is refused (:class:`~influencekit.errors.CacheMismatchError`).
        key: a name for the recipe behind ``train`` and ``measure`` (they cannot be
            fingerprinted); change it when they change, so that a store is never mixed.
        progress: show a progress bar.
        share: ``(index, count)``: this process trains only the missing trainings whose number
            s·R + r is ``index`` modulo ``count``, so that ``count`` processes fill one ``out``
            folder together. Returns ``None`` while other shares are unfinished; a last call
            with the default ``(0, 1)`` trains whatever is still missing and returns the truth.

    Returns:
        :class:`SubsetGroundTruth` with masks ``(S, n)`` and measurements ``(S, m)``.
    """
    if not callable(train) or not callable(measure):
        raise InputTypeError("train and measure must be callables: train(indices, seed) -> "
                             "model and measure(model) -> (m,) tensor.")
    n = arguments.integer("n", n, minimum=2)
    subsets = arguments.integer("subsets", subsets, minimum=3)
    fraction = arguments.real("fraction", fraction, 0.0, 1.0, True, True)
    seeds = arguments.positive_integer("seeds", seeds)
    seed = arguments.seed("seed", seed)
    subset_size(n, fraction)
    index, count = share
    count = arguments.positive_integer("share[1]", count)
    index = arguments.integer("share[0]", index, minimum=0, maximum=count - 1)
    if count > 1 and out is None:
        raise InvalidSettingError("share=(index, count) splits the trainings between processes "
                                  "that fill one folder; pass out=FOLDER as well.")
    store = None
    if out is not None:
        store = ShardFolder(out, {"format": FORMAT, "version": FORMAT_VERSION, "n": n,
                                  "fraction": fraction, "seed": seed, "key": str(key)})
    masks = subset_masks(n, subsets, fraction, seed)
    results: dict[tuple[int, int], np.ndarray] = {}
    pending = []
    for s in range(subsets):
        for r in range(seeds):
            name = f"subset-{s:05d}-draw-{r:03d}"
            if store is not None and store.record(name) is not None:
                results[s, r] = np.array(store.read(name), dtype=np.float64)
            else:
                pending.append((s, r, name))
    missing = len(pending)
    pending = [(s, r, name) for s, r, name in pending if (s * seeds + r) % count == index]
    bar = tqdm(total=subsets * seeds, initial=subsets * seeds - missing,
               desc="subset retraining", disable=not progress)
    try:
        for s, r, name in pending:
            indices = masks[s].nonzero().reshape(-1)
            started = time.perf_counter()
            model = train(indices, training_seed(seed, s, r))
            if not isinstance(model, nn.Module):
                raise InputTypeError(f"train(indices, seed) must return the trained nn.Module, "
                                     f"got {type(model).__name__}.")
            values = _measurements(measure(model), s, r)
            if store is not None:
                store.write(name, values, subset=s, draw=r, seconds=time.perf_counter() - started,
                            training_seed=training_seed(seed, s, r))
            results[s, r] = values
            bar.update(1)
    finally:
        bar.close()
    if len(results) < subsets * seeds:
        return None  # other shares are still training
    sizes = {v.shape[0] for v in results.values()}
    if len(sizes) != 1:
        raise ShapeMismatchError(
            f"The measurements have different lengths across trainings ({sorted(sizes)}); every "
            "training must be measured on the same test points. If the test set changed, use a "
            "new folder or key.")
    per_seed = torch.from_numpy(np.stack([np.stack([results[s, r] for r in range(seeds)])
                                          for s in range(subsets)]))
    return SubsetGroundTruth(masks, per_seed.mean(dim=1), per_seed, fraction, seed,
                             None if out is None else Path(out))


def _measurements(values: Any, subset: int, draw: int) -> np.ndarray:
    if not isinstance(values, Tensor):
        raise InputTypeError(f"measure(model) must return a tensor of shape (m,), got "
                             f"{type(values).__name__}.")
    if values.dim() != 1 or values.numel() == 0:
        raise ShapeMismatchError(f"measure(model) must return shape (m,) with one value per test "
                                 f"point, got {tuple(values.shape)}.")
    array = values.detach().cpu().double().numpy()
    if not np.isfinite(array).all():
        raise NonFiniteError(
            f"The model trained on subset {subset} (draw {draw}) gave non-finite measurements "
            f"({int((~np.isfinite(array)).sum())} of {array.size}); its training diverged. Fix "
            "the training function (learning rate, steps); finished trainings are kept.")
    return array


def linear_datamodeling_score(attributions: Tensor | np.ndarray, truth: SubsetGroundTruth,
                              confidence: float = 0.95, bootstrap: int = 2000,
                              seed: int = 0) -> LDSResult:
    """LDS of an ``(m, n)`` attribution against a subset-retraining ground truth.

    For each test point j: Spearman R over s of Σ_{i∈S_s} τ[j, i] against f_j(S_s). The mean is
    over test points with a defined correlation; the interval resamples those test points
    ``bootstrap`` times. τ must be oriented so that a positive entry raises the measurement
    (for test losses: ``Influence.influence``, or ``-loo_change``); see the module docstring.
    """
    confidence = arguments.real("confidence", confidence, 0.0, 1.0, True, True)
    bootstrap = arguments.positive_integer("bootstrap", bootstrap)
    tau = torch.as_tensor(attributions).detach().cpu().double()
    S, n = truth.masks.shape
    m = truth.measurements.shape[1]
    if tau.shape != (m, n):
        hint = (" It looks transposed: rows are test points, columns training points."
                if tau.shape == (n, m) else "")
        raise ShapeMismatchError(f"attributions must have shape (m, n) = ({m}, {n}) to match the "
                                 f"ground truth, got {tuple(tau.shape)}.{hint}")
    if not torch.isfinite(tau).all():
        raise NonFiniteError(f"attributions hold {int((~torch.isfinite(tau)).sum())} non-finite "
                             "entries; an LDS of them would be meaningless.")
    predicted = (truth.masks.double() @ tau.T).numpy()  # (S, m)
    per_point = _spearman_columns(predicted, truth.measurements.numpy())
    defined = per_point[np.isfinite(per_point)]
    if defined.size == 0:
        nan = float("nan")
        return LDSResult(torch.from_numpy(per_point), nan, nan, nan, confidence, S, 0)
    rng = np.random.default_rng(seed)
    draws = defined[rng.integers(0, defined.size, size=(bootstrap, defined.size))].mean(axis=1)
    low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return LDSResult(torch.from_numpy(per_point), float(defined.mean()), float(low), float(high),
                     confidence, S, int(defined.size))


def _spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman R between matching columns of two ``(S, m)`` arrays (ties get average ranks;
    NaN for a constant column)."""
    ra = stats.rankdata(a, axis=0)
    rb = stats.rankdata(b, axis=0)
    ra = ra - ra.mean(axis=0)
    rb = rb - rb.mean(axis=0)
    norms = np.sqrt((ra**2).sum(axis=0) * (rb**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (ra * rb).sum(axis=0) / np.where(norms > 0, norms, 1.0),
                        np.nan)
