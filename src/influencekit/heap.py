"""Freed memory kept in the process while influencekit computes (Linux with glibc only).

Curvature products, gradient passes and solves allocate and free the same large tensors over
and over: a block of k curvature-vector products over a chunk of examples makes (k × chunk ×
width) activations for every layer, and a CNN's convolutions far more. glibc's ``malloc`` serves
blocks above its mmap threshold (at most 32 MiB under its dynamic rule) with fresh ``mmap``
pages and hands freed memory at the top of its heap back to the system once more than the trim
threshold is free. Every new block then costs a page fault per 4 KiB page, with the page zeroed
by the kernel. Measured on the four benchmark problems (2 cores, AMD EPYC in a virtual machine):
one product block of 100 vectors faulted 0.2–0.8 GiB of pages on the benchmark MLP and 10 GiB
on the CNN, and took 10.3–19 ms per vector on the MLP (8.9–9.3 ms with the pages kept) and 56
ms on the CNN (19–22 ms kept).

:func:`retained` raises the two thresholds while the outermost influencekit call runs (mmap
threshold :data:`MMAP_THRESHOLD`, trim threshold :data:`TRIM_THRESHOLD`), so that freed blocks are
reused instead of returned and faulted in again. The peak stays what the computation itself
holds at once; memory freed during the call stays resident until it returns. On return it sets
the thresholds to the values glibc's dynamic rule reaches for large blocks
(:data:`MMAP_THRESHOLD_AFTER`, :data:`TRIM_THRESHOLD_AFTER`) and calls ``malloc_trim(0)``, which
hands the free memory back.

Nothing is changed where the allocator is not glibc's, where the user tuned it
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or
``glibc.malloc`` tunables in ``GLIBC_TUNABLES``), or where ``INFLUENCEKIT_RETAIN_HEAP=0`` is set.
Results do not depend on it: only where the memory comes from changes.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

#: while influencekit computes: blocks up to this size come from the heap, not fresh mmaps
MMAP_THRESHOLD = 2**30
#: while influencekit computes: free memory at the top of the heap kept up to this many bytes
#: (the largest value ``mallopt`` takes, an ``int``)
TRIM_THRESHOLD = 2**31 - 1
#: after the outermost call: the values glibc's dynamic rule reaches for large blocks
MMAP_THRESHOLD_AFTER = 32 * 2**20
TRIM_THRESHOLD_AFTER = 64 * 2**20
#: set to 0 to leave the allocator alone
SWITCH = "INFLUENCEKIT_RETAIN_HEAP"
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_lock = threading.Lock()
_depth = 0
_libc: Any = None  # ctypes handle, found on first use; False where there is none

F = TypeVar("F", bound=Callable[..., Any])


def available() -> bool:
    """Whether :func:`retained` changes anything in this process (glibc, not switched off,
    allocator not tuned by the user)."""
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return _glibc() is not None


def _glibc() -> Any:
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(None)
                libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
                libc.malloc_trim.argtypes = (ctypes.c_size_t,)
                _libc = libc
            except (OSError, AttributeError):
                logger.debug("glibc's mallopt is not reachable; freed memory is not retained.")
    return _libc or None


def _set(trim: int, mmap: int) -> None:
    libc = _glibc()
    libc.mallopt(_M_TRIM_THRESHOLD, trim)
    libc.mallopt(_M_MMAP_THRESHOLD, mmap)


@contextmanager
def retained() -> Iterator[None]:
    """Keep freed memory for reuse until the outermost ``retained`` block ends (module
    docstring). Nested and concurrent blocks share one setting; only the outermost exit
    restores it and trims."""
    global _depth
    active = available()
    if active:
        with _lock:
            _depth += 1
            if _depth == 1:
                _set(TRIM_THRESHOLD, MMAP_THRESHOLD)
    try:
        yield
    finally:
        if active:
            with _lock:
                _depth -= 1
                if _depth == 0:
                    _set(TRIM_THRESHOLD_AFTER, MMAP_THRESHOLD_AFTER)
                    _glibc().malloc_trim(0)


def retaining(function: F) -> F:
    """``function`` run inside :func:`retained`."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with retained():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
