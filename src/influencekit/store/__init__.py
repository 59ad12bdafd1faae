"""On-disk formats, all written through :mod:`influencekit.io`: a saved fit (``fitted``), and
stores of shards that jobs fill and resume (``shards``): training gradients (``gradients``) and
scores (``scores``)."""

from __future__ import annotations

from pathlib import Path

from .gradients import FORMAT as GRADIENT_FORMAT
from .gradients import GradientStore
from .scores import ScoreStore
from .shards import ShardFolder


def open_store(folder: str | Path) -> ScoreStore | GradientStore:
    """The reader of the store in ``folder`` (by the format its manifest names)."""
    kind = ShardFolder(folder, create=False).manifest.get("format")
    return GradientStore(folder) if kind == GRADIENT_FORMAT else ScoreStore(folder)


__all__ = ["GradientStore", "ScoreStore", "open_store"]
