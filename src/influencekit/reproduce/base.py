"""What an experiment of the paper is, and what running one produces.

Every experiment is a module of this package that defines ``EXPERIMENT`` (an :class:`Experiment`):
its name on the command line, the keys its ``results.json`` must hold, the paper's figure for each
key, and a ``run`` function. ``run`` computes and draws; the runner (:mod:`.runner`) times it,
checks the keys, and writes the files atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RunSettings:
    """What the user asked for.

    Attributes:
        out: the experiment's own folder (``DIR/NAME``); figures go here.
        seed: seeds everything random; the same seed gives the same numbers.
        quick: a small variant that runs in seconds (the tests use it); conclusions must hold.
        data: a path to the paper's original data (its public file format), or ``None`` for the
            bundled or generated stand-in.
    """

    out: Path
    seed: int = 0
    quick: bool = False
    data: Path | None = None


@dataclass
class Outcome:
    """What ``run`` returns.

    Attributes:
        metrics: flat named numbers, written to ``results.json`` (must include the required keys).
        data: one line saying which data was used (e.g. "scikit-learn digits, 1 vs 7, 8×8").
        figures: PNG files written under ``RunSettings.out``.
        notes: short lines on what differs from the paper's setup and why.
    """

    metrics: dict[str, float]
    data: str
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Experiment:
    """One experiment of the paper.

    Attributes:
        name: command-line name, e.g. ``"fig2-logreg"``.
        title: one line: what it shows.
        keys: the names ``results.json`` must hold.
        paper: the paper's figure for keys it reports (text: "0.86", "57%", "qualitative"), with
            the section it comes from.
        run: the computation.
        headline: the key shown first in summaries.
    """

    name: str
    title: str
    keys: tuple[str, ...]
    paper: dict[str, str]
    run: Callable[[RunSettings], Outcome]
    headline: str = ""
