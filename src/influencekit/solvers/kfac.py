"""K-FAC and EK-FAC: Kronecker-factored Gauss-Newton inverses, per Linear and Conv2d layer.

For a layer with inputs a (bias folded in as a trailing 1) and pre-activation outputs z, the
Gauss-Newton block of its weights W (out × in) is

    G_W = (1/n) Σ_i Σ_c vec(s_ic a_iᵀ) vec(s_ic a_iᵀ)ᵀ,     s_ic = ∂(L_icᵀ f(x_i)) / ∂z_i,

where ∇²_f ℓ(f_i, y_i) = L_i L_iᵀ. Summing over the columns c of L takes the exact expectation over
the model's predictive distribution (for cross-entropy L_i L_iᵀ = diag(p) − p pᵀ) instead of one
sampled label. K-FAC (Martens & Grosse 2015) approximates

    G_W ≈ S ⊗ A,    S = (1/n) Σ_{i,t,c} s_itc s_itcᵀ,    A = (1/(n T)) Σ_{i,t} a_it a_itᵀ

(t runs over the T spatial positions of a convolution, as in KFC, Grosse & Martens 2016, or over
the extra dimensions of a Linear input; T = 1 otherwise). With S = Q_S Λ_S Q_Sᵀ and
A = Q_A Λ_A Q_Aᵀ, the damped inverse is applied exactly in that eigenbasis:

    (G_W + δ I)⁻¹ v = Q_S [(Q_Sᵀ V Q_A) / (λ_S λ_Aᵀ + δ)] Q_Aᵀ,    δ = λ + λ_d.

Before the eigendecomposition, ``refine=m`` takes m alternating least-squares steps toward the
Kronecker product nearest to the layer's Gauss-Newton block in Frobenius norm (Van Loan &
Pitsianis 1993; Koroko et al. 2022, arXiv:2201.10285, use it for the Fisher). Writing the
block as the sum of per-example Kronecker products (1/n) Σ_{i,t} S_it ⊗ a_it a_itᵀ, with
S_it = Σ_c s_itc s_itcᵀ (for a convolution, KFC's spatially uncorrelated model), the steps
alternate

    A ← (1/n) Σ_{i,t} a_it a_itᵀ · tr(S_it Ŝ),       S ← Ŝ = S/‖S‖_F     (odd steps)
    S ← (1/n) Σ_{i,t} S_it · a_itᵀ Â a_it,            A ← Â = A/‖A‖_F     (even steps)

and each is the exact least-squares fit of one factor given the other to that sum, so the
distance ‖Σ − S ⊗ A‖_F never grows from K-FAC's. For a Linear layer (T = 1) the sum is G_W
itself; for a convolution it is KFC's model, and the distance to the true G_W can move either
way by a little. The expectation factors treat a and s as independent; an example whose
outputs carry much curvature (an uncertain prediction) weighs its activations more here. Each
step costs one more pass over the training data. One step is the default: on the benchmark of
``benchmarks/`` it raises EK-FAC's agreement with the exact influence from Pearson 0.719 to 0.768,
and it raised both K-FAC's and EK-FAC's in all 16 settings of
``benchmarks/kronecker_refinement.py`` (four small classifiers, two weight decays, two dampings).

EK-FAC (George et al. 2018) keeps the eigenbasis but replaces λ_S λ_Aᵀ by the exact second moments
of the projected per-example gradients, Λ*_{jk} = (1/n) Σ_{i,c} [(Q_Sᵀ G_ic Q_A)_{jk}]², the
Frobenius-closest diagonal in that basis — so EK-FAC is never farther from G than K-FAC.

``samples=r`` replaces the K pullbacks per example by r random-sign combinations
σ_ic = Σ_c ξ_icr L_ic / √r, with Rademacher signs ξ fixed by (seed, example index, column,
draw). Since E[ξ ξᵀ] = I, every sum above that is quadratic in s (S, the refinement's weights,
the corrected eigenvalues) keeps its expectation: the estimate is unbiased, costs r instead of
K backward passes per example, and works for any loss (a sampled-label Fisher needs a
likelihood to sample from). The signs depend only on the example, so the same data gives the
same factors in any chunking and any number of processes. The fallback diagonal below is then
estimated from the same combinations.

An objective whose loss is a sum over output positions of terms in that position's outputs
only (a language model's tokens: :meth:`~influencekit.Objective.position_hessian_roots`) has a
block-diagonal output Hessian: its root is given one V × V block at a time instead of as a
T·V × T·V matrix (any root: every expectation above is quadratic in L, so the same for all
roots), and with ``samples`` the combinations L_t ξ_t are formed per position, for the causal
LM in closed form, so their cost does not grow with T·V.

Layers are independent blocks (block-diagonal G). Tracked parameters outside supported layers
(other module types, grouped or ``padding="same"`` convolutions, a bias tracked without its
weight) fall back to the diagonal of G, (1/n) Σ_{i,c} (J_iᵀ L_ic)², with a log message.
Both solvers approximate the Gauss-Newton matrix whatever the Influence's ``curvature``; their
reports say so (``curvature="gauss-newton"`` and a note when the operator's is the Hessian).

The damping δ = λ + λ_d is added in the eigenbasis. With a weight decay that differs between a
layer's weight and its bias (``weight_decay={"": λ, "bias": 0}``), diag(λ) is not diagonal in
that basis; its diagonal there, δ_jk = λ_d + Σ_i (Q_A)_ik² λ_i (λ_i that of input column i, the
bias column last), is used: exact when λ is uniform, and the Frobenius-nearest diagonal otherwise.
With neither weight decay nor damping, K-FAC's factors are often singular (a dead unit, a
constant input); that is refused with the setting to change rather than returning inf.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, hessian, vmap
from tqdm.auto import tqdm

from .. import arguments, distributed
from ..curvature import HessianOperator
from ..errors import CacheMismatchError, IndefiniteHessianError
from ..factored_queries import LayerQueries, inverse_factors, layer_queries, shared_rank
from ..inputs import Inputs, map_inputs, rows_of
from ..layers import (
    LayerBlock,
    find_blocks,
    layer_signals,
    weight_matrix,
)
from ..randomness import rademacher
from ..spectrum import SpectrumEstimate
from ..transforms import is_transform_limitation
from .base import ApproximateInverse

logger = logging.getLogger(__name__)


#: the most bytes of one layer's (k, out, in) work arrays formed at once when applying
APPLY_BYTES = 64 * 2**20


@dataclass
class _Block(LayerBlock):
    """One Linear/Conv2d layer (:class:`~influencekit.layers.LayerBlock`) and its factors."""

    A: Tensor | None = None
    S: Tensor | None = None
    Q_A: Tensor | None = None
    Q_S: Tensor | None = None
    scale: Tensor | None = None  # (out, in): λ_S λ_Aᵀ for K-FAC, Λ* for EK-FAC
    decay: Tensor | float = 0.0  # (1, in): the weight decay's diagonal in the eigenbasis


class KFAC(ApproximateInverse):
    """Kronecker-factored Gauss-Newton inverse (K-FAC / KFC), exact-expectation factors.

    Args:
        chunk_size: training examples per pass (``None``: the operator's chunk size).
        progress: show progress bars over the passes.
        verify: report the relative residual ‖A·x − v‖/‖v‖ against the operator's exact
            curvature (one more batched product); otherwise it is reported as NaN.
        refine: alternating least-squares steps from K-FAC's factors toward the Frobenius-
            nearest Kronecker product (see the module docstring); each is one more pass over the
            training data. The default 1 fits A to K-FAC's S; 0 keeps the expectation factors of
            Martens & Grosse (the published K-FAC and EK-FAC).
        tol: with ``verify``, the residual ``converged`` is judged by (``None``: not judged).
        samples: ``None`` (default): the exact expectation over the output Hessian's K
            square-root columns, K pullbacks per example. An integer r: r random-sign
            combinations of them (see the module docstring), an unbiased estimate for K/r of the
            cost; the report's notes say so.
        seed: the signs' seed when ``samples`` is set.
    """

    name = "kfac"
    eigenvalue_correction = False

    def __init__(self, chunk_size: int | None = None, progress: bool = False,
                 verify: bool = False, refine: int = 1, tol: float | None = None,
                 samples: int | None = None, seed: int = 0) -> None:
        super().__init__(verify=verify, tol=tol)
        self.samples = (None if samples is None
                        else arguments.integer("samples", samples, minimum=1))
        self.seed = arguments.seed("seed", seed)
        self.refine = arguments.integer("refine", refine, minimum=0)  # least-squares steps
        self.chunk_size = arguments.optional_positive_integer("chunk_size", chunk_size)
        self.progress = arguments.flag("progress", progress)
        self.blocks_: list[_Block] = []
        self.fallback_: Tensor | None = None  # indices into θ
        self.fallback_diagonal_: Tensor | None = None
        self._fitted_for: HessianOperator | None = None

    @property
    def curvature(self) -> str:
        return "gauss-newton"

    def unprepared_copy(self) -> KFAC:
        duplicate = super().unprepared_copy()
        duplicate._fitted_for = None
        duplicate.blocks_ = []
        duplicate.fallback_ = duplicate.fallback_diagonal_ = None
        return duplicate

    # ----------------------------------------------------------------- preparation

    def prepare(self, operator: HessianOperator) -> KFAC:
        super().prepare(operator)
        self._fit(operator)
        self._check_invertible()
        return self

    def spectrum_estimate(self, operator: HessianOperator) -> SpectrumEstimate:
        """The extreme eigenvalues of the Kronecker-factored Gauss-Newton approximation (with
        the weight decay), from its factors (which ``prepare`` then reuses)."""
        self._fit(operator)
        low, high = self._eigenvalue_range(damping=0.0)
        return SpectrumEstimate(low, high, f"{self.name} factors", True)  # of the approximation

    def _eigenvalue_range(self, damping: float) -> tuple[float, float]:
        lows, highs = [], []
        for block in self.blocks_:
            values = block.scale + block.decay + damping
            lows.append(float(values.min()))
            highs.append(float(values.max()))
        if self.fallback_ is not None and self.fallback_.numel():
            values = self.fallback_diagonal_ + self._fallback_decay() + damping
            lows.append(float(values.min()))
            highs.append(float(values.max()))
        return (min(lows), max(highs)) if lows else (damping, damping)

    def _check_invertible(self) -> None:
        """Refuse a singular approximation: some eigenvalue S⊗A + λ + λ_d at round-off level."""
        low, high = self._eigenvalue_range(self.operator.damping)
        floor = torch.finfo(self.operator.dtype).eps * max(high, 1e-300)
        if low <= floor:
            raise IndefiniteHessianError(
                f"{type(self).__name__}'s Kronecker-factored Gauss-Newton approximation is "
                f"singular: its smallest eigenvalue is {low:.3g} (largest {high:.3g}) with weight "
                f"decay {_describe_decay(self.operator.decay)} and damping "
                f"{self.operator.damping:g}, so its inverse would be infinite. Set damping > 0 "
                f"(e.g. damping={max(1e-3 * high, 1e-8):.2g}, or damping='auto'), or a weight "
                "decay > 0."
            )

    def _fit(self, operator: HessianOperator) -> None:
        """Factors, eigenbases and (EK-FAC) corrected eigenvalues: computed once per operator;
        none of them depends on the damping."""
        if self._fitted_for is operator:
            return
        self._layout(operator)
        rest = self.fallback_.tolist()
        if rest:
            logger.info("%s: %d tracked parameters outside Linear/Conv2d layers use the diagonal "
                        "of the Gauss-Newton matrix.", type(self).__name__, len(rest))
        self._accumulate_factors()
        for step in range(self.refine):
            self._refine_factors(update_activations=step % 2 == 0)
        self._eigendecompose()
        if self.eigenvalue_correction:
            self._correct_eigenvalues()
        self._rotate_decay()
        if rest:
            self._fallback_diagonal()
        self._fitted_for = operator

    def _layout(self, operator: HessianOperator) -> None:
        """The Linear/Conv2d blocks of the tracked parameters and the fallback coordinates."""
        self._operator = operator
        self.blocks_, self.fallback_ = find_blocks(operator.gradients.tracked, _Block)

    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        tensors: dict[str, Tensor] = {}
        for i, block in enumerate(self.blocks_):
            for field_name in ("A", "S", "Q_A", "Q_S", "scale"):
                tensors[f"blocks/{i}/{field_name}"] = getattr(block, field_name)
            if isinstance(block.decay, Tensor):
                tensors[f"blocks/{i}/decay"] = block.decay
        if self.fallback_ is not None and self.fallback_.numel():
            tensors["fallback_diagonal"] = self.fallback_diagonal_
        decays = [None if isinstance(b.decay, Tensor) else b.decay for b in self.blocks_]
        return tensors, {"blocks": [block.name for block in self.blocks_], "decays": decays}

    def restore(self, operator: HessianOperator, tensors: dict[str, Tensor],
                values: dict) -> KFAC:
        super().restore(operator, tensors, values)
        self._layout(operator)
        names = [block.name for block in self.blocks_]
        if names != values["blocks"]:
            raise CacheMismatchError(
                f"The saved {type(self).__name__} factors are for the layers {values['blocks']}, "
                f"this model has {names}.")
        device = operator.device
        for i, (block, decay) in enumerate(zip(self.blocks_, values["decays"], strict=True)):
            for field_name in ("A", "S", "Q_A", "Q_S", "scale"):
                setattr(block, field_name, tensors[f"blocks/{i}/{field_name}"].to(device))
            block.decay = tensors[f"blocks/{i}/decay"].to(device) if decay is None else decay
        if self.fallback_.numel():
            self.fallback_diagonal_ = tensors["fallback_diagonal"].to(device)
        self._fitted_for = operator
        self._check_invertible()
        return self

    def _rotate_decay(self) -> None:
        """Each block's weight decay as its diagonal in the eigenbasis, (1, in) (or a float)."""
        decay = self.operator.decay
        for block in self.blocks_:
            if not isinstance(decay, Tensor):
                block.decay = float(decay)
                continue
            columns = weight_matrix(block, decay[None])[0][0]  # (in,), bias column last
            block.decay = ((block.Q_A.pow(2) * columns[:, None]).sum(dim=0))[None, :]

    def _fallback_decay(self) -> Tensor | float:
        decay = self.operator.decay
        return decay[self.fallback_] if isinstance(decay, Tensor) else float(decay)

    def _batches(self, description: str):
        op = self.operator
        size = self.chunk_size or op.chunk_size
        batches = op.data.local_batches(size, op.device, op.dtype)  # this process's rows
        return tqdm(batches, desc=description, leave=False, disable=not self.progress)

    def _output_hessian_roots(self, outputs: Tensor, y: Tensor) -> Tensor:
        """L with ∇²_f ℓ_i = L_i L_iᵀ, shape (K, b, *output_shape[1:]) (K = outputs per example).

        L_i is the symmetric root. With an objective whose output Hessian is block diagonal
        over positions (:meth:`Objective.position_hessian_roots`), the objective's root of
        each V × V block is used and column (t, c) of L_i is nonzero at position t only.
        """
        objective = self.operator.gradients.objective
        b = outputs.shape[0]
        roots = objective.position_hessian_roots(outputs.detach(), y)
        if roots is not None:
            roots = roots.to(outputs.dtype)  # (b, T, V, V)
            T, V = roots.shape[1], roots.shape[2]
            full = torch.zeros(T, V, b, T, V, dtype=outputs.dtype, device=outputs.device)
            for t in range(T):  # column (t, c) of L_i: root_t[:, c] at position t
                full[t, :, :, t, :] = roots[:, t].permute(2, 0, 1)
            return full.reshape(T * V, b, T, V)
        flat = outputs.detach().reshape(b, -1)
        shape = outputs.shape[1:]

        def loss(f: Tensor, target: Tensor) -> Tensor:
            return objective.train_loss(f.reshape(1, *shape), target.unsqueeze(0)).sum()

        H = objective.output_hessian(outputs.detach(), y)  # closed form, where there is one
        if H is None:
            H = vmap(hessian(loss))(flat, y)  # (b, K, K)
        roots = _symmetric_roots(H).to(flat.dtype)
        return roots.permute(2, 0, 1).reshape(-1, b, *shape)  # column c of L_i at [c, i]

    def _pullback_columns(self, outputs: Tensor, y: Tensor, rows: slice) -> Tensor:
        """What is pulled back through the network per example: the K root columns, or with
        ``samples=r`` their r random-sign combinations Σ_c ξ_c L_ic / √r, ``(K or r, b, ...)``.

        With per-position blocks and ``samples`` the combinations are formed block by block,
        never the (K, b, T, V) layout: Σ_(t,c) ξ_(t,c) L[:, (t,c)] has L_t ξ_t at position t
        (:meth:`Objective.position_root_times`, a closed form for the causal LM: O(V) each).
        """
        objective = self.operator.gradients.objective
        indices = torch.arange(rows.start, rows.stop, device=outputs.device)
        if self.samples is not None and outputs.dim() == 3:
            b, T, V = outputs.shape
            signs = rademacher(indices, T * V, self.samples, self.seed)
            signs = signs.to(outputs.dtype).reshape(self.samples, b, T, V)
            combined = objective.position_root_times(outputs.detach(), y, signs)
            if combined is not None:
                return combined.to(outputs.dtype) / math.sqrt(self.samples)
        roots = self._output_hessian_roots(outputs, y)  # (K, b, ...)
        if self.samples is None:
            return roots
        signs = rademacher(indices, roots.shape[0], self.samples, self.seed)
        combined = torch.einsum("rbk,kb...->rb...", signs.to(roots.dtype), roots)
        return combined / math.sqrt(self.samples)

    def _pass(self, description: str):
        """Per chunk: for each block, (a (b, T, in), s (K, b, T, out)); K = ``samples`` when
        set (random-sign combinations of the output Hessian's roots)."""
        op = self.operator
        for rows, X, y in self._batches(description):
            def pull_back(outputs: Tensor, y: Tensor = y, rows: slice = rows
                          ) -> tuple[Tensor, Tensor]:
                return outputs, self._pullback_columns(outputs, y, rows)

            yield layer_signals(op.gradients.tracked, op.theta, X, self.blocks_, pull_back)[1]

    def _accumulate_factors(self) -> None:
        n = self.operator.num_train
        for block in self.blocks_:
            block.A = torch.zeros(block.in_features, block.in_features,
                                  dtype=self.operator.dtype, device=self.operator.device)
            block.S = torch.zeros(block.out_features, block.out_features,
                                  dtype=self.operator.dtype, device=self.operator.device)
        def local_sums() -> None:
            for chunk in self._pass("Kronecker factors"):
                for block, (a, s) in zip(self.blocks_, chunk, strict=True):
                    T = a.shape[1]
                    a_flat = a.reshape(-1, a.shape[-1])
                    s_flat = s.reshape(-1, s.shape[-1])
                    block.A += a_flat.T @ a_flat / (n * T)
                    block.S += s_flat.T @ s_flat / n

        distributed.together(local_sums)
        for block in self.blocks_:
            distributed.all_reduce(block.A)
            distributed.all_reduce(block.S)

    def _refine_factors(self, update_activations: bool) -> None:
        """One least-squares step on every block's factors, one pass over the training data.

        ``update_activations``: A ← (1/n) Σ_{i,t} a_it a_itᵀ · Σ_c s_itcᵀ Ŝ s_itc with
        Ŝ = S/‖S‖_F, and S ← Ŝ. Otherwise S ← (1/n) Σ_{i,t,c} (a_itᵀ Â a_it) s_itc s_itcᵀ with
        Â = A/‖A‖_F, and A ← Â. Shapes: A (in, in), S (out, out); per chunk a is (b, T, in) and
        s is (K, b, T, out). A zero factor stays zero.
        """
        n = self.operator.num_train
        fixed = []
        for block in self.blocks_:
            factor = block.S if update_activations else block.A
            norm = factor.norm()
            fixed.append(factor / norm if norm > 0 else factor)
        updated = [torch.zeros_like(block.A if update_activations else block.S)
                   for block in self.blocks_]
        def local_sums() -> None:
            for chunk in self._pass("Kronecker factor refinement"):
                for total, F_fixed, (a, s) in zip(updated, fixed, chunk, strict=True):
                    a_flat = a.reshape(-1, a.shape[-1])  # (b·T, in)
                    s_flat = s.reshape(s.shape[0], -1, s.shape[-1])  # (K, b·T, out)
                    if update_activations:  # weight_it = Σ_c s_itcᵀ Ŝ s_itc = tr(S_it Ŝ)
                        weight = ((s_flat @ F_fixed) * s_flat).sum(dim=(0, 2))
                        total += (a_flat * weight[:, None]).T @ a_flat / n
                    else:  # weight_it = a_itᵀ Â a_it
                        weight = ((a_flat @ F_fixed) * a_flat).sum(dim=1)
                        weighted = s_flat * weight.clamp_min(0).sqrt()[None, :, None]
                        weighted = weighted.reshape(-1, weighted.shape[-1])
                        total += weighted.T @ weighted / n

        distributed.together(local_sums)
        for total in updated:
            distributed.all_reduce(total)
        for block, F_fixed, total in zip(self.blocks_, fixed, updated, strict=True):
            if update_activations:
                block.A, block.S = total, F_fixed
            else:
                block.A, block.S = F_fixed, total

    def _eigendecompose(self) -> None:
        for block in self.blocks_:
            lam_A, Q_A = torch.linalg.eigh(block.A.double())
            lam_S, Q_S = torch.linalg.eigh(block.S.double())
            dtype = self.operator.dtype
            # row-major, as a saved fit reloads them: bit-identical products after a load
            block.Q_A, block.Q_S = Q_A.to(dtype).contiguous(), Q_S.to(dtype).contiguous()
            block.scale = torch.outer(lam_S.clamp_min(0), lam_A.clamp_min(0)).to(dtype)

    def _correct_eigenvalues(self) -> None:
        n = self.operator.num_train
        corrected = [torch.zeros_like(block.scale) for block in self.blocks_]
        def local_sums() -> None:
            for chunk in self._pass("EK-FAC eigenvalues"):
                for total, block, (a, s) in zip(corrected, self.blocks_, chunk, strict=True):
                    a_rot = a @ block.Q_A  # (b, T, in)
                    s_rot = s @ block.Q_S  # (K, b, T, out)
                    if a.shape[1] == 1:
                        total += (s_rot[:, :, 0].pow(2).sum(0)).T @ a_rot[:, 0].pow(2) / n
                    else:
                        per_example = torch.einsum("kbto,bti->kboi", s_rot, a_rot)
                        total += per_example.pow(2).sum(dim=(0, 1)) / n

        distributed.together(local_sums)
        for total in corrected:
            distributed.all_reduce(total)
        for block, total in zip(self.blocks_, corrected, strict=True):
            block.scale = total

    def _fallback_diagonal(self) -> None:
        """(1/n) Σ_{i,c} (J_iᵀ L_ic)² on the fallback coordinates."""
        op = self.operator
        tracked = op.gradients.tracked
        theta = op.theta.detach()
        diagonal = torch.zeros(self.fallback_.numel(), dtype=op.dtype, device=op.device)

        def pseudo_loss(th: Tensor, x: Inputs, root: Tensor) -> Tensor:
            """Σ f(x)·root for one example; batched: x and root keep their batch dimension."""
            return (tracked.forward(th, x) * root).sum()

        for rows, X, y in self._batches("Gauss-Newton diagonal"):
            with torch.no_grad():
                outputs = tracked.forward(theta, X)
            roots = self._pullback_columns(outputs, y, rows)  # (K or samples, b, ...)
            for root in roots:
                G = self._pseudo_gradients(pseudo_loss, theta, X, root)
                diagonal += G[:, self.fallback_].pow(2).sum(dim=0)
        self.fallback_diagonal_ = distributed.all_reduce(diagonal) / op.num_train

    def _pseudo_gradients(self, pseudo_loss: Callable[[Tensor, Inputs, Tensor], Tensor],
                          theta: Tensor, X: Inputs, root: Tensor) -> Tensor:
        """``(b, p)``: ∇_θ pseudo_loss(θ, x_i, root_i) per example (``pseudo_loss`` takes a batch
        of one); vmap where the model allows
        it, else one example at a time (models with data-dependent control flow, such as
        Hugging Face attention masks)."""
        gradients = self.operator.gradients
        if gradients.vectorize:
            def single(th: Tensor, x: Inputs, r: Tensor) -> Tensor:
                return pseudo_loss(th, map_inputs(lambda t: t.unsqueeze(0), x), r.unsqueeze(0))

            try:
                return vmap(grad(single), in_dims=(None, 0, 0))(theta, X, root)
            except Exception as error:
                if not is_transform_limitation(error):
                    raise
        rows = []
        for i in range(root.shape[0]):
            with torch.enable_grad():
                leaf = theta.detach().requires_grad_(True)
                value = pseudo_loss(leaf, rows_of(X, slice(i, i + 1)), root[i : i + 1])
                rows.append(torch.autograd.grad(value, leaf)[0])
        return torch.stack(rows)

    # ----------------------------------------------------------------- solving

    def _apply_sqrt(self, V: Tensor) -> Tensor:
        return self._apply(V, 0.5)

    def _apply(self, V: Tensor, power: float = 1.0) -> Tensor:
        """(G̃ + δI)^(−power) V in each layer's eigenbasis (power 1: the inverse, ½: its root)."""
        damping = self.operator.damping
        out = torch.empty_like(V)
        largest = max((block.out_features * block.in_features for block in self.blocks_),
                      default=1)
        group = max(1, APPLY_BYTES // (largest * V.element_size()))  # rows at a time
        for block in self.blocks_:
            denominator = (block.scale + block.decay + damping) ** power
            for first in range(0, V.shape[0], group):
                rows = slice(first, first + group)
                W = block.Q_S.T @ weight_matrix(block, V[rows]) @ block.Q_A
                W = block.Q_S @ (W / denominator) @ block.Q_A.T
                if block.bias is not None:
                    out[rows, block.bias] = W[:, :, -1]
                    W = W[:, :, :-1]
                if block.transposed:
                    W = W.transpose(1, 2)
                out[rows, block.weight] = W.reshape(W.shape[0], -1)
        if self.fallback_ is not None and self.fallback_.numel():
            shift = self._fallback_decay() + damping
            out[:, self.fallback_] = (V[:, self.fallback_]
                                      / (self.fallback_diagonal_ + shift) ** power)
        return out

    def factored_queries(self, signals: list[tuple[Tensor, Tensor]], rank: int
                         ) -> list[LayerQueries]:
        """The preconditioned queries of every block, rank ``rank``, kept factored
        (:mod:`influencekit.factored_queries`), from their inputs a (m, in) and output gradients
        s (m, out) per block (one position per query). Sets :attr:`last_report` as a solve
        would (the residual is not measured). Needs no fallback parameters."""
        if self.fallback_ is not None and self.fallback_.numel():
            raise ValueError("factored queries need every tracked parameter in a layer")
        damping = self.operator.damping
        layers = []
        for block, (a, s) in zip(self.blocks_, signals, strict=True):
            denominator = block.scale + block.decay + damping
            shared = shared_rank(rank, block.out_features, block.in_features)
            layers.append(layer_queries(a, s, block.Q_A, block.Q_S, denominator,
                                        inverse_factors(denominator, shared), rank))
        note = (f"queries preconditioned in factored form and kept at rank {rank} per layer "
                "(their error is in the scoring report)")
        self.last_report = self._report(float("nan"), None, tolerance=self.tol,
                                        details=self._details(), notes=(*self._notes(), note),
                                        **self._report_fields())
        return layers

    def _notes(self) -> tuple[str, ...]:
        notes = super()._notes()
        if self.samples is not None:
            notes += (f"factors (and the Gauss-Newton diagonal of other parameters) estimated "
                      f"from {self.samples} random-sign pullback(s) per example (unbiased), "
                      "not the exact expectation",)
        return notes

    def _details(self) -> dict[str, float]:
        details = {"layers": len(self.blocks_), "refine": self.refine,
                   "fallback_parameters": int(self.fallback_.numel())}
        if self.samples is not None:  # else the exact expectation
            details["samples"] = self.samples
        return details


def _describe_decay(decay: float | Tensor) -> str:
    if isinstance(decay, Tensor):
        return f"from {float(decay.min()):g} to {float(decay.max()):g}"
    return f"{decay:g}"


class EKFAC(KFAC):
    """K-FAC's eigenbasis with eigenvalues fitted to the per-example gradients (George et al.)."""

    name = "ekfac"
    eigenvalue_correction = True


def _symmetric_roots(H: Tensor) -> Tensor:
    """Q Λ^½ Qᵀ of each symmetric PSD matrix in ``H`` (..., K, K), in float64.

    Eigenvalues at round-off level (cross-entropy's null direction) are set to zero, so that
    batch-size-dependent rounding cannot make their roots appear and vanish. The symmetric root
    is unique, unlike Q Λ^½, whose columns change sign with the eigensolver's choices (which
    random-sign combinations would see).
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(H.double())
    floor = eigenvalues.shape[-1] * torch.finfo(H.dtype).eps * \
        eigenvalues.abs().amax(dim=-1, keepdim=True)
    eigenvalues = torch.where(eigenvalues > floor, eigenvalues, 0.0)
    return (eigenvectors * eigenvalues.sqrt().unsqueeze(-2)) @ eigenvectors.transpose(-1, -2)
