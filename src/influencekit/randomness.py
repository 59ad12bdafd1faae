"""Randomness without touching the caller's random state.

Library code draws random numbers only from explicit ``torch.Generator`` / NumPy ``Generator``
objects seeded from the call's own ``seed`` argument. Two things in PyTorch can only use the
global generator: the default initialisation of ``nn.Module`` parameters and dropout in training
mode. For those, :func:`seeded` forks the global state, seeds the fork, and restores the caller's
state on exit, so a call with the same seed does the same thing whatever the caller did before,
and the caller's next ``torch.rand`` is the one it would have drawn anyway.
"""

from __future__ import annotations

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
