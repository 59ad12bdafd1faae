"""A memory budget, and the sizes that keep each stage within it.

``Influence(..., max_memory="4GB")`` sizes, before any heavy pass:

- ``chunk_size``: examples per pass, so that a chunk's per-example gradients (p numbers each:
  the stationarity sample, self-influence and the per-example scoring path form them) and its
  activations (K-FAC's passes pull back one vector per model output: K times as many) fit in a
  quarter of the budget;
- ``max_vectors``: curvature-vector products formed together per chunk, so that their forward
  and backward activations fit in another quarter;
- ``query_group``: right-hand sides solved together. Block CG keeps about six (k × p) blocks
  (solution, residual, directions, their products, the preconditioned residual, a work block),
  LiSSA about four, in a quarter of the budget;
- the solved queries held while the training data is scored (:func:`queries_held`): p numbers
  each and a per-layer copy for layer scoring, in the last quarter.

The activations of one example are measured, not guessed: one forward pass of one training
example with hooks that add up the bytes of every module's output (what autograd keeps for the
backward pass, to a small factor). A backward pass keeps about as much again, and forward-over-
reverse or reverse-over-reverse products about three times as much (the factors used below).

:func:`plan` reports the resulting sizes and, stage by stage, the estimated peak memory and the
passes over the data, so a user knows whether a job fits before starting it. The figures are
estimates of what influencekit itself allocates (the model, the data in memory and the Python
process come on top); the benchmarks measure the peak (VmHWM) against the budget.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import InputTypeError, InvalidSettingError
from .inputs import rows_of

#: the most bytes of per-example gradients formed at once where they are kept only briefly
#: (the stationarity sample, test gradients)
GRADIENT_CHUNK_BYTES = 256 * 2**20
#: the default shard of a gradient store (store/gradients.py) holds at most this many bytes
SHARD_BYTES = 256 * 2**20

if TYPE_CHECKING:
    from .influence import Influence

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
#: activations kept by a backward pass, and by a curvature-vector product, per forward's
BACKWARD_FACTOR, PRODUCT_FACTOR = 2.0, 3.0
#: (k × p) blocks a block CG solve keeps, and LiSSA's recursion
CG_BLOCKS, LISSA_BLOCKS = 6, 4


def parse_size(size: str | int | float) -> int:
    """Bytes from ``"4GB"``, ``"512 MiB"``, ``"1.5gb"`` or a number of bytes."""
    if isinstance(size, bool):
        raise InputTypeError(f"max_memory must be a size such as '4GB' or a number of bytes, "
                             f"got {size!r}.")
    if isinstance(size, int | float):
        value = float(size)
    elif isinstance(size, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", size)
        if match is None or match.group(2).lower() not in _UNITS:
            raise InvalidSettingError(
                f"max_memory must be a size such as '4GB', '512MiB' or a number of bytes; got "
                f"{size!r}.")
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        raise InputTypeError(f"max_memory must be a size such as '4GB' or a number of bytes, "
                             f"got {type(size).__name__}.")
    if not (math.isfinite(value) and value >= 2**20):
        raise InvalidSettingError(f"max_memory must be at least 1 MiB, got {size!r}.")
    return int(value)


def activation_bytes(model: nn.Module, forward: Any, X: Any) -> int:
    """Bytes of every module output in one forward pass of the batch ``X`` (one example)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        nonlocal total
        for tensor in (output if isinstance(output, tuple | list) else [output]):
            if isinstance(tensor, Tensor):
                total += tensor.numel() * tensor.element_size()

    handles = [module.register_forward_hook(hook) for module in model.modules()]
    try:
        with torch.no_grad():
            forward(X)
    finally:
        for handle in handles:
            handle.remove()
    return total


@dataclass
class Sizes:
    """What a budget allows (see the module docstring)."""

    budget: int
    parameter_bytes: int
    activation_bytes: int
    chunk_size: int
    max_vectors: int
    query_group: int


@dataclass
class Plan:
    """Estimated peak memory and passes over the data, stage by stage, before running them."""

    sizes: Sizes | None
    num_train: int
    num_test: int
    parameters: int
    stages: list[tuple[str, int, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"influencekit plan: {self.parameters:,} parameters, {self.num_train:,} "
                 f"training points, {self.num_test:,} queries"]
        if self.sizes is not None:
            s = self.sizes
            lines.append(f"budget {_show(s.budget)}: chunk_size {s.chunk_size}, max_vectors "
                         f"{s.max_vectors}, queries solved {s.query_group} at a time "
                         f"(activations {_show(s.activation_bytes)} per example)")
        lines.append(f"{'stage':<40}{'peak memory':>14}{'passes':>14}  notes")
        for name, peak, passes, note in self.stages:
            lines.append(f"{name:<40}{_show(peak):>14}{passes:>14}  {note}")
        return "\n".join(lines)


def _show(size: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


def measure(influence: Influence) -> tuple[int, int, int, int]:
    """(tracked parameters p, bytes of a parameter vector, activation bytes of one training
    example, outputs per example), from one forward pass of the first training example."""
    from .parameters import TrackedParameters, evaluation_mode

    tracked = TrackedParameters(influence.model, influence.params)
    element = torch.finfo(tracked.dtype).bits // 8
    X, _ = influence.train_data.take([0], tracked.device, tracked.dtype)
    X = rows_of(X, slice(0, 1))
    theta = tracked.flat()
    outputs: list[int] = []

    def forward(x: Any) -> None:
        outputs.append(int(tracked.forward(theta, x).numel()))

    with evaluation_mode(influence.model):
        activations = activation_bytes(influence.model, forward, X)
    return tracked.dim, tracked.dim * element, max(activations, 1), max(outputs[0], 1)


def _kronecker_part(solver: Any) -> Any:
    """The K-FAC solver (or its name) that ``solver`` is, or uses as preconditioner or base."""
    from .solvers.kfac import KFAC

    for part in (solver, getattr(solver, "preconditioner", None), getattr(solver, "base", None)):
        if isinstance(part, KFAC) or part in ("kfac", "ekfac"):
            return part
    return None


def kronecker_pullbacks(solver: Any, outputs: int) -> int:
    """Vectors pulled back per example by the K-FAC passes of ``solver``, its preconditioner or
    its base (``samples`` if set, else one per model output), or 1 without K-FAC."""
    part = _kronecker_part(solver)
    if part is None:
        return 1
    return getattr(part, "samples", None) or outputs


def sizes_for(budget: int, parameter_bytes: int, activations: int, pullbacks: int,
              chunk_size: int, solver: str) -> Sizes:
    """The sizes that keep each stage within ``budget`` (see the module docstring): a quarter
    each for a chunk, the curvature-vector products, a group of queries being solved, and the
    solved queries held while scoring. ``pullbacks``: :func:`kronecker_pullbacks`."""
    per_example = activations * (1 + BACKWARD_FACTOR * pullbacks) + parameter_bytes
    chunk = max(1, min(chunk_size, int(budget / 4 // per_example)))
    vectors = max(1, int(budget / 4 // max(1.0, chunk * activations * PRODUCT_FACTOR)))
    blocks = CG_BLOCKS if solver in ("cg", "deflated") else LISSA_BLOCKS
    group = max(1, int(budget / 4 // (blocks * parameter_bytes)))
    return Sizes(budget, parameter_bytes, activations, chunk, min(vectors, 128), group)


def queries_held(sizes: Sizes) -> int:
    """Solved queries that fit in a quarter of the budget while the training data is scored:
    each costs p numbers, and layer scoring keeps a per-layer copy (2p in all)."""
    return max(1, sizes.budget // 4 // (2 * sizes.parameter_bytes))


def plan(influence: Influence, num_test: int, sizes: Sizes | None,
         measured: tuple[int, int, int, int]) -> Plan:
    """The stages of fitting and scoring ``num_test`` queries, with their estimated peak memory
    and passes over the training data (see :class:`Plan`); ``measured`` is :func:`measure`'s."""
    dim, parameter_bytes, activations, outputs = measured
    n = len(influence.train_data)
    chunk = sizes.chunk_size if sizes else influence.chunk_size
    vectors = sizes.max_vectors if sizes else 128
    group = sizes.query_group if sizes else max(1, num_test)
    solver = type(influence.solver).__name__
    p = parameter_bytes
    chunk_pass = chunk * activations * (1 + BACKWARD_FACTOR)
    report = Plan(sizes, n, num_test, dim)
    report.stages.append(("fit: data checks and ∇R(θ̂)", int(chunk_pass + 2 * p), "1",
                          "one batched gradient per chunk"))
    sampled = max(1, min(chunk, GRADIENT_CHUNK_BYTES // p))
    report.stages.append(("fit: stationarity sample", int(sampled * p + chunk_pass), "0",
                          f"≤ 256 per-example gradients, {sampled} at a time"))
    kronecker = _kronecker_part(influence.solver)  # the solver, its preconditioner or base
    if kronecker is not None:
        pullbacks = kronecker_pullbacks(influence.solver, outputs)
        samples = getattr(kronecker, "samples", None)
        pulled = chunk * activations * (1 + BACKWARD_FACTOR * pullbacks)
        how = ("exact expectation: one pullback per output" if samples is None
               else f"{samples} random-sign pullback(s) per example")
        report.stages.append(("fit: K-FAC factors", int(pulled + 2 * p), "2–3", how))
    products = min(group, num_test)
    block = products * p
    if solver in ("CG", "LiSSA", "Deflated", "Direct", "Arnoldi"):
        blocks = CG_BLOCKS if solver == "CG" else LISSA_BLOCKS
        product_memory = min(vectors, products) * chunk * activations * PRODUCT_FACTOR
        report.stages.append((f"solve: {solver}, {products} queries at a time",
                              int(blocks * block + product_memory), "1 per iteration",
                              f"{math.ceil(num_test / group)} group(s) of queries"))
    else:
        report.stages.append((f"solve: {solver}", int(3 * block), "0", "no pass"))
    scoring = "per-example gradients" if influence.scoring == "gradients" else "layers"
    held = min(num_test, queries_held(sizes) if sizes else num_test)
    score_memory = chunk_pass + held * chunk * 4 + (chunk * p if scoring != "layers" else 0)
    report.stages.append((f"scores: {num_test} × {n}", int(score_memory + 2 * held * p),
                          str(math.ceil(num_test / held)),
                          f"via {scoring}, {held} solved queries held; the (m, n) result "
                          f"{_show(num_test * n * 4)}"))
    report.stages.append(("index: a gradient store (if used)",
                          int(chunk * p + chunk_pass + SHARD_BYTES), "1",
                          "a chunk's per-example gradients, then projected; shards ≤ 256 MiB"))
    return report
