"""torch.distributed, in one place: which training rows are this process's, and the reductions.

Under ``torchrun --nproc_per_node R`` (gloo on CPU, NCCL on GPU), once the script has called
``torch.distributed.init_process_group``, every pass over the training data is split: process r
visits a contiguous range of whole chunks (:func:`local_rows`), and the sums each pass makes —
∇R(θ̂), Hessian- and Gauss-Newton-vector products, K-FAC factors, curvature weights — are
all-reduced, so every process holds the same totals and runs the same solver recurrences on
them. Scores are computed for the local training points and gathered, so ``influence``,
``loo_change``, ``self_influence`` and ``top_k`` return the full result on every process and a
script written for one process runs unchanged. Stores are written shard by shard by the process
that owns the shard (shard j by process j mod R); process 0 writes the shared files.

Without an initialised process group (or with one process) every function here is the identity
and the library behaves exactly as it does in one process. Nothing else in influencekit imports
``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

#: what this process has reduced so far (see :func:`traffic`)
_TRAFFIC = {"all_reduce_calls": 0, "all_reduce_bytes": 0}


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def local_rows(n: int, chunk_size: int) -> slice:
    """This process's training rows: a contiguous range of whole chunks, the chunks dealt out
    as evenly as possible (the first processes get one more when they do not divide)."""
    if not active():
        return slice(0, n)
    chunks = -(-n // chunk_size)
    size, extra = divmod(chunks, world_size())
    first = rank() * size + min(rank(), extra)
    count = size + (1 if rank() < extra else 0)
    return slice(min(first * chunk_size, n), min((first + count) * chunk_size, n))


def all_reduce(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the processes, in place (returned for chaining)."""
    if active():
        _TRAFFIC["all_reduce_calls"] += 1
        _TRAFFIC["all_reduce_bytes"] += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def traffic(reset: bool = False) -> dict[str, int]:
    """The all-reductions of data this process has taken part in: calls and bytes of the
    reduced tensors (a ring all-reduce sends about 2(R − 1)/R times those bytes per process).
    Bookkeeping reductions (error flags, barriers) are not counted. ``reset`` zeroes them."""
    counts = dict(_TRAFFIC)
    if reset:
        for key in _TRAFFIC:
            _TRAFFIC[key] = 0
    return counts


def gather_columns(local: Tensor, rows: slice, n: int) -> Tensor:
    """The (k, n) matrix whose columns ``rows`` each process computed as ``local`` (k, |rows|)."""
    if not active():
        return local
    full = torch.zeros(local.shape[0], n, dtype=local.dtype, device=local.device)
    full[:, rows] = local
    return all_reduce(full)


def gather_rows(local: Tensor, rows: slice, n: int) -> Tensor:
    """The (n, ...) array whose rows ``rows`` each process computed as ``local``."""
    if not active():
        return local
    full = torch.zeros(n, *local.shape[1:], dtype=local.dtype, device=local.device)
    full[rows] = local
    return all_reduce(full)


def split_rows(function: Callable[[Tensor], Tensor], V: Tensor) -> Tensor:
    """``function`` applied to the rows of V (k, p), each process doing a contiguous share of
    the rows, the results gathered: for a row-wise function every process ends with what one
    process would compute alone, in a fraction of its time."""
    if not active() or V.shape[0] < world_size():
        return function(V)
    share = -(-V.shape[0] // world_size())
    rows = slice(min(rank() * share, V.shape[0]), min((rank() + 1) * share, V.shape[0]))
    local = together(lambda: function(V[rows]))
    full = torch.zeros(V.shape[0], *local.shape[1:], dtype=local.dtype, device=local.device)
    full[rows] = local
    return all_reduce(full)


def broadcast(value: T, source: int = 0) -> T:
    """``value`` as process ``source`` has it (any picklable object; a decision made once)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def _collective_device() -> torch.device:
    """Where small bookkeeping tensors must live for the backend (NCCL: the current GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process gets here."""
    if active():
        dist.barrier()


def owns(shard: int) -> bool:
    """Whether this process writes store shard ``shard`` (shard j: process j mod R)."""
    return shard % world_size() == rank()


def together(work: Callable[[], T]) -> T:
    """Run ``work`` on every process; if it fails on any, fail on all (instead of leaving the
    others waiting in a collective): the failing process raises its own error, the others a
    RuntimeError naming it."""
    error: BaseException | None = None
    result: Any = None
    try:
        result = work()
    except BaseException as raised:  # re-raised below, on every process
        error = raised
    if active():
        failed = torch.tensor([0 if error is None else rank() + 1], dtype=torch.int64,
                              device=_collective_device())
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if error is None and int(failed):
            raise RuntimeError(f"influencekit: process {int(failed) - 1} failed; see its error.")
    if error is not None:
        raise error
    return result
