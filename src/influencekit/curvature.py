"""The damped curvature of the training objective as a linear operator.

    A = C + λ_d·I,   C = H = (1/n) Σ_i ∇²_θ ℓ(z_i, θ̂) + λ·I         (curvature="hessian")
                     C = G = (1/n) Σ_i J_iᵀ ∇²_f ℓ(f_i, y_i) J_i + λ·I   (curvature="gauss-newton")

(λ = the objective's weight decay, folded into every training loss; λ_d = damping, reported
separately; J_i = ∂f(x_i)/∂θ is the Jacobian of the model output). The Gauss-Newton matrix G drops
the second derivatives of the network itself; it is positive semi-definite whenever the loss is
convex in the model output (cross-entropy, logistic, squared error, smooth hinge), so it needs no
damping to be invertible where H is indefinite. G·v = Jᵀ(∇²_f ℓ (J v)) costs one forward-mode and
one reverse-mode pass. Products A·v are exact (Pearlmutter's trick), by forward-over-reverse
``jvp(grad(f))`` or reverse-over-reverse ``vjp(grad(f))``, with a plain autograd loop as the last
resort. In ``"auto"`` mode the order is fixed by rule: reverse-over-reverse first (on the
85k-parameter benchmark MLP it forms 100 products in 1.1 s against forward-over-reverse's 1.6 s;
on small models the two are within milliseconds), then forward-over-reverse, then the loop, each
tried only when the previous one cannot transform the model (``is_transform_limitation``: a
missing batching rule or derivative), never on a user's bug. The same inputs therefore always
take the same path and give bit-identical products. ``"timed"`` instead forms the first large
block both ways (synchronising the device around each), keeps the faster mode for the
operator's life and records it in :attr:`HessianOperator.chosen_mode`; it can pick differently in
another process, whose scores then differ by round-off. Blocks of vectors ``V`` of shape
``(k, p)`` are multiplied at once with ``vmap``; the training data is visited in chunks, so
memory does not grow with n. With a per-parameter weight decay (see
:class:`~influencekit.objective.Objective`) the λ·I above is the diagonal diag(λ_j).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vjp, vmap
from tqdm.auto import tqdm

from . import arguments, distributed, heap
from .data import ExampleSet
from .errors import OUT_OF_MEMORY, DtypeError, InputTypeError, ShapeMismatchError
from .gradients import GradientComputer
from .inputs import map_inputs, rows_of
from .transforms import first_line, is_transform_limitation, unsupported_second_derivatives

logger = logging.getLogger(__name__)

HVPMode = Literal["auto", "timed", "forward-over-reverse", "reverse-over-reverse", "loop"]
Curvature = Literal["hessian", "gauss-newton"]
CURVATURES = ("hessian", "gauss-newton")
_MODES = ("reverse-over-reverse", "forward-over-reverse", "loop")
HVP_MODES = ("auto", "timed", *_MODES)
SMALL_BLOCK = 16


def as_rows(V: object, dim: int, dtype: torch.dtype, device: torch.device,
            who: str) -> tuple[Tensor, bool]:
    """Right-hand sides as a ``(k, p)`` block of rows in ``dtype`` on ``device``, and whether a
    single ``(p,)`` vector was given.

    Exactly ``(p,)`` or ``(k, p)`` is accepted. A ``(p, k)`` block (the column orientation of
    scipy and curvlinops) and any other shape are refused, even where the size would reshape:
    a silent reshape would mix entries of different right-hand sides. A right-hand side in a
    higher precision than the model would be rounded; it is refused, not downcast.
    """
    if not isinstance(V, Tensor):
        raise InputTypeError(f"{who}: right-hand sides must be a torch.Tensor of shape (k, "
                               f"{dim}) or ({dim},), got {type(V).__name__}.")
    shape = tuple(V.shape)
    if not (V.ndim == 1 and shape == (dim,)) and not (V.ndim == 2 and shape[1] == dim):
        hint = (" That is the column orientation (p, k) of scipy/curvlinops; influencekit "
                "takes right-hand sides as rows, (k, p): pass V.T."
                if V.ndim == 2 and shape[0] == dim else "")
        raise ShapeMismatchError(
            f"{who}: right-hand sides must have shape (k, {dim}) (one per row) or ({dim},) for "
            f"the {dim} tracked parameters; got {shape}.{hint}")
    if not V.is_floating_point():
        raise DtypeError(f"{who}: right-hand sides must be floating point, got {V.dtype}.")
    if torch.finfo(V.dtype).bits > torch.finfo(dtype).bits:
        raise DtypeError(
            f"{who}: the right-hand sides are {V.dtype} but the model computes in {dtype}; they "
            f"would be rounded to {dtype}. Convert the model and data to {V.dtype} (e.g. "
            f"model.double()) for a {V.dtype} solve, or pass V.to({dtype}) to accept {dtype}.")
    rows = V.reshape(1, dim) if V.ndim == 1 else V
    return rows.to(device=device, dtype=dtype), V.ndim == 1


class HessianOperator:
    """A = C + λ_d·I (C the Hessian or the Gauss-Newton matrix) over the training set.

    Args:
        gradients: per-example loss machinery (tracked parameters + objective).
        data: the training set.
        theta: θ̂, shape ``(p,)``.
        damping: λ_d ≥ 0.
        chunk_size: training examples per forward/backward pass.
        mode: how products are formed (module docstring): ``"auto"`` (a fixed order by rule,
            falling back only when a transform cannot handle the model), ``"timed"``, or one
            mode.
        progress: show a progress bar over chunks for long passes (dense Hessian).
        curvature: ``"hessian"`` (exact) or ``"gauss-newton"``.
        max_vectors: vectors multiplied together per chunk (bounds memory, see ``matvec``).
    """

    def __init__(self, gradients: GradientComputer, data: ExampleSet, theta: Tensor,
                 damping: float = 0.0, chunk_size: int = 256, mode: HVPMode = "auto",
                 progress: bool = False, curvature: Curvature = "hessian",
                 max_vectors: int = 128) -> None:
        self.mode = arguments.choice("hvp_mode", mode, HVP_MODES)
        self.curvature = arguments.choice("curvature", curvature, CURVATURES)
        self.max_vectors = arguments.positive_integer("max_vectors", max_vectors)
        self.chunk_size = arguments.positive_integer("chunk_size", chunk_size)
        self.damping = arguments.non_negative("damping", damping)
        self.progress = arguments.flag("progress", progress)
        self.gradients = gradients
        self.data = data
        self.theta = theta.detach()
        self._failed_modes: set[str] = set()
        self._large_block_mode: str | None = None  # "timed": measured on the first large block
        self.num_matvecs = 0
        self._grouped_vmap = True
        self._vectorized_ggn = True
        self.normalizer = len(data)  # n of the mean; a restricted operator keeps the full n

    @property
    def dim(self) -> int:
        return int(self.theta.numel())

    @property
    def num_train(self) -> int:
        return len(self.data)

    @property
    def dtype(self) -> torch.dtype:
        return self.theta.dtype

    @property
    def device(self) -> torch.device:
        return self.theta.device

    @property
    def decay(self) -> float | Tensor:
        """λ per coordinate: a float when uniform, else ``(p,)``."""
        return self.gradients.decay

    @property
    def shift(self) -> float | Tensor:
        """λ + λ_d: what is added to the mean data curvature along the diagonal (a float when
        the weight decay is uniform, else ``(p,)``)."""
        return self.gradients.decay + self.damping

    @property
    def min_shift(self) -> float:
        """The smallest diagonal entry of λ + λ_d."""
        shift = self.shift
        return float(shift.min()) if isinstance(shift, Tensor) else float(shift)

    @property
    def chosen_mode(self) -> str:
        """The product mode used for large blocks (``"timed"``: what was measured)."""
        if self.mode not in ("auto", "timed"):
            return self.mode
        order = self._modes(SMALL_BLOCK)
        return order[0] if order else "none"

    def mode_state(self) -> dict:
        """How products are formed, as decided so far (saved with a fit, see ``restore_modes``)."""
        return {"large_block_mode": self._large_block_mode,
                "failed_modes": sorted(self._failed_modes),
                "grouped_vmap": self._grouped_vmap, "vectorized_ggn": self._vectorized_ggn}

    def restore_modes(self, state: dict) -> None:
        """Take back :meth:`mode_state`: a saved fit forms its products the same way."""
        self._large_block_mode = state["large_block_mode"]
        self._failed_modes = set(state["failed_modes"])
        self._grouped_vmap = bool(state["grouped_vmap"])
        self._vectorized_ggn = bool(state["vectorized_ggn"])

    def _add_shift(self, out: Tensor, V: Tensor) -> Tensor:
        shift = self.shift
        if isinstance(shift, Tensor):
            return out.addcmul_(V, shift.expand_as(V) if V.ndim == 2 else shift)
        return out.add_(V, alpha=shift)

    @heap.retaining
    def matvec(self, V: Tensor, shifted: bool = True) -> Tensor:
        """A·v for each row v of ``V`` (``(k, p)`` or ``(p,)``), over the whole training set;
        with ``shifted=False`` only the data term (1/n) Σ_i C_i·v, without (λ + λ_d)·v.

        The rows go through in blocks of at most ``max_vectors`` per pass over a chunk, so peak
        memory is bounded by ``max_vectors`` × ``chunk_size`` × the activations of one example.
        """
        rows, single = as_rows(V, self.dim, self.dtype, self.device, "HessianOperator.matvec")
        # rows must be contiguous: vmap over a transposed view (CG's (p, k) blocks) makes every
        # product strided, 25% slower on the benchmark MLP
        rows = rows.contiguous()
        out = torch.zeros_like(rows)

        def local_sum() -> None:
            for _, X, y in self.data.local_batches(self.chunk_size, self.device, self.dtype):
                for start in range(0, rows.shape[0], self.max_vectors):
                    block = slice(start, start + self.max_vectors)
                    out[block] += self._data_hvp_sum(rows[block], X, y)

        distributed.together(local_sum)
        distributed.all_reduce(out)
        out = out.div_(self.normalizer)
        if shifted:
            out = self._add_shift(out, rows)
        self.num_matvecs += rows.shape[0]
        return out[0] if single else out

    def restricted(self, indices: Tensor) -> HessianOperator:
        """The same operator with only the examples at ``indices`` in the sum:

            A_S = (1/n) Σ_{i ∈ S} C_i + (λ + λ_d)·I,

        still divided by the full n, so A_S = A minus the curvature of the examples left out.
        Products cost |S|/n of A's. Used to build preconditioners from the examples that carry
        the curvature (see :meth:`curvature_weights`).
        """
        keep = torch.zeros(len(self.data), dtype=torch.bool)
        keep[torch.as_tensor(indices, dtype=torch.long).cpu()] = True
        sub = HessianOperator(self.gradients, self.data.without(~keep), self.theta,
                              self.damping, self.chunk_size, self.mode, False, self.curvature,
                              self.max_vectors)
        sub.normalizer = self.normalizer
        sub._large_block_mode = self._large_block_mode
        sub._failed_modes = set(self._failed_modes)
        return sub
    def curvature_weights(self, probes: int = 8, seed: int = 0) -> Tensor:
        """How much curvature each training example contributes, ``(n,)``:

            w_i = ‖∇_f ℓ_i‖ + ‖∇²_f ℓ_i‖_F   (derivatives in the model output f = f(x_i, θ̂)).

        Example i adds J_iᵀ ∇²_f ℓ_i J_i + Σ_k ∂ℓ_i/∂f_k ∇²_θ f_k to the Hessian, so w_i → 0
        means its contribution vanishes (under cross-entropy w_i is proportional to
        1 − p_{y_i} to first order: a confidently right prediction adds almost nothing). The
        output Hessian is formed exactly when an example's output has at most 256 entries;
        otherwise ‖∇²_f ℓ_i‖_F is estimated from ``probes`` Rademacher vectors z (seeded by
        ``seed`` and the chunk's first row),
        E‖∇²_f ℓ_i z‖² = ‖∇²_f ℓ_i‖_F².
        """
        objective, tracked = self.gradients.objective, self.gradients.tracked

        def loss(f: Tensor, target: Tensor) -> Tensor:
            return objective.train_loss(f.unsqueeze(0), target.unsqueeze(0))[0]

        weights = []
        rows = self.data.local_rows(self.chunk_size)
        for batch, X, y in self.data.local_batches(self.chunk_size, self.device, self.dtype):
            # probes seeded by the batch's first row: the same wherever the batch is computed
            generator = torch.Generator().manual_seed(seed * 1_000_003 + batch.start)
            with torch.no_grad():
                f = tracked.forward(self.theta, X)
            gradient = vmap(grad(loss))(f, y).flatten(1)
            if gradient.shape[1] <= 256:
                curvature = vmap(jacrev(grad(loss)))(f, y).flatten(1).norm(dim=1)
            else:
                signs = torch.randint(0, 2, (probes, *f.shape[1:]), generator=generator)
                Z = (2 * signs - 1).to(device=f.device, dtype=f.dtype)
                curvature = _probed_hessian_norms(loss, f, y, Z)
            weights.append(gradient.norm(dim=1) + curvature)
        local = torch.cat(weights).detach() if weights else torch.zeros(0, dtype=self.dtype,
                                                                          device=self.device)
        return distributed.gather_rows(local, rows, len(self.data))

    def sampled_matvec(self, V: Tensor, indices: Tensor) -> Tensor:
        """Mini-batch products: for each r, A_r·v over the examples ``indices[r]``.

        Args:
            V: ``(R, k, p)`` vectors, R independent groups.
            indices: ``(R, b)`` training indices, one mini-batch per group.

        Returns:
            ``(R, k, p)``: ((1/b) Σ_{i ∈ batch r} ∇²ℓ_i + (λ + λ_d)·I) v.
        """
        if not (isinstance(V, Tensor) and V.ndim == 3 and V.shape[2] == self.dim):
            raise ShapeMismatchError(
                f"HessianOperator.sampled_matvec: vectors must have shape (R, k, {self.dim}), got "
                f"{tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__}.")
        if not (isinstance(indices, Tensor) and indices.ndim == 2
                and indices.shape[0] == V.shape[0]):
            raise ShapeMismatchError(
                f"HessianOperator.sampled_matvec: indices must have shape (R, b) with R = "
                f"{V.shape[0]} groups, got {tuple(getattr(indices, 'shape', ()))}.")
        rows, _ = as_rows(V.reshape(-1, self.dim), self.dim, self.dtype, self.device,
                          "HessianOperator.sampled_matvec")
        V = rows.reshape(V.shape)
        R, b = indices.shape
        X, y = self.data.take(indices.reshape(-1), self.device, self.dtype)
        X = map_inputs(lambda t: t.reshape(R, b, *t.shape[1:]), X)
        y = y.reshape(R, b, *y.shape[1:])
        out = self._grouped_hvp_sum(V, X, y)
        self.num_matvecs += R * V.shape[1]
        return out / b + self.shift * V

    def dense(self, block: int = 256) -> Tensor:
        """The explicit matrix A = H + λ_d·I, ``(p, p)``, built from blocks of identity columns."""
        p = self.dim
        A = torch.empty(p, p, dtype=self.dtype, device=self.device)
        starts = range(0, p, block)
        for start in tqdm(starts, desc="Hessian columns", disable=not self.progress):
            stop = min(start + block, p)
            E = torch.zeros(stop - start, p, dtype=self.dtype, device=self.device)
            E[:, start:stop] = torch.eye(stop - start, dtype=self.dtype, device=self.device)
            A[start:stop] = self.matvec(E)
        for start in range(0, p, block):  # (A + Aᵀ)/2 in place, one (block × p) strip at a time
            stop = min(start + block, p)
            strip = 0.5 * (A[start:stop] + A[:, start:stop].T)
            A[start:stop] = strip
            A[:, start:stop] = strip.T
        return A

    def _modes(self, block: int) -> list[str]:
        if self.mode not in ("auto", "timed"):
            return [self.mode]
        order = list(_MODES)
        if block >= SMALL_BLOCK and self._large_block_mode in order:
            order.remove(self._large_block_mode)
            order.insert(0, self._large_block_mode)
        return [m for m in order if m not in self._failed_modes]

    def _timed_choice(self, V: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """Form one large block both ways, keep the faster mode; the product of that mode."""
        timings: dict[str, float] = {}
        results: dict[str, Tensor] = {}
        for mode in ("forward-over-reverse", "reverse-over-reverse"):
            if mode in self._failed_modes:
                continue
            _synchronize(self.device)
            start = time.perf_counter()
            try:
                results[mode] = _HVP_BY_MODE[mode](self._batch_loss(X, y), self.theta, V)
            except OUT_OF_MEMORY:
                raise
            except Exception as error:
                if not is_transform_limitation(error):
                    raise
                logger.warning("Hessian-vector products by %s are not available for this model "
                               "(%s).", mode, first_line(error))
                self._failed_modes.add(mode)
                continue
            _synchronize(self.device)
            timings[mode] = time.perf_counter() - start
        if not timings:
            self._large_block_mode = "loop"
            return self._products_in_order(V, X, y)
        # decided once, by process 0, so that every process forms its products the same way
        self._large_block_mode = distributed.broadcast(min(timings, key=timings.__getitem__))
        logger.info("Hessian-vector products of %d vectors: %s; using %s for this operator.",
                    V.shape[0], {k: round(v, 4) for k, v in timings.items()},
                    self._large_block_mode)
        return results[self._large_block_mode]

    def _data_hvp_sum(self, V: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """Σ_{i in batch} C_i · v for each row v of V (no regulariser, no damping)."""
        if self.curvature == "gauss-newton":
            return self._data_ggn_sum(V, X, y)
        if self.mode == "timed" and V.shape[0] >= SMALL_BLOCK and self._large_block_mode is None:
            return self._timed_choice(V, X, y)
        return self._products_in_order(V, X, y)

    def _products_in_order(self, V: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """Products by the first mode that can transform the model (module docstring)."""
        modes = self._modes(V.shape[0])
        last_error: BaseException | None = None
        for position, mode in enumerate(modes):
            try:
                return _HVP_BY_MODE[mode](self._batch_loss(X, y), self.theta, V)
            except OUT_OF_MEMORY:
                raise  # a fallback would only be slower and fail again
            except Exception as error:
                if not is_transform_limitation(error):
                    raise  # the model's or the objective's own error: never retried or hidden
                last_error = error
                self._failed_modes.add(mode)
                if position < len(modes) - 1:
                    logger.warning("Hessian-vector products by %s are not available for this "
                                   "model (%s); using %s.", mode, first_line(error),
                                   modes[position + 1])
        raise unsupported_second_derivatives(self.gradients.tracked.model,
                                             last_error or RuntimeError("no product mode left"),
                                             self.curvature)

    def _data_ggn_sum(self, V: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """Σ_{i in batch} J_iᵀ ∇²_f ℓ_i J_i · v for each row v of V."""
        if self._vectorized_ggn:
            try:
                return _gauss_newton_product(self.gradients, self.theta, V, X, y, vmap)
            except OUT_OF_MEMORY:
                raise  # a fallback would only be slower and fail again
            except Exception as error:
                if not is_transform_limitation(error):
                    raise
                logger.warning("Gauss-Newton products under vmap are not available for this "
                               "model (%s); looping over vectors.", first_line(error))
                self._vectorized_ggn = False
        try:
            return _gauss_newton_product(self.gradients, self.theta, V, X, y, _loop_map)
        except OUT_OF_MEMORY:
            raise
        except Exception as error:
            if is_transform_limitation(error):
                raise unsupported_second_derivatives(self.gradients.tracked.model, error,
                                                     self.curvature) from error
            raise

    def _grouped_hvp_sum(self, V: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """``_data_hvp_sum`` for R groups at once (group r: vectors V[r], examples X[r])."""
        modes = self._modes(V.shape[1])
        mode = modes[0] if modes else "loop"
        if self._grouped_vmap and mode != "loop":
            try:
                if self.curvature == "gauss-newton":
                    return vmap(lambda V_r, X_r, y_r: _gauss_newton_product(
                        self.gradients, self.theta, V_r, X_r, y_r, vmap))(V, X, y)
                return vmap(lambda V_r, X_r, y_r: _HVP_BY_MODE[mode](
                    self._batch_loss(X_r, y_r), self.theta, V_r))(V, X, y)
            except OUT_OF_MEMORY:
                raise  # a fallback would only be slower and fail again
            except Exception as error:
                if not is_transform_limitation(error):
                    raise
                logger.info("Grouped vmap of curvature products is not available for this "
                            "model (%s); looping over groups.", first_line(error))
                self._grouped_vmap = False
        return torch.stack([self._data_hvp_sum(V[r], rows_of(X, r), y[r])
                            for r in range(V.shape[0])])

    def _batch_loss(self, X: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
        def loss(theta: Tensor) -> Tensor:
            return self.gradients.losses(theta, X, y).sum()

        return loss


def _forward_over_reverse(loss: Callable[[Tensor], Tensor], theta: Tensor, V: Tensor) -> Tensor:
    gradient = grad(loss)
    return vmap(lambda v: jvp(gradient, (theta,), (v,))[1])(V)


def _reverse_over_reverse(loss: Callable[[Tensor], Tensor], theta: Tensor, V: Tensor) -> Tensor:
    _, pullback = vjp(grad(loss), theta)
    return vmap(lambda v: pullback(v)[0])(V)


def _autograd_loop(loss: Callable[[Tensor], Tensor], theta: Tensor, V: Tensor) -> Tensor:
    with torch.enable_grad():
        leaf = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
        rows = [torch.autograd.grad(g @ v, leaf, retain_graph=True)[0] for v in V]
    return torch.stack(rows)


def _probed_hessian_norms(loss: Callable[[Tensor, Tensor], Tensor], f: Tensor, y: Tensor,
                          Z: Tensor) -> Tensor:
    """sqrt(mean_z ‖∇²_f ℓ(f_i, y_i) z‖²) for each example i, ``(b,)``; ``Z`` holds the probes."""

    def one(f_i: Tensor, y_i: Tensor) -> Tensor:
        def gradient(g: Tensor) -> Tensor:
            return grad(loss)(g, y_i)

        return vmap(lambda z: jvp(gradient, (f_i,), (z,))[1])(Z)

    return vmap(one)(f, y).flatten(2).pow(2).sum(2).mean(1).sqrt()


def _synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that wall-clock timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loop_map(function: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda V: torch.stack([function(v) for v in V])


def _gauss_newton_product(gradients: GradientComputer, theta: Tensor, V: Tensor, X: Tensor,
                          y: Tensor, mapper: Callable) -> Tensor:
    """Σ_i J_iᵀ (∇²_f ℓ_i) J_i v for each row v: J v forward, the output Hessian, Jᵀ backward."""
    tracked, objective = gradients.tracked, gradients.objective

    def outputs(t: Tensor) -> Tensor:
        return tracked.forward(t, X)

    def output_loss(f: Tensor) -> Tensor:
        return objective.train_loss(f, y).sum()

    f, pullback = vjp(outputs, theta)
    output_gradient = grad(output_loss)

    def product(v: Tensor) -> Tensor:
        _, Jv = jvp(outputs, (theta,), (v,))
        _, HJv = jvp(output_gradient, (f,), (Jv,))
        return pullback(HJv)[0]

    return mapper(product)(V)


_HVP_BY_MODE = {
    "forward-over-reverse": _forward_over_reverse,
    "reverse-over-reverse": _reverse_over_reverse,
    "loop": _autograd_loop,
}
