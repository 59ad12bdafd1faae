"""What to differentiate: the per-example training loss and the per-example test measurement.

Convention (the paper's, and its reference code's): the training objective is

    R(θ) = (1/n) Σ_i L(z_i, θ),   L(z, θ) = ℓ(f_θ(x), y) + (λ/2)·‖θ‖²,

so every training point carries its share of the L2 regulariser (λ = ``weight_decay``, applied to
the tracked parameters θ). The test measurement has no regulariser. Influence functions are taken
with respect to R; damping is separate from λ (see ``Influence``).

A user subclasses :class:`Objective` and writes ``train_loss`` (and, if the quantity of interest on
test points is not the same loss, ``test_loss``). Both map a batch of model outputs and targets to
one number per example, shape ``(b,)``. They must be pure tensor code (no ``.item()``, no Python
branching on values) so that they run under ``torch.func.vmap``; value checks go in ``check``.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import arguments
from .errors import (
    InputTypeError,
    InvalidSettingError,
    ObjectiveMismatchError,
    UnknownParameterError,
)

#: λ for every tracked parameter (a number), per parameter name (a mapping from names,
#: module prefixes or name components to λ, ``""`` the default), or a function
#: ``(name, parameter) -> λ``
WeightDecay = Union[float, Mapping[str, float], Callable[[str, Tensor], float]]  # noqa: UP007


def _decay_value(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{where} must be a real number ≥ 0, got {value!r} "
                               f"({type(value).__name__}).")
    if not (math.isfinite(float(value)) and float(value) >= 0):
        raise InvalidSettingError(
            f"{where} must be a finite number ≥ 0 (it is the λ of (λ/2)·‖θ‖²), got {value!r}.")
    return float(value)


def _key_matches(name: str, key: str) -> bool:
    """A key matches a parameter name if its dotted components appear in the name's, in a row:
    ``"fc"`` matches ``"fc.weight"``, ``"bias"`` matches ``"fc.bias"``, ``""`` matches all."""
    if key == "":
        return True
    parts, wanted = name.split("."), key.split(".")
    return any(parts[i : i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1))


class Objective(ABC):
    """Base class: per-example training loss ℓ and test measurement, plus an L2 weight decay λ.

    Args:
        weight_decay: λ ≥ 0 of the regulariser (λ/2)·‖θ‖² folded into every training loss. A
            number applies to every tracked parameter. A mapping gives λ per parameter: its keys
            are parameter names, module prefixes or name components (``"bias"`` matches every
            ``*.bias``), the longest matching key wins and ``""`` is the default, e.g.
            ``{"": 1e-4, "bias": 0.0, "norm": 0.0}`` (most networks do not decay biases and
            normalisation weights). A function ``(name, parameter) -> λ`` decides per parameter,
            e.g. ``lambda name, p: 0.0 if p.ndim == 1 else 1e-4``. The regulariser is then
            Σ_k (λ_k/2)·‖θ_k‖² over the parameter tensors θ_k.
    """

    #: whether ℓ is convex in the model output for every target (then the Gauss-Newton matrix is
    #: positive semi-definite); the built-in losses are, a subclass says so by setting it
    convex_in_output: bool = False

    def __init__(self, weight_decay: WeightDecay = 0.0) -> None:
        if isinstance(weight_decay, Mapping):
            for key, value in weight_decay.items():
                if not isinstance(key, str):
                    raise InputTypeError(f"weight_decay keys must be parameter names or "
                                           f"prefixes (str), got {key!r}.")
                _decay_value(value, f"weight_decay[{key!r}]")
            self.weight_decay: WeightDecay = dict(weight_decay)
        elif callable(weight_decay):
            self.weight_decay = weight_decay
        else:
            self.weight_decay = _decay_value(weight_decay, "weight_decay")

    @abstractmethod
    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example data term ℓ of the training loss, shape ``(b,)`` (without the L2 term)."""

    def test_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example test measurement, shape ``(b,)``; by default the training loss ℓ."""
        return self.train_loss(outputs, targets)

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Raise :class:`ObjectiveMismatchError` if outputs/targets do not fit this objective.

        Called on real batches outside any transform, so it may inspect values. The base class
        checks that outputs and targets hold the same number of examples; subclasses add more.
        """
        _check_batch(outputs, targets, type(self).__name__)

    def output_hessian(self, outputs: Tensor, targets: Tensor) -> Tensor | None:
        """``(b, K, K)``: ∇²_f ℓ(f_i, y_i) per example in closed form for outputs ``(b, K)``,
        or ``None`` (the default), in which case it is formed by automatic differentiation."""
        return None

    def position_hessian_roots(self, outputs: Tensor, targets: Tensor) -> Tensor | None:
        """``(b, T, V, V)`` if ℓ is a sum over positions t of terms that each depend on the
        outputs at t only (outputs ``(b, T, V)``): a square root L_t of the Hessian of ℓ in f_t,
        L_t L_tᵀ = ∇²_{f_t} ℓ, one V × V block per position (the output Hessian being block
        diagonal). Any root serves: K-FAC's expectations are the same for every root.
        ``None`` (the default): no such structure; the K × K output Hessian is formed whole."""
        return None

    def position_root_times(self, outputs: Tensor, targets: Tensor,
                            vectors: Tensor) -> Tensor | None:
        """``(r, b, T, V)``: L_t z for each of r vectors z ``(r, b, T, V)`` at each position,
        with the roots of :meth:`position_hessian_roots` (``None`` if it gives none). Override
        with a closed form to avoid forming the V × V roots."""
        roots = self.position_hessian_roots(outputs, targets)
        if roots is None:
            return None
        return torch.einsum("btvc,rbtc->rbtv", roots, vectors)

    @property
    def uniform_weight_decay(self) -> float | None:
        """λ when one number applies to every parameter, else ``None``."""
        return self.weight_decay if isinstance(self.weight_decay, float) else None

    def decay_of(self, name: str, parameter: Tensor) -> float:
        """λ for the parameter tensor ``name`` (see the class docstring)."""
        spec = self.weight_decay
        if isinstance(spec, float):
            return spec
        if isinstance(spec, dict):
            matching = [key for key in spec if _key_matches(name, key)]
            if not matching:
                raise UnknownParameterError(
                    f"weight_decay gives no λ for parameter {name!r}: none of its keys "
                    f"{sorted(spec)} matches. Add a default with the key \"\".")
            longest = max(len(key) for key in matching)
            best = sorted(key for key in matching if len(key) == longest)
            values = {spec[key] for key in best}
            if len(values) > 1:
                raise InvalidSettingError(
                    f"weight_decay keys {best} match parameter {name!r} equally well and give "
                    f"different λ {sorted(values)}; use its full name as a key.")
            return float(spec[best[0]])
        return _decay_value(spec(name, parameter), f"weight_decay({name!r}, ...)")

    def decay_vector(self, named: Sequence[tuple[str, Tensor]],
                     model_names: Sequence[str] | None = None) -> float | Tensor:
        """λ per coordinate of the flat θ made of the ``named`` parameter tensors, in order.

        Returns a float when every tensor gets the same λ (the fast path everywhere), else a
        ``(p,)`` tensor in the parameters' dtype and device. Every key of a mapping must match
        some parameter of the model (``model_names``, by default those ``named``), so that a
        misspelt name is refused rather than ignored; a key for parameters that are not tracked
        is fine.
        """
        values = [self.decay_of(name, parameter) for name, parameter in named]
        if isinstance(self.weight_decay, dict):
            names = list(model_names) if model_names is not None else [n for n, _ in named]
            unused = [key for key in self.weight_decay
                      if key and not any(_key_matches(name, key) for name in names)]
            if unused:
                raise UnknownParameterError(
                    f"weight_decay keys {unused} match none of the model's parameters "
                    f"{names[:20]}.")
        if len(set(values)) <= 1:
            return values[0] if values else 0.0
        first = named[0][1]
        return torch.cat([torch.full((parameter.numel(),), value, dtype=first.dtype,
                                     device=first.device)
                          for (_, parameter), value in zip(named, values, strict=True)])

    def regularizer(self, theta: Tensor, decay: float | Tensor | None = None) -> Tensor:
        """(1/2)·Σ λ_j θ_j² for the flat vector of tracked parameters θ.

        ``decay`` is the per-coordinate λ from :meth:`decay_vector`; it may be left out when one
        number applies to every parameter.
        """
        if decay is None:
            decay = self.uniform_weight_decay
            if decay is None:
                raise InvalidSettingError(
                    "This objective's weight decay differs between parameters; pass the "
                    "per-coordinate λ: regularizer(theta, objective.decay_vector(named)).")
        return 0.5 * (decay * theta.pow(2)).sum()

    def settings(self) -> dict[str, Any]:
        """Every setting of this objective (its public attributes), for fingerprints and reports.

        Numbers, strings, tuples and dicts stay as they are; a function is named by its
        qualified name (the fingerprint of a cache also records the λ it resolves to).
        """
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}",
                **{key: _canonical(value) for key, value in sorted(vars(self).items())
                   if not key.startswith("_")}}

    def __repr__(self) -> str:
        items = ", ".join(f"{key}={value!r}" for key, value in sorted(vars(self).items())
                          if not key.startswith("_"))
        return f"{type(self).__name__}({items})"


def _canonical(value: Any) -> Any:
    """A JSON-friendly, deterministic stand-in for a setting's value."""
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)  # repr(float) round-trips exactly
    if isinstance(value, Mapping):
        return {str(key): _canonical(item) for key, item in sorted(value.items(), key=str)}
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    if isinstance(value, torch.nn.Module):
        state = [*value.named_parameters(), *value.named_buffers()]
        return {"module": repr(value),
                "state": {name: _canonical(tensor) for name, tensor in state}}
    if isinstance(value, Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"tensor": list(value.shape), "dtype": str(value.dtype),
                "sha256": hashlib.sha256(data).hexdigest()}
    if callable(value):
        return f"callable {getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', '?')}"
    return f"{type(value).__qualname__}: {value!r}"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ObjectiveMismatchError(message)


def _check_batch(outputs: Tensor, targets: Tensor, name: str) -> None:
    _require(
        outputs.ndim >= 1 and targets.ndim >= 1 and outputs.shape[0] == targets.shape[0],
        f"{name}: the model output and the targets must have the same number of examples "
        f"(first dimension); got output shape {tuple(outputs.shape)} and targets shape "
        f"{tuple(targets.shape)}.",
    )
    _require(
        outputs.is_floating_point(),
        f"{name}: the model output must be floating point, got dtype {outputs.dtype}.",
    )


class CrossEntropyObjective(Objective):
    """Multiclass cross-entropy: ℓ = −log softmax(f(x))_y.

    Shapes: outputs ``(b, C)`` logits, targets ``(b,)`` class indices in ``[0, C)`` of any
    integer dtype (int32, uint8, ... are read as int64).
    """

    convex_in_output = True

    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets.long(), reduction="none")

    def output_hessian(self, outputs: Tensor, targets: Tensor) -> Tensor | None:
        """diag(p) − p pᵀ with p = softmax(f), the Hessian of −log softmax(f)_y in f (the same
        for every label). ``None`` for a subclass that redefines ``train_loss``, whose Hessian
        this need not be."""
        if type(self).train_loss is not CrossEntropyObjective.train_loss or outputs.ndim != 2:
            return None
        p = torch.softmax(outputs.detach(), dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        name = "CrossEntropyObjective"
        _check_batch(outputs, targets, name)
        _require(
            outputs.ndim == 2,
            f"{name} expects logits of shape (batch, num_classes), got model output shape "
            f"{tuple(outputs.shape)}. For a single logit per example use BinaryLogisticObjective.",
        )
        per_example = tuple(targets.shape[1:])
        if not _is_integer(targets):
            if targets.ndim == 2 and targets.shape[1] > 1:
                advice = "one-hot rows or probabilities? Pass class indices, y.argmax(dim=1)"
            elif targets.ndim > 1:
                advice = "convert them with y.reshape(-1).long()"
            else:
                advice = "convert them with y.long()"
            raise ObjectiveMismatchError(
                f"{name} expects integer class indices, one per example; got targets of dtype "
                f"{targets.dtype} and shape {per_example} per example ({advice}).")
        _require(
            targets.ndim == 1,
            f"{name} expects one class index per example (targets of shape (n,)); got "
            f"targets of shape {per_example} per example. Flatten them with y.reshape(-1).",
        )
        num_classes = outputs.shape[1]
        _require(
            bool(((targets >= 0) & (targets < num_classes)).all()),
            f"{name}: class indices must lie in [0, {num_classes}) for a model with "
            f"{num_classes} outputs; got values from {int(targets.min())} to {int(targets.max())}.",
        )


def _is_integer(targets: Tensor) -> bool:
    return not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)


def _signed_labels(targets: Tensor, dtype: torch.dtype) -> Tensor:
    """Map labels in {0, 1} or {−1, +1} to ±1 (0 → −1)."""
    targets = targets.to(dtype)
    return torch.where(targets == 0, -torch.ones_like(targets), targets)


def _scores(outputs: Tensor) -> Tensor:
    return outputs.reshape(outputs.shape[0])


def _margins(outputs: Tensor, targets: Tensor) -> Tensor:
    """m = y·f(x) with labels read as ±1, shape ``(b,)``."""
    s = _scores(outputs)
    return _signed_labels(targets.reshape(s.shape), s.dtype) * s


def _check_binary(outputs: Tensor, targets: Tensor, name: str) -> None:
    _check_batch(outputs, targets, name)
    _require(
        outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1),
        f"{name} expects one score per example, model output of shape (batch,) or (batch, 1); "
        f"got {tuple(outputs.shape)}. For several classes use CrossEntropyObjective.",
    )
    _require(
        targets.ndim == 1 or (targets.ndim == 2 and targets.shape[1] == 1),
        f"{name} expects targets of shape (batch,), got {tuple(targets.shape)}.",
    )
    values = set(torch.unique(targets.detach().to("cpu", torch.float64)).tolist())
    _require(
        values <= {0.0, 1.0} or values <= {-1.0, 1.0},
        f"{name} expects labels in {{0, 1}} or {{-1, +1}}, got values {sorted(values)[:10]}.",
    )


class BinaryLogisticObjective(Objective):
    """Binary logistic loss on a score s = f(x): ℓ = log(1 + exp(−y·s)), y ∈ {−1, +1}.

    Labels may be given as {0, 1} (0 is read as −1) or {−1, +1}. Shapes: outputs ``(b,)`` or
    ``(b, 1)``, targets ``(b,)``.
    """

    convex_in_output = True

    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.softplus(-_margins(outputs, targets))

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        _check_binary(outputs, targets, "BinaryLogisticObjective")


class SmoothHingeObjective(Objective):
    """Smooth hinge on the margin m = y·f(x): ℓ = t·log(1 + exp((1 − m)/t)); t = 0 is max(0, 1 − m).

    As t → 0 it tends to the hinge loss (Koh & Liang 2017, §4.1). Labels in {0, 1} or {−1, +1};
    outputs ``(b,)`` or ``(b, 1)``.

    Args:
        temperature: t ≥ 0.
        weight_decay: λ of the L2 term.
    """

    convex_in_output = True

    def __init__(self, temperature: float = 0.001, weight_decay: WeightDecay = 0.0) -> None:
        super().__init__(weight_decay)
        self.temperature = arguments.non_negative("temperature (0 is the plain hinge)",
                                                  temperature)

    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        margin = _margins(outputs, targets)
        if self.temperature == 0.0:
            return torch.relu(1.0 - margin)
        t = self.temperature
        return t * F.softplus((1.0 - margin) / t)

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        _check_binary(outputs, targets, "SmoothHingeObjective")


class SquaredHingeObjective(Objective):
    """Squared hinge on the margin m = y·f(x): ℓ = max(0, 1 − m)² (scikit-learn's ``LinearSVC``
    default loss). Its first derivative is continuous; its second, 2·[m < 1], jumps at the
    margin, so influence is exact wherever no training point sits exactly on it.

    Labels in {0, 1} or {−1, +1}; outputs ``(b,)`` or ``(b, 1)``.
    """

    convex_in_output = True

    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.relu(1.0 - _margins(outputs, targets)).pow(2)

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        _check_binary(outputs, targets, "SquaredHingeObjective")


class MSEObjective(Objective):
    """Squared error, averaged over output dimensions: ℓ = mean_k (f_k(x) − y_k)².

    This is ``torch.nn.MSELoss`` per example. Shapes: outputs ``(b, ...)`` and targets of the
    same shape (targets ``(b,)`` are accepted for outputs ``(b, 1)``).
    """

    convex_in_output = True

    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        targets = targets.reshape(outputs.shape).to(outputs.dtype)
        return (outputs - targets).pow(2).reshape(outputs.shape[0], -1).mean(dim=1)

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        name = "MSEObjective"
        _check_batch(outputs, targets, name)
        _require(
            outputs.numel() == targets.numel(),
            f"{name} expects targets with the shape of the model output {tuple(outputs.shape)}; "
            f"got {tuple(targets.shape)}.",
        )
        _require(
            targets.is_floating_point() or not targets.is_complex(),
            f"{name} expects real-valued targets, got dtype {targets.dtype}.",
        )


class CausalLMObjective(Objective):
    """Next-token cross-entropy of a causal language model, summed over a sequence's tokens.

    ℓ(f(x), y) = Σ_t −log softmax(f(x)_t)[y_{t+1}] over the positions t whose next token
    y_{t+1} is not ``ignore_index`` (with ``shift=False``: Σ_t −log softmax(f(x)_t)[y_t], for
    labels already aligned with the logits). Summed, not averaged, over tokens, as in Grosse et
    al. (2023) and kronfluence: a sequence's loss grows with its counted tokens.

    Shapes: outputs ``(b, T, V)`` logits, targets ``(b, T)`` token ids of any integer dtype
    (Hugging Face's ``labels``: usually the input ids, with padding set to ``-100``).

    Args:
        ignore_index: the target value of positions that do not count: padding, and for a test
            measurement the prompt, so that the loss is −log p(completion | prompt).
        shift: whether the logits at t predict the target at t + 1 (the usual convention,
            ``labels = input_ids``); ``False`` when the targets are already shifted.
        test_measurement: ``"loss"`` (default): the test measurement is ℓ over the counted
            tokens; ``"log_prob"``: it is −ℓ, the log-probability of the counted tokens given
            what precedes them. Every score is then about that measurement: with
            ``"log_prob"`` a positive ``loo_change`` means that removing the training sequence
            would raise the log-probability.
        weight_decay: see :class:`Objective`.
    """

    convex_in_output = True

    def __init__(self, ignore_index: int = -100, shift: bool = True,
                 test_measurement: str = "loss", weight_decay: WeightDecay = 0.0) -> None:
        super().__init__(weight_decay)
        self.ignore_index = arguments.integer("ignore_index", ignore_index)
        self.shift = arguments.flag("shift", shift)
        self.test_measurement = arguments.choice("test_measurement", test_measurement,
                                                 ("loss", "log_prob"))

    def _aligned(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.shift:
            return outputs[:, :-1], targets[:, 1:]
        return outputs, targets

    def token_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``(b, T)``: ℓ_t = −log softmax(f(x)_{t−1})[y_t] at each target position t (with
        ``shift=False``: −log softmax(f(x)_t)[y_t]); 0 where y_t is ``ignore_index`` and, when
        shifted, at t = 0. The training loss is their sum over t."""
        logits, labels = self._aligned(outputs, targets.long())
        counted = labels != self.ignore_index
        safe = torch.where(counted, labels, torch.zeros_like(labels))
        tokens = F.cross_entropy(logits.transpose(1, 2), safe, reduction="none")  # (b, T')
        tokens = tokens * counted.to(tokens.dtype)
        if self.shift:
            tokens = F.pad(tokens, (1, 0))  # position 0 is predicted by nothing
        return tokens

    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.token_losses(outputs, targets).sum(dim=1)

    def _counted_positions(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``(b, T)`` 1.0 at each logit position that predicts a counted token, else 0.0."""
        labels = targets.long()
        if not self.shift:
            return (labels != self.ignore_index).to(outputs.dtype)
        counted = torch.zeros(labels.shape, dtype=outputs.dtype, device=outputs.device)
        counted[:, :-1] = (labels[:, 1:] != self.ignore_index).to(outputs.dtype)
        return counted

    def position_hessian_roots(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``(b, T, V, V)``: L_t = diag(√p_t) − p_t √p_tᵀ with p_t = softmax(f_t), at each
        logit position that predicts a counted token (zero elsewhere). L_t L_tᵀ =
        diag(p_t) − p_t p_tᵀ (as Σ_v p_tv = 1), the Hessian of −log softmax(f_t)[y] in f_t."""
        p = torch.softmax(outputs.detach(), dim=-1)
        roots = torch.diag_embed(p.sqrt()) - p.unsqueeze(-1) * p.sqrt().unsqueeze(-2)
        return roots * self._counted_positions(outputs, targets)[:, :, None, None]

    def position_root_times(self, outputs: Tensor, targets: Tensor, vectors: Tensor) -> Tensor:
        """``(r, b, T, V)``: L_t z = √p_t ⊙ z − p_t (√p_t · z), O(V) per position."""
        p = torch.softmax(outputs.detach(), dim=-1)
        root = p.sqrt()
        products = root * vectors - p * (root * vectors).sum(dim=-1, keepdim=True)
        return products * self._counted_positions(outputs, targets)[:, :, None]

    def test_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        loss = self.train_loss(outputs, targets)
        return -loss if self.test_measurement == "log_prob" else loss

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        name = "CausalLMObjective"
        _check_batch(outputs, targets, name)
        _require(outputs.ndim == 3,
                 f"{name} expects logits of shape (batch, sequence, vocabulary), got model "
                 f"output shape {tuple(outputs.shape)}. A Hugging Face model returns an object: "
                 "wrap it so that forward returns its .logits.")
        _require(_is_integer(targets) and targets.ndim == 2,
                 f"{name} expects integer token ids of shape (batch, sequence); got targets of "
                 f"dtype {targets.dtype} and shape {tuple(targets.shape)}.")
        _require(tuple(targets.shape) == tuple(outputs.shape[:2]),
                 f"{name}: targets {tuple(targets.shape)} must match the logits' (batch, "
                 f"sequence) {tuple(outputs.shape[:2])}; pad both to the same length and set the "
                 f"padded targets to ignore_index={self.ignore_index}.")
        _require(not self.shift or outputs.shape[1] >= 2,
                 f"{name} with shift=True needs sequences of at least 2 tokens, got "
                 f"{outputs.shape[1]}.")
        vocabulary = outputs.shape[2]
        counted = targets != self.ignore_index
        valid = (targets >= 0) & (targets < vocabulary)
        _require(bool((valid | ~counted).all()),
                 f"{name}: token ids must lie in [0, {vocabulary}) for a vocabulary of "
                 f"{vocabulary}, or equal ignore_index={self.ignore_index}; got values from "
                 f"{int(targets.min())} to {int(targets.max())}.")
