"""Run experiments: time them, check their keys, write results.json and the summary table."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text
from .base import Experiment, Outcome, RunSettings


@dataclass
class Record:
    """One finished run: the experiment, its outcome and how long it took."""

    experiment: Experiment
    outcome: Outcome
    seconds: float
    settings: RunSettings


def run_experiment(experiment: Experiment, out: Path, seed: int = 0, quick: bool = False,
                   data: Path | None = None) -> Record:
    """Run one experiment into ``out/NAME`` and write ``results.json`` and ``about.json``.

    ``results.json`` is a flat object of named numbers: the experiment's keys, then ``seconds``,
    ``seed`` and ``quick`` (0/1). ``about.json`` holds the text: data used, the paper's figures,
    notes and figure paths.
    """
    settings = RunSettings(out=Path(out) / experiment.name, seed=seed, quick=quick, data=data)
    settings.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    outcome = experiment.run(settings)
    seconds = time.perf_counter() - started
    missing = [k for k in experiment.keys if k not in outcome.metrics]
    if missing:
        raise RuntimeError(f"experiment {experiment.name} did not produce {missing}")
    metrics: dict[str, float | None] = {
        k: float(v) if math.isfinite(float(v)) else None for k, v in outcome.metrics.items()}
    metrics.update(seconds=round(seconds, 2), seed=float(seed), quick=float(quick))
    atomic_write_json(settings.out / "results.json", metrics)
    atomic_write_json(settings.out / "about.json", {
        "experiment": experiment.name, "title": experiment.title, "data": outcome.data,
        "paper": experiment.paper, "notes": outcome.notes,
        "figures": [str(p) for p in outcome.figures],
    })
    return Record(experiment, outcome, seconds, settings)


def format_number(value: float | None) -> str:
    """Compact display: integers as such, small and large numbers in scientific notation."""
    if value is None or math.isnan(value):
        return "nan"
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"


def summary_table(records: Iterable[Record]) -> str:
    """Markdown: one row per key of each experiment, ours beside the paper's, data and runtime."""
    lines = ["| experiment | key | ours | paper | data | runtime (s) |",
             "|---|---|---|---|---|---|"]
    for record in records:
        experiment, outcome = record.experiment, record.outcome
        for position, key in enumerate(experiment.keys):
            first = position == 0
            lines.append(
                f"| {experiment.name if first else ''} | `{key}` | "
                f"{format_number(float(outcome.metrics[key]))} | "
                f"{experiment.paper.get(key, '–')} | {outcome.data if first else ''} | "
                f"{f'{record.seconds:.0f}' if first else ''} |")
    return "\n".join(lines) + "\n"


def run_all(experiments: Iterable[Experiment], out: Path, seed: int = 0, quick: bool = False,
            echo: Callable[[str], None] = lambda _: None) -> list[Record]:
    """Run every experiment in turn and write ``out/summary.md``; returns the records."""
    records = []
    for experiment in experiments:
        echo(f"== {experiment.name}: {experiment.title}")
        record = run_experiment(experiment, out, seed, quick)
        echo(f"   done in {record.seconds:.0f} s: " + ", ".join(
            f"{k} {format_number(float(record.outcome.metrics[k]))}" for k in experiment.keys))
        records.append(record)
        _write_summary(records, out, seed, quick)
    return records


def _write_summary(records: list[Record], out: Path, seed: int, quick: bool) -> Path:
    notes = []
    for record in records:
        for note in record.outcome.notes:
            notes.append(f"- **{record.experiment.name}**: {note}")
    text = (f"# Reproduction of Koh & Liang (2017)\n\nseed {seed}"
            f"{', quick variants' if quick else ''}; written by `influencekit reproduce all`.\n\n"
            + summary_table(records)
            + ("\n## What differs from the paper\n\n" + "\n".join(notes) + "\n" if notes else ""))
    return atomic_write_text(Path(out) / "summary.md", text)
