"""Influence functions of a trained model (Koh & Liang 2017), behind one class.

Conventions (the product's contract):

- Orientation: score matrices are ``(m, n)``: rows are test points, columns training points.
- ``influence`` returns I_up,loss(z_i, z_test) = −∇_θ L_test(z_test)ᵀ · A⁻¹ · ∇_θ L(z_i), the
  derivative of the test loss when training point z_i is up-weighted, with A = H + λ_d·I.
- ``loo_change`` returns −I_up,loss / n: the predicted change of the test loss when z_i is
  removed and the model retrained on the other n − 1 points with the same objective. Positive
  means removing z_i raises the test loss: z_i is helpful. Negative: harmful.
- The training loss of every point carries (λ/2)·‖θ‖² (see :mod:`influencekit.objective`); the
  test measurement does not; damping λ_d is separate and reported.
- The curvature is the Hessian H by default; ``curvature="gauss-newton"`` uses the Gauss-Newton
  matrix G instead (positive semi-definite, the usual choice for networks away from a minimum).

What ``fit()`` checks before anything is scored: every argument at construction; finite
parameters, data and losses; that the objective fits the model's output; that θ̂ is a stationary
point of the objective (a :class:`~influencekit.errors.StationarityWarning` with the figures if
not). It chooses the damping when ``damping="auto"`` (:mod:`influencekit.damping`) and remembers
the model's parameters and buffers: every later call refuses a model changed since
(:class:`~influencekit.errors.StaleFitError`) instead of mixing two states.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import arguments, cache, distributed, heap, layers, memory, stationarity
from .curvature import CURVATURES, HVP_MODES, Curvature, HessianOperator, HVPMode
from .damping import DampingChoice, choose_damping
from .data import BatchFn, ExampleSet, check_compatible, check_finite, raise_if_flagged
from .errors import (
    DeviceMismatchError,
    DtypeError,
    InputTypeError,
    InvalidSettingError,
    NonFiniteError,
    NotFittedError,
    ObjectiveMismatchError,
    StaleFitError,
    StationarityWarning,
    warn,
)
from .gradient_norms import squared_gradient_norms
from .gradients import GradientComputer
from .inputs import batch_size, rows_of
from .objective import Objective
from .parameters import TrackedParameters, evaluation_mode, select_parameter_names
from .scoring import LayerScorer, ScoringReport, layer_path_applies
from .snapshot import ModelSnapshot, named_state
from .solvers import Solver, SolveReport, make_solver
from .solvers.base import combine_reports
from .tokens import TokenScores, check_token_objective, token_directional_derivatives

if TYPE_CHECKING:
    from .store.gradients import GradientStore
    from .store.scores import ScoreStore

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float64)
#: training points whose gradients set the scale of the stationarity check
STATIONARITY_SAMPLE = 256
#: training points on which the layer structure is checked against autograd
INDIRECT_SAMPLE = 4


@dataclass
class TopK:
    """The most helpful and most harmful training points for each test point.

    Scores are predicted leave-one-out changes of the test loss (``loo_change`` = −I_up,loss/n):
    removing a helpful point raises the test loss (score > 0), removing a harmful one lowers it.

    Attributes:
        helpful: ``(m, k)`` training indices, most helpful first.
        helpful_scores: ``(m, k)`` their loo_change, descending.
        harmful: ``(m, k)`` training indices, most harmful first.
        harmful_scores: ``(m, k)`` their loo_change, ascending.
    """

    helpful: Tensor
    helpful_scores: Tensor
    harmful: Tensor
    harmful_scores: Tensor


def gradient_chunk(chunk_size: int, theta: Tensor) -> int:
    """Examples per vmap where full per-example gradients are kept only briefly (the
    stationarity sample, test gradients): ``chunk_size``, capped so that their gradients take
    at most ``memory.GRADIENT_CHUNK_BYTES``."""
    per_example = theta.numel() * theta.element_size()
    return max(1, min(chunk_size, memory.GRADIENT_CHUNK_BYTES // per_example))


class Influence:
    """Influence of training points on a trained model's test losses.

    Args:
        model: the trained network; evaluated in eval mode, never modified. Its tracked
            parameters must be float32 or float64, and it must live on one device.
        objective: per-example training loss and test measurement (with its weight decay λ).
        train: the training set the model was fitted on: ``(X, y)``, a Dataset or a DataLoader.
        solver: ``"direct"``, ``"cg"``, ``"lissa"``, ``"kfac"``, ``"ekfac"``, ``"arnoldi"``,
            ``"deflated"`` or a solver object with its settings.
        damping: λ_d ≥ 0 added to the curvature (separate from the weight decay), or ``"auto"``:
            chosen at ``fit()`` from the curvature's spectrum (:mod:`influencekit.damping`); 0
            whenever the curvature is positive definite and well-conditioned, so convex models
            keep the paper's exact influence. The choice is in :attr:`damping_` and
            :attr:`damping_reason_`.
        params: names or module prefixes of the parameters to track (``None``: all trainable).
        chunk_size: examples per vectorised pass; bounds memory, never changes the scores.
        hvp_mode: ``"auto"`` (a fixed order by rule), ``"timed"``, or one mode of
            :class:`~influencekit.curvature.HessianOperator`.
        vectorize: per-example gradients with ``torch.func.vmap`` (falls back to a loop).
        progress: show progress bars on long passes and solver iterations.
        curvature: ``"hessian"`` (exact, the paper's) or ``"gauss-newton"`` (J^T ∇²_f ℓ J).
        stationarity_tol: warn when ‖∇R(θ̂)‖ exceeds this multiple of the typical per-example
            gradient norm (:mod:`influencekit.stationarity`); ``None`` measures and records it
            (:attr:`stationarity_`) without warning, for a θ̂ that is off a minimum on purpose.
        scoring: how scores get the training side: ``"layers"`` from each Linear/Conv2d
            layer's inputs and output gradients, never forming a per-example gradient
            (:mod:`influencekit.scoring`); ``"gradients"`` from per-example gradients;
            ``"auto"``: layers whenever the tracked parameters include such a layer.
        query_rank: with layer scoring, truncate each query's per-layer matrix to this rank
            (an approximation; the error is in :attr:`last_scoring_report`). ``None``: exact.
        batch_fn: turns each batch of the training and test data into ``(inputs, targets)``,
            for dict batches (``inputs`` may be a dict: the model is called as
            ``model(**inputs)``); see :mod:`influencekit.data`.
        max_memory: a budget such as ``"4GB"``: sizes the chunks of examples, of curvature-
            vector products and of queries solved together so that each stage fits
            (:mod:`influencekit.memory`; see :meth:`plan`). ``None``: the sizes as given.

    Example:
        >>> inf = Influence(model, CrossEntropyObjective(weight_decay=0.01), (X, y)).fit()
        >>> inf.loo_change((X_test, y_test)).shape   # (m, n)
    """

    def __init__(self, model: nn.Module, objective: Objective, train: Any,
                 solver: str | Solver = "cg", damping: float | str = "auto",
                 params: Sequence[str] | str | None = None, chunk_size: int = 256,
                 hvp_mode: HVPMode = "auto", vectorize: bool = True,
                 progress: bool = False, curvature: Curvature = "hessian",
                 stationarity_tol: float | None = 0.05, scoring: str = "auto",
                 query_rank: int | None = None, batch_fn: BatchFn | None = None,
                 max_memory: str | int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise InputTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(objective, Objective):
            raise InputTypeError(
                f"objective must be an influencekit.Objective (e.g. CrossEntropyObjective()), got "
                f"{type(objective).__name__}."
            )
        if isinstance(damping, str) and damping != "auto":
            raise InvalidSettingError(
                f"damping must be 'auto' or a finite number ≥ 0, got {damping!r}.")
        self.damping = damping if damping == "auto" else arguments.non_negative("damping",
                                                                                  damping)
        self.curvature = arguments.choice("curvature", curvature, CURVATURES)
        self.chunk_size = arguments.positive_integer("chunk_size", chunk_size)
        self._requested_chunk_size = self.chunk_size
        self.hvp_mode = arguments.choice("hvp_mode", hvp_mode, HVP_MODES)
        self.vectorize = arguments.flag("vectorize", vectorize)
        self.progress = arguments.flag("progress", progress)
        self.stationarity_tol = arguments.optional_positive("stationarity_tol",
                                                            stationarity_tol)
        self.scoring = arguments.choice("scoring", scoring, ("auto", "layers", "gradients"))
        self.query_rank = arguments.optional_positive_integer("query_rank", query_rank)
        if self.query_rank is not None and self.scoring == "gradients":
            raise InvalidSettingError("query_rank truncates the queries of layer scoring; use "
                                      "scoring='layers' or 'auto' with it.")
        self.last_scoring_report: ScoringReport | None = None
        if params is not None and not (isinstance(params, str) or (
                isinstance(params, Sequence) and all(isinstance(p, str) for p in params))):
            raise InputTypeError(f"params must be None, a parameter name or prefix, or a list of "
                                 f"them; got {params!r}.")
        self.params = params
        names = select_parameter_names(model, params)  # unknown names are refused here
        _check_model(model, names)
        named = dict(model.named_parameters())
        objective.decay_vector([(n, named[n]) for n in names], list(named))  # and λ keys
        self.model = model
        self.objective = objective
        self.batch_fn = batch_fn
        self.max_memory = None if max_memory is None else memory.parse_size(max_memory)
        self.train_data = ExampleSet(train, "training data", batch_fn)
        self.sizes_: memory.Sizes | None = None
        self.solver = make_solver(solver)

    # ------------------------------------------------------------------ fitting

    @heap.retaining
    def fit(self) -> Influence:
        """Check the model, data and objective, bind θ̂, choose the damping, prepare the solver.

        Returns ``self``. See the module docstring for what is checked.
        """
        tracked = TrackedParameters(self.model, self.params)
        _check_model(self.model, tracked.names)
        self._size_for_budget()
        theta = tracked.flat()
        gradients = GradientComputer(tracked, self.objective, self.vectorize)
        self.tracked_ = tracked  # the batches below need its dtype and device
        with evaluation_mode(self.model):
            gradient = self._check_training_data(gradients, theta)
            tracked.indirect_layers = frozenset(self._indirect_layers(tracked, theta))
            self.stationarity_ = self._stationarity(gradients, theta, gradient)
            operator = HessianOperator(gradients, self.train_data, theta,
                                       0.0 if self.damping == "auto" else self.damping,
                                       self.chunk_size, self.hvp_mode, self.progress,
                                       self.curvature,
                                       self.sizes_.max_vectors if self.sizes_ else 128)
            self.solver.progress = self.solver.progress or self.progress
            self.damping_choice_ = self._choose_damping(operator)
            self.solver.prepare(operator)
        self._bind(theta, gradients, operator, float(gradient.norm()))
        logger.info(
            "Fitted influence over %d parameters and %d training points; ‖∇R(θ̂)‖ = %.3g; "
            "damping %g.", tracked.dim, self.num_train_, self.train_gradient_norm_,
            self.damping_,
        )
        return self

    def _indirect_layers(self, tracked: TrackedParameters, theta: Tensor) -> list[str]:
        """Linear/Conv2d layers whose weights the model uses without calling them, found on
        the first few training examples (:func:`influencekit.layers.indirect_layers`)."""
        rows = list(range(min(len(self.train_data), INDIRECT_SAMPLE)))
        X, y = self.train_data.take(rows, self._device(), self._dtype())
        found = layers.indirect_layers(tracked, theta, X,
                                       lambda outputs: self.objective.train_loss(outputs,
                                                                                 y).sum())
        if found:
            logger.info("Layers %s use their weights without being called as modules (e.g. "
                        "nn.MultiheadAttention's out_proj): layer-structured methods treat them "
                        "as other parameters.", ", ".join(found))
        return found

    def _size_for_budget(self) -> None:
        """Chunk, product and query-group sizes for ``max_memory`` (measured, one forward)."""
        if self.max_memory is None:
            return
        _, parameter_bytes, activations, outputs = self._measure()
        self.sizes_ = memory.sizes_for(self.max_memory, parameter_bytes, activations,
                                       memory.kronecker_pullbacks(self.solver, outputs),
                                       self._requested_chunk_size, self.solver.name)
        self.chunk_size = self.sizes_.chunk_size
        logger.info("max_memory %d bytes: chunk_size %d, max_vectors %d, %d queries at a time.",
                    self.max_memory, self.chunk_size, self.sizes_.max_vectors,
                    self.sizes_.query_group)

    def plan(self, num_test: int = 100) -> memory.Plan:
        """What fitting and scoring ``num_test`` queries will take, stage by stage: estimated
        peak memory and passes over the data (one forward pass of one example, nothing more).
        ``print(inf.plan(100))`` shows it as a table."""
        arguments.positive_integer("num_test", num_test)
        self._size_for_budget()
        return memory.plan(self, num_test, self.sizes_, self._measure())

    def _measure(self) -> tuple[int, int, int, int]:
        """(p, bytes of a parameter vector, activation bytes of one example, outputs per
        example), measured once."""
        if getattr(self, "_measured", None) is None:
            self._measured = memory.measure(self)
        return self._measured

    def _bind(self, theta: Tensor, gradients: GradientComputer, operator: HessianOperator,
              train_gradient_norm: float) -> None:
        """Hold the fitted state (after ``fit`` or a load) and snapshot what it is for."""
        self.tracked_ = gradients.tracked
        self.theta_ = theta
        self._gradient_cache: Tensor | None = None
        self.gradients_ = gradients
        self.operator_ = operator
        self.num_train_ = len(self.train_data)
        self.input_shape_ = self.train_data.input_shape
        self.train_gradient_norm_ = train_gradient_norm
        self.snapshot_ = ModelSnapshot(self.model, self.objective.settings,
                                       self.train_data.tensors)

    def save(self, folder: str | Path, data_id: str | None = None) -> Path:
        """Write what ``fit()`` computed to ``folder``: tensors as safetensors, everything else
        as a JSON manifest with the settings, versions and fingerprint (see
        :mod:`influencekit.store.fitted`). ``data_id`` names the training data instead of a
        hash of its examples. Returns the folder."""
        from .store import fitted

        self._require_fitted()
        return fitted.save(self, Path(folder), data_id)

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module, objective: Objective, train: Any,
             data_id: str | None = None, progress: bool = False,
             batch_fn: BatchFn | None = None) -> Influence:
        """A fitted Influence from :meth:`save`'s folder, without a pass of the model over the
        data; refused (:class:`~influencekit.errors.CacheMismatchError`, naming the fields) if
        ``model``, ``objective`` or ``train`` differ from what was saved."""
        from .store import fitted

        return fitted.load(Path(folder), model, objective, train, data_id, progress, batch_fn)

    @property
    def damping_(self) -> float:
        """The damping the scores include: λ_d of the curvature (``damping="auto"``: the chosen
        value) plus any the solver adds itself (LiSSA's scale·d)."""
        self._require_fitted(check_model=False)
        return self.operator_.damping + self.solver.extra_damping

    @property
    def damping_reason_(self) -> str:
        """Why :attr:`damping_` has its value."""
        self._require_fitted(check_model=False)
        if self.damping_choice_ is None:
            reason = f"damping {self.operator_.damping:g} as given"
        else:
            reason = self.damping_choice_.reason
        extra = self.solver.extra_damping
        if extra:
            reason += (f"; plus {extra:.4g} that {type(self.solver).__name__}'s own damping "
                       f"adds (scale·d), {self.damping_:.4g} in all")
        return reason

    def _choose_damping(self, operator: HessianOperator) -> DampingChoice | None:
        if self.damping != "auto":
            return None
        bound = None  # a Gauss-Newton matrix of a loss convex in the output is PSD + diag(λ)
        if operator.curvature == "gauss-newton" and self.objective.convex_in_output:
            bound = operator.min_shift - operator.damping
        choice = choose_damping(self.solver.spectrum_estimate(operator), operator.dtype, bound)
        operator.damping = choice.value
        logger.info("damping='auto': %s.", choice.reason)
        return choice

    def _check_training_data(self, gradients: GradientComputer, theta: Tensor) -> Tensor:
        """One pass: finite data, objective fits, finite losses; returns ∇R(θ̂)."""
        total = torch.zeros_like(theta)

        def local_pass() -> None:
            for rows, X, y in self._batches(self.train_data, "checking training data",
                                            local=True):
                # one forward and one backward: the checks look at the same outputs
                leaf = theta.detach().requires_grad_(True)
                with torch.enable_grad():
                    outputs = gradients.tracked.forward(leaf, X)
                    losses = self._check_batch(gradients, theta, rows, X, y, self.train_data,
                                               test=False, outputs=outputs)
                    total.add_(torch.autograd.grad(losses.sum(), leaf)[0])

        distributed.together(local_pass)
        distributed.all_reduce(total)
        return total / len(self.train_data) + gradients.decay * theta

    def _stationarity(self, gradients: GradientComputer, theta: Tensor,
                      gradient: Tensor) -> stationarity.Stationarity:
        """‖∇R(θ̂)‖ against the RMS per-example gradient norm; warns if not stationary."""
        n = len(self.train_data)
        sample = torch.linspace(0, n - 1, min(n, STATIONARITY_SAMPLE)).round().long().unique()
        X, y = self.train_data.take(sample, self._device(), self._dtype())

        rest = layers.find_blocks(gradients.tracked)[1]
        # from the layers' inputs and output gradients; per-example gradients only for the rest
        step = self.chunk_size if not rest.numel() else gradient_chunk(self.chunk_size, theta)

        def squared_norms(positions: Tensor) -> Tensor:
            """‖∇L(z_i)‖² of the sample's examples at ``positions`` (k, 1), as (k, 1)."""
            Xs, ys = rows_of(X, positions[:, 0]), y[positions[:, 0]]
            out = torch.zeros(len(positions), 1, dtype=theta.dtype, device=theta.device)
            for s in _slices(len(positions), step):
                out[s, 0] = squared_gradient_norms(gradients, theta, rows_of(Xs, s), ys[s])
            return out

        # each process differentiates a share of the sample
        squares = distributed.split_rows(
            squared_norms, torch.arange(len(sample), device=self._device())[:, None])
        check = stationarity.Stationarity(float(gradient.norm()),
                                          float(squares.mean().sqrt()), int(sample.numel()),
                                          self.stationarity_tol)
        if check.tol is not None and not check.stationary:
            warn(stationarity.message(check, _describe_decay(self.objective), self.curvature),
                 StationarityWarning)
        return check

    def _check_batch(self, gradients: GradientComputer, theta: Tensor, rows: slice, X: Tensor,
                     y: Tensor, data: ExampleSet, test: bool,
                     outputs: Tensor | None = None) -> Tensor:
        """Finite data, the objective fits the outputs, finite per-example losses; returns the
        losses. ``outputs``: the model's outputs on X if already computed (the losses are then
        computed from them, keeping their graph)."""
        name = data.name
        check_finite(X, y, rows, name)
        if outputs is None:
            with torch.no_grad():
                outputs = gradients.tracked.forward(theta, X)  # a tensor (huggingface)
        try:
            self.objective.check(outputs.detach(), y)
        except ObjectiveMismatchError as error:
            raise ObjectiveMismatchError(
                f"{error} ({name}: {data.describe()}; model output "
                f"{tuple(outputs.shape[1:])} per example)") from None
        losses = (self.objective.test_loss if test else self.objective.train_loss)(outputs, y)
        method = "test_loss" if test else "train_loss"
        if losses.shape != (batch_size(X),):
            raise ObjectiveMismatchError(
                f"{type(self.objective).__name__}.{method} must return one value per example, "
                f"shape ({batch_size(X)},) for this batch; got shape {tuple(losses.shape)}. Use "
                "reduction='none' and reduce over all but the batch dimension."
            )
        raise_if_flagged(
            ~torch.isfinite(losses), rows,
            f"The {'test measurement' if test else 'training loss'} is NaN or infinite on {name} "
            "example(s) {where}. Check the model's outputs there (overflow, log of zero); the "
            "influence of a non-finite loss is undefined.")
        return losses

    def _require_fitted(self, check_model: bool = True) -> None:
        if not hasattr(self, "theta_"):
            raise NotFittedError(
                "This Influence is not fitted yet: call fit() before computing influence "
                "(inf = Influence(...).fit())."
            )
        if check_model:
            changed = self.snapshot_.changed()
            if changed:
                shown = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
                raise StaleFitError(
                    f"The model changed after fit() ({shown}): the fitted state — θ̂, the "
                    "curvature, the solver's factors and any cached gradients — describes the "
                    "model as it was. Call fit() again to score the model as it is now.")

    def _batches(self, data: ExampleSet, description: str,
                 local: bool = False) -> Iterator[tuple[slice, Tensor, Tensor]]:
        """Batches of ``data`` (only this process's rows if ``local``), with a progress bar."""
        rows = data.local_rows(self.chunk_size) if local else slice(0, len(data))
        batches = data.batches(self.chunk_size, self._device(), self._dtype(), rows)
        total = math.ceil((rows.stop - rows.start) / self.chunk_size)
        return iter(tqdm(batches, total=total, desc=description, leave=False,
                         disable=not self.progress))

    def _dtype(self) -> torch.dtype:
        return self.tracked_.dtype

    def _device(self) -> torch.device:
        return self.tracked_.device

    # ------------------------------------------------------------------ building blocks

    def _test_set(self, test: Any) -> ExampleSet:
        data = ExampleSet(test, "test data", self.batch_fn)
        check_compatible(self.input_shape_, data)
        return data

    @heap.retaining
    def test_gradients(self, test: Any) -> Tensor:
        """``(m, p)`` gradients of the test measurement at each test point (no regulariser)."""
        return self._test_gradients(test)

    def _test_gradients(self, test: Any, offset: int = 0) -> Tensor:
        """:meth:`test_gradients`; ``offset``: where these test points start in the caller's
        test set (errors name the caller's indices)."""
        self._require_fitted()
        data = self._test_set(test)
        out = torch.empty(len(data), self.tracked_.dim, dtype=self._dtype(),
                          device=self._device())
        step = gradient_chunk(self.chunk_size, self.theta_)
        with evaluation_mode(self.model):
            for idx, X, y in self._batches(data, "test gradients"):
                self._check_batch(self.gradients_, self.theta_,
                                  slice(offset + idx.start, offset + idx.stop), X, y, data,
                                  test=True)
                for part in _slices(len(y), step):
                    rows = slice(idx.start + part.start, idx.start + part.stop)
                    shown = slice(offset + rows.start, offset + rows.stop)
                    out[rows] = _finite(self.gradients_.test(self.theta_, rows_of(X, part),
                                                             y[part]), shown, "test")
        return out

    @heap.retaining
    def train_gradients(self, indices: Tensor | Sequence[int] | None = None) -> Tensor:
        """``(k, p)`` training gradients ∇_θ L(z_i) (regulariser included) for ``indices``.

        With ``indices=None`` this materialises the full ``(n, p)`` matrix, which the scoring
        methods never do.
        """
        self._require_fitted()
        with evaluation_mode(self.model):
            if indices is not None:
                if not torch.as_tensor(indices).numel():
                    return torch.empty(0, self.tracked_.dim, dtype=self._dtype(),
                                       device=self._device())
                X, y = self.train_data.take(indices, self._device(), self._dtype())
                return torch.cat([self.gradients_.train(self.theta_, rows_of(X, s), y[s])
                                  for s in _slices(batch_size(X), self.chunk_size)])
            return self._all_train_gradients("training gradients")

    def _all_train_gradients(self, description: str) -> Tensor:
        """The (n, p) training gradients; each process computes its rows, all get all."""
        if self._gradient_cache is not None:
            return self._gradient_cache
        rows = self.train_data.local_rows(self.chunk_size)
        parts: list[Tensor] = []

        def local_pass() -> None:
            for part, X, y in self._batches(self.train_data, description, local=True):
                parts.append(_finite(self.gradients_.train(self.theta_, X, y), part,
                                     "training"))

        distributed.together(local_pass)
        local = torch.cat(parts) if parts else torch.zeros(0, self.tracked_.dim,
                                                           dtype=self._dtype(),
                                                           device=self._device())
        return distributed.gather_rows(local, rows, self.num_train_)

    def _train_gradient_chunks(self, description: str) -> Iterator[tuple[slice, Tensor]]:
        if self._gradient_cache is not None:
            for rows in _slices(self.num_train_, self.chunk_size):
                yield rows, self._gradient_cache[rows]
            return
        for rows, X, y in self._batches(self.train_data, description):
            yield rows, _finite(self.gradients_.train(self.theta_, X, y), rows, "training")

    @heap.retaining
    def cache_train_gradients(self, path: str | Path | None = None,
                              data_id: str | None = None) -> Influence:
        """Keep the (n, p) training gradients so later batches of test points skip that pass.

        With ``path``, the gradients are loaded from that file if it was made for this θ̂, the
        model's other parameters and buffers, this objective and its settings, parameter set,
        dtype and training data (see :mod:`influencekit.cache`), and otherwise computed and
        written there atomically; a file made for anything else is refused
        (:class:`~influencekit.errors.CacheMismatchError`). The training data is identified by
        a SHA-256 of every example (streamed for a Dataset or DataLoader), or by ``data_id`` if
        given. Memory: n·p numbers. Returns ``self``.
        """
        self._require_fitted()
        if path is not None:
            meta = cache.fingerprint(self.tracked_, self.theta_, self.objective,
                                     self.gradients_.decay, self.train_data, data_id)
        if path is not None and Path(path).exists():
            gradients = cache.load(path, meta, (self.num_train_, self.tracked_.dim),
                                   self._dtype()).to(self._device())
        else:
            self._gradient_cache = None
            with evaluation_mode(self.model):
                gradients = self._all_train_gradients("training gradients")
            if path is not None and distributed.rank() == 0:
                cache.save(path, gradients, meta)
            distributed.barrier()
        self._gradient_cache = gradients
        return self

    @heap.retaining
    def solve(self, V: Tensor) -> Tensor:
        """A⁻¹·v for each row of ``V`` ``(k, p)`` (or ``(p,)``), A = C + λ_d·I; see
        :attr:`last_solve_report`. ``(p, k)`` blocks and higher-precision ``V`` are refused."""
        self._require_fitted()
        group = self.sizes_.query_group if self.sizes_ is not None else None
        with evaluation_mode(self.model):
            if group is None or V.ndim < 2 or V.shape[0] <= group:
                return self.solver.solve(V)
            parts, reports = [], []  # within the budget: a few right-hand sides at a time
            for start in range(0, V.shape[0], group):
                parts.append(self.solver.solve(V[start : start + group]))
                reports.append(self.solver.last_report)
            self.solver.last_report = combine_reports(reports)
            return torch.cat(parts)

    @property
    def last_solve_report(self) -> SolveReport | None:
        """How well the most recent solve went (residual, iterations, eigenvalues)."""
        return self.solver.last_report

    # ------------------------------------------------------------------ scores

    @heap.retaining
    def influence(self, test: Any) -> Tensor:
        """I_up,loss of every training point on every test point, ``(m, n)``.

        I[j, i] = −∇_θ L_test(z_j)ᵀ (C + λ_d·I)⁻¹ ∇_θ L(z_i). All test points share one block
        solve and one pass over the training data. With ``max_memory`` the solve goes in groups
        of ``sizes_.query_group``; if more solved queries than :meth:`queries_held` are asked
        for, so do the passes over the data (one per group that fits).
        """
        self._require_fitted()
        data = self._test_set(test)
        held = self.queries_held()
        if held is None or len(data) <= held:
            scorer = self._factored_scorer(data)
            if scorer is not None:
                return -self._dot_train_gradients(None, "scoring training points",
                                                  scorer=scorer)
            return -self._dot_train_gradients(self._solved(data), "scoring training points")
        parts, reports = [], []
        for start in range(0, len(data), held):
            chosen = data.take(list(range(start, min(start + held, len(data)))))
            S = self._solved(self._test_set(chosen), offset=start)
            reports.append(self.solver.last_report)
            parts.append(-self._dot_train_gradients(S, "scoring training points"))
        self.solver.last_report = combine_reports(reports)
        return torch.cat(parts)

    def queries_held(self) -> int | None:
        """How many solved queries fit in ``max_memory`` while the data is scored (a quarter
        of it, 2p numbers each: see :func:`influencekit.memory.queries_held`; ``None``: no
        budget)."""
        if self.sizes_ is None:
            return None
        return memory.queries_held(self.sizes_)

    def _solved(self, data: ExampleSet, offset: int = 0) -> Tensor:
        """S = A⁻¹ ∇_θ L_test, ``(m, p)``, solved ``sizes_.query_group`` queries at a time under
        ``max_memory`` (their reports combined), else all together. ``offset``: where ``data``
        starts in the caller's test set."""
        group = self.sizes_.query_group if self.sizes_ is not None else None
        if group is None or len(data) <= group:
            return self.solve(self._test_gradients(data, offset))
        S = torch.empty(len(data), self.tracked_.dim, dtype=self._dtype(), device=self._device())
        reports = []
        for start in range(0, len(data), group):
            rows = slice(start, min(start + group, len(data)))
            chosen = data.take(list(range(rows.start, rows.stop)))
            S[rows] = self.solve(self._test_gradients(chosen, offset + rows.start))
            reports.append(self.solver.last_report)
        self.solver.last_report = combine_reports(reports)
        return S

    def _factored_scorer(self, data: ExampleSet, offset: int = 0) -> LayerScorer | None:
        """A layer scorer whose queries K-FAC/EK-FAC preconditioned in factored form, never
        forming the (m, p) solved queries (:mod:`influencekit.factored_queries`); ``None`` where
        that route does not apply. It applies with ``query_rank``, layer scoring, a K-FAC or
        EK-FAC solver without ``verify`` (its residual needs the dense queries), no gradient
        cache, every tracked parameter in a Linear/Conv2d/Embedding layer, and one position per
        query in every layer (fully connected layers; a convolution's T > 1 positions take the
        dense route)."""
        from .solvers.kfac import KFAC

        solver = self.solver
        if (self.query_rank is None or self.scoring == "gradients"
                or not isinstance(solver, KFAC) or solver.verify
                or self._gradient_cache is not None or not solver.blocks_
                or (solver.fallback_ is not None and solver.fallback_.numel())):
            return None
        objective = self.gradients_.objective
        parts: list[list[tuple[Tensor, Tensor]]] = []
        with evaluation_mode(self.model):
            for idx, X, y in self._batches(data, "test signals"):
                shown = slice(offset + idx.start, offset + idx.stop)
                self._check_batch(self.gradients_, self.theta_, shown, X, y, data, test=True)

                def summed(outputs: Tensor, y: Tensor = y) -> tuple[Tensor, None]:
                    return objective.test_loss(outputs, y).sum(), None

                signals = layers.layer_signals(self.tracked_, self.theta_, X, solver.blocks_,
                                               summed)[1]
                if any(a.shape[1] != 1 for a, _ in signals):
                    return None  # several positions per query: the dense route
                flat = [(a[:, 0], s[0, :, 0]) for a, s in signals]
                _finite(torch.cat([v for pair in flat for v in pair], dim=1), shown, "test")
                parts.append(flat)
        signals = [(torch.cat([part[k][0] for part in parts]),
                    torch.cat([part[k][1] for part in parts])) for k in range(len(parts[0]))]
        return LayerScorer.from_factors(self, solver.factored_queries(signals, self.query_rank),
                                        self.query_rank)

    def _dot_train_gradients(self, S: Tensor | None, description: str,
                             rows: slice | None = None,
                             scorer: LayerScorer | None = None) -> Tensor:
        """S · ∇_θ L(z_i) for every training point (or those in ``rows``), ``(k, n)``, in one
        pass over the data; or the same for the queries a ``scorer`` holds (then ``S`` is not
        needed).

        Without a gradient cache the per-example gradients stay split by parameter tensor and
        the product is a sum of per-block products, plus S·(λ ⊙ θ̂) for the regulariser's share.
        """
        if rows is None and distributed.active() and self._gradient_cache is None:
            local = self.train_data.local_rows(self.chunk_size)
            part = distributed.together(
                lambda: self._dot_train_gradients(S, description, local, scorer))
            return distributed.gather_columns(part, local, self.num_train_)
        first, last = (0, self.num_train_) if rows is None else (rows.start, rows.stop)
        if scorer is not None:
            m, dtype, device = scorer.m, self._dtype(), self._device()
        else:
            m, dtype, device = S.shape[0], S.dtype, S.device
        out = torch.empty(m, last - first, dtype=dtype, device=device)
        if self._gradient_cache is not None:
            for part, G in self._train_gradient_chunks(description):
                lo, hi = max(part.start, first), min(part.stop, last)
                if lo < hi:
                    out[:, lo - first : hi - first] = S @ G[lo - part.start : hi - part.start].T
            return out
        batches = tqdm(self.train_data.batches(self.chunk_size, self._device(), self._dtype(),
                                               rows),
                       desc=description, leave=False, disable=not self.progress,
                       total=math.ceil((last - first) / self.chunk_size))
        if scorer is not None or self.scoring == "layers" or (
                self.scoring == "auto" and layer_path_applies(self)):
            scorer = scorer if scorer is not None else LayerScorer(self, S, self.query_rank)
            with evaluation_mode(self.model):
                for part, X, y in batches:
                    block = scorer.scores(X, y)
                    _finite(block.T, part, "training")
                    out[:, part.start - first : part.stop - first] = block
            self.last_scoring_report = scorer.report
            return out
        self.last_scoring_report = ScoringReport("per-example gradients")
        pieces = S.split(self.tracked_.numels, dim=1)
        regulariser = S @ (self.gradients_.decay * self.theta_)
        with evaluation_mode(self.model):
            for part, X, y in batches:
                blocks = self.gradients_.train_blocks(self.theta_, X, y)
                finite = torch.ones(batch_size(X), dtype=torch.bool, device=y.device)
                product = torch.zeros(S.shape[0], batch_size(X), dtype=S.dtype, device=S.device)
                for piece, block in zip(pieces, blocks, strict=True):
                    finite &= torch.isfinite(block).all(dim=1)
                    product += piece @ block.T
                _finite(finite[:, None], part, "training")
                out[:, part.start - first : part.stop - first] = product + regulariser[:, None]
        return out

    def _self_influence_rows(self, rows: slice) -> Tensor:
        """I_up,loss(z_i, z_i) for the training points in ``rows``, and their solve reports."""
        out = torch.empty(rows.stop - rows.start, dtype=self.theta_.dtype,
                          device=self.theta_.device)
        reports = []
        batches = self.train_data.batches(self.chunk_size, self._device(), self._dtype(), rows)
        total = math.ceil((rows.stop - rows.start) / self.chunk_size)
        with evaluation_mode(self.model):
            for part, X, y in tqdm(batches, desc="self-influence", total=total, leave=False,
                                   disable=not self.progress):
                G_train = _finite(self.gradients_.train(self.theta_, X, y), part, "training")
                G_test = _finite(self.gradients_.test(self.theta_, X, y), part, "test")
                S = self.solver.solve(G_test)
                reports.append(self.solver.last_report)
                out[part.start - rows.start : part.stop - rows.start] = -(S * G_train).sum(dim=1)
        self.solver.last_report = combine_reports(reports)
        return out

    @heap.retaining
    def loo_change(self, test: Any) -> Tensor:
        """Predicted change of each test loss when each training point is removed, ``(m, n)``.

        loo_change = −I_up,loss / n. Positive: the point is helpful (removing it raises the test
        loss). Negative: harmful.
        """
        return -self.influence(test) / self.num_train_

    @heap.retaining
    def params_influence(self, train_indices: Tensor | Sequence[int]) -> Tensor:
        """I_up,params = −(C + λ_d·I)⁻¹ ∇_θ L(z_i) for the given training points, ``(k, p)``.

        −I_up,params / n predicts the change of θ̂ when the point is removed.
        """
        return -self.solve(self.train_gradients(train_indices))

    @heap.retaining
    def perturbation_influence(self, test: Any, train_indices: Tensor | Sequence[int]) -> Tensor:
        """I_pert,loss: gradient of each test loss w.r.t. each chosen training input.

        Q[j, k] = −∇_x [∇_θ L_test(z_j)ᵀ (C + λ_d·I)⁻¹ ∇_θ L(x, y_k)] at x = x_k; shape
        ``(m, k, *input_shape)``. Moving x_k by δ changes test loss j by about ⟨Q[j, k], δ⟩/n.
        """
        S = self.solve(self.test_gradients(test))
        X, y = self.train_data.take(train_indices, self._device(), self._dtype())
        with evaluation_mode(self.model):
            parts = [self.gradients_.input_gradients(self.theta_, S, rows_of(X, s), y[s])
                     for s in _slices(batch_size(X), self.chunk_size)]
        return -torch.cat(parts, dim=1)

    @heap.retaining
    def token_influence(self, test: Any, train_indices: Tensor | Sequence[int]) -> TokenScores:
        """Per-token I_up,loss of the chosen training sequences on every test point.

        ``tokens[j, k, t]`` = −s_jᵀ∇_θ ℓ_{i_k,t}, the share of target token t of sequence i_k,
        with s_j = (C + λ_d·I)⁻¹∇L_test(z_j); the shares and the regulariser's share sum to
        ``influence(test)[:, train_indices]``. One JVP per query and chunk of sequences, no
        per-token gradient formed (:mod:`influencekit.tokens`). Needs an objective with
        ``token_losses`` (:class:`~influencekit.CausalLMObjective`).
        """
        self._require_fitted()
        check_token_objective(self.objective)
        indices = torch.as_tensor(train_indices, dtype=torch.long).reshape(-1)
        S = self.solve(self.test_gradients(test))
        X, y = self.train_data.take(indices, self._device(), self._dtype())
        tracked = self.gradients_.tracked
        with evaluation_mode(self.model):
            parts = [token_directional_derivatives(tracked, self.objective, self.theta_, S,
                                                   rows_of(X, rows), y[rows])
                     for rows in _slices(batch_size(X), self.chunk_size)]
        regularizer = -(S @ (self.gradients_.decay * self.theta_))
        return TokenScores(-torch.cat(parts, dim=1), regularizer, indices)

    @heap.retaining
    def self_influence(self) -> Tensor:
        """I_up,loss(z_i, z_i) for every training point, ``(n,)``, without an n × n matrix.

        = −∇_θ L_test(z_i)ᵀ (C + λ_d·I)⁻¹ ∇_θ L(z_i). Typically negative: the more negative, the
        more the point holds up its own fit (mislabelled points come first when sorted
        ascending). Costs one solve per training point (in blocks of ``chunk_size``);
        :attr:`last_solve_report` then covers all blocks (the largest residual, converged only
        if every block did).
        """
        self._require_fitted()
        # every process takes part in every block: the solves' curvature products are shared
        return self._self_influence_rows(slice(0, self.num_train_))

    @heap.retaining
    def index(self, out: str | Path, projection: Any = None, shard_size: int | None = None,
              data_id: str | None = None) -> GradientStore:
        """Write the per-example training gradients to the store ``out`` (resumed if it exists
        with the same settings), optionally projected: ``ik.RandomProjection(dim=k)`` or
        ``ik.KroneckerProjection(input_dim, output_dim)`` (LoGra). See
        :mod:`influencekit.store.gradients`; pass the store to :meth:`score` as ``gradients``.
        """
        from .store import gradients

        return gradients.index(self, out, projection, shard_size, data_id)

    @heap.retaining
    def score(self, test: Any, out: str | Path, kind: str = "loo_change", top_k: int = 10,
              shard_size: int | None = None, data_id: str | None = None,
              gradients: GradientStore | str | Path | None = None) -> ScoreStore:
        """Stream scores to the store ``out`` block by block, never holding the (m, n) matrix.

        ``kind``: ``"loo_change"`` (default), ``"influence"``, or ``"self_influence"`` with
        ``test=None``. Keeps the ``top_k`` largest and smallest scores per query. A store that
        exists with the same settings is resumed (finished shards are skipped), one made with
        anything else is refused. ``shard_size`` (training points per shard, a multiple of
        ``chunk_size``; default 16 chunks). With ``gradients`` (a gradient store from
        :meth:`index`) the training side is read from it: one solve and one streamed pass over
        the store. See :mod:`influencekit.store.scores`; read the result with
        :class:`~influencekit.store.scores.ScoreStore` (returned).
        """
        from .store import scores

        return scores.score(self, test, out, kind, top_k, shard_size, data_id, gradients)

    @heap.retaining
    def top_k(self, test: Any, k: int = 10) -> TopK:
        """The k most helpful and k most harmful training points per test point (:class:`TopK`).

        ``k`` may not exceed the number of training points n (a larger k is refused rather
        than silently cut to n).
        """
        k = arguments.positive_integer("k", k)
        self._require_fitted()
        if k > self.num_train_:
            raise InvalidSettingError(
                f"k={k} exceeds the {self.num_train_} training points; pass k ≤ "
                f"{self.num_train_} (k={self.num_train_} ranks every point).")
        scores = self.loo_change(test)
        helpful_scores, helpful = scores.topk(k, dim=1, largest=True)
        harmful_scores, harmful = scores.topk(k, dim=1, largest=False)
        return TopK(helpful, helpful_scores, harmful, harmful_scores)


def _check_model(model: nn.Module, tracked_names: list[str]) -> None:
    """One device (not ``meta``), a supported dtype, finite parameters and buffers."""
    state = named_state(model)
    devices = sorted({str(tensor.device) for _, tensor in state})
    if len(devices) > 1 or devices == ["meta"]:
        where = {d: [n for n, t in state if str(t.device) == d][:3] for d in devices}
        raise DeviceMismatchError(
            f"The model's parameters and buffers must all be on one device with data; they are "
            f"on {devices} (e.g. {where}). Move the model with model.to(device)"
            + (" and load its weights (meta tensors hold none)." if "meta" in devices else "."))
    named = dict(model.named_parameters())
    dtypes = sorted({str(named[n].dtype) for n in tracked_names})
    if any(named[n].dtype not in SUPPORTED_DTYPES for n in tracked_names):
        raise DtypeError(
            f"influencekit computes in float32 or float64; the tracked parameters are "
            f"{', '.join(dtypes)}. Convert the model (and inputs) with model.float() — or "
            "model.double() for exactness checks — before Influence; half-precision solves "
            "are not supported (their eigendecompositions and residuals are round-off).")
    for name, tensor in state:
        if not tensor.is_floating_point():
            continue
        if name in named and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(
                f"The model's parameter {name!r} holds NaN or infinite values; influence of a "
                "model with non-finite weights is undefined. Check the training run that "
                "produced it.")
        if name not in named and bool((torch.isnan(tensor) | (tensor == math.inf)).any()):
            raise NonFiniteError(  # −inf is allowed in buffers: attention masks use it
                f"The model's buffer {name!r} holds NaN or +inf values; influence of a model "
                "with such state is undefined. Check the training run that produced it (−inf "
                "is allowed in buffers, as attention masks use it).")


def _describe_decay(objective: Objective) -> str:
    spec = objective.weight_decay
    return repr(spec) if not callable(spec) else getattr(spec, "__qualname__", "a function")


def _finite(G: Tensor, rows: slice, side: str) -> Tensor:
    """G unchanged, or :class:`NonFiniteError` naming the examples whose gradient is NaN/inf."""
    what = "test measurement" if side == "test" else "training loss"
    raise_if_flagged(
        ~torch.isfinite(G).all(dim=1), rows,
        f"The gradient of the {what} is NaN or infinite at {side} example(s) {{where}}, although "
        "the value itself is finite (e.g. sqrt or abs at 0, or a clamp with an infinite "
        "derivative). Influence needs finite gradients; smooth the loss there.")
    return G


def _slices(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]
