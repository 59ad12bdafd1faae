"""Randomness without touching the caller's random state.

Library code draws random numbers only from explicit ``torch.Generator`` / NumPy ``Generator``
objects seeded from the call's own ``seed`` argument. Two things in PyTorch can only use the
global generator: the default initialisation of ``nn.Module`` parameters and dropout in training
mode. For those, :func:`seeded` forks the global state, seeds the fork, and restores the caller's
state on exit, so a call with the same seed does the same thing whatever the caller did before,
and the caller's next ``torch.rand`` is the one it would have drawn anyway.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(int(seed))


@contextmanager
def seeded(seed: int, devices: Sequence[torch.device | str] = ()) -> Iterator[None]:
    """Run the block with the global torch RNG seeded to ``seed``; restore the caller's after.

    Only for what cannot take a generator (module initialisation, dropout). ``devices``: CUDA
    devices whose generators are forked too (the CPU generator always is).
    """
    cuda = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(int(seed))  # torch.manual_seed would reseed every
        for device in cuda:                             # CUDA device, forked or not
            with torch.cuda.device(device):
                torch.cuda.manual_seed(int(seed))
        yield


_MASK = 0x7FFFFFFF  # 31 bits: every product below stays under 2⁶² in int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash, elementwise (multiplicative mixing and xor-shifts)."""
    for multiplier in (1103515245, 1664525, 22695477):
        x = (x * multiplier + 12345) & _MASK
        x = x ^ (x >> 13)
    return x


def derived_seed(*counters: int) -> int:
    """A seed in [0, 2⁶²) that depends only on the integers given (SHA-256 of their decimal
    text): e.g. (base seed, subset, draw), so that adding subsets or draws leaves the seeds of
    the existing ones unchanged."""
    text = ",".join(str(int(c)) for c in counters).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 2


def rademacher(rows: torch.Tensor, columns: int, draws: int, seed: int) -> torch.Tensor:
    """Random signs ±1 of shape ``(draws, len(rows), columns)`` that depend only on
    (seed, row, column, draw): the same row gets the same signs in any chunk and any process.

    ``rows``: int64 global example indices. The signs are a counter-based hash, not a stream, so
    no generator state is carried between chunks or ranks.
    """
    device = rows.device
    h = _mix(torch.full((), int(seed) & _MASK, dtype=torch.int64, device=device))
    h = _mix(h ^ (rows.to(torch.int64) & _MASK))
    h = _mix(h ^ (rows.to(torch.int64) >> 31))
    column = torch.arange(columns, dtype=torch.int64, device=device)
    draw = torch.arange(draws, dtype=torch.int64, device=device)
    h = _mix(h[None, :, None] ^ column[None, None, :])
    h = _mix(h ^ ((draw[:, None, None] + 0x5BD1E995) & _MASK))
    return ((h >> 16) & 1).mul(2).sub(1)
