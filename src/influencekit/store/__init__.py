"""On-disk formats, all written through :mod:`influencekit.io`: a saved fit (``fitted``), and
stores of shards that jobs fill and resume (``shards``): scores (``scores``)."""

from __future__ import annotations

from pathlib import Path

from .scores import ScoreStore


def open_store(folder: str | Path) -> ScoreStore:
    """The reader of the store in ``folder`` (by the format its manifest names)."""
    return ScoreStore(folder)


__all__ = ["ScoreStore", "open_store"]
