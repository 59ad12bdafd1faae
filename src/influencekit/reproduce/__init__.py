"""Every experiment of Koh & Liang (2017), reproduced on data that ships with the dependencies.

Each module here defines ``EXPERIMENT``; :func:`experiments` finds them. Run one with
``influencekit reproduce NAME`` or all with ``influencekit reproduce all``.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Experiment, Outcome, RunSettings
from .runner import Record, run_all, run_experiment, summary_table

# The paper's order; experiments found but not listed come after, alphabetically.
ORDER = ("fig1-components", "fig2-logreg", "fig2-cnn", "fig3-hinge", "sec51-rbf-vs-network",
         "sec52-attack", "sec52-attack-digits", "sec53-domain-mismatch", "sec54-mislabel")
_INFRASTRUCTURE = {"base", "runner", "common", "networks", "efficientnet_lite", "logistic_top"}


def experiments() -> dict[str, Experiment]:
    """All experiments, by name, in the paper's order."""
    found: dict[str, Experiment] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name in _INFRASTRUCTURE or module.name.startswith("_"):
            continue
        experiment = getattr(importlib.import_module(f"{__name__}.{module.name}"), "EXPERIMENT",
                             None)
        if isinstance(experiment, Experiment):
            found[experiment.name] = experiment
    ranked = sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return {name: found[name] for name in ranked}


def get(name: str) -> Experiment:
    """The experiment called ``name``; a clear error lists the known names otherwise."""
    known = experiments()
    if name not in known:
        raise ValueError(f"Unknown experiment {name!r}. Known: {', '.join(known)} (or 'all').")
    return known[name]


__all__ = ["Experiment", "Outcome", "Record", "RunSettings", "experiments", "get", "run_all",
           "run_experiment", "summary_table"]
