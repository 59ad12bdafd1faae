"""The side-by-side benchmark's tables and checks never take a failed run's time as a peer's.

A peer that raises (pyDVL's EK-FAC on a Conv2d model) still records the seconds it took to fail;
used as "the fastest peer" it would shrink every ratio in its family.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def compare():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("compare")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _row(seconds: float, pearson: float, error: str | None = None) -> dict:
    row = {"seconds": seconds, "pearson_flat": pearson, "pearson_rows_mean": pearson,
           "relative_error": 1.0, "peak_rss_bytes": 5e8}
    if error is not None:
        row["error"] = error
    return row


def _results() -> dict[str, dict]:
    return {"influencekit-ekfac": _row(0.8, 0.37),
            "influencekit-ekfac-deflated-40": _row(1.6, 0.83),
            "kronfluence-ekfac": _row(3.15, 0.25),
            "dattri-ekfac": _row(2.0, 0.22),
            # failed in 0.47 s, faster than any peer that finished
            "pydvl-ekfac": _row(0.47, 0.99, error="NotImplementedError: Conv2d")}


def test_completed_keeps_only_runs_with_a_time_and_no_error(compare):
    results = {**_results(), "captum-arnoldi-50": {"seconds": None}}
    assert sorted(compare.completed(results)) == [
        "dattri-ekfac", "influencekit-ekfac", "influencekit-ekfac-deflated-40",
        "kronfluence-ekfac"]


def test_the_ratio_column_is_against_the_fastest_peer_that_finished(compare):
    lines = compare._table(_results(), floor=0.04)
    ours = next(line for line in lines if line.split()[:1] == ["influencekit-ekfac"])
    failed = next(line for line in lines if line.split()[:1] == ["pydvl-ekfac"])
    assert float(ours.split()[2]) == pytest.approx(0.8 / 2.0, abs=0.005)  # dattri's 2.0 s
    assert "failed" in failed


def test_the_checks_ignore_a_failed_peer(compare):
    kronecker = next(line for line in compare._checks(_results())
                     if line.startswith(("PASS", "FAIL")) and "(influencekit-ekfac)" in line)
    # the failed run's Pearson 0.99 would have made the best peer unbeatable
    assert kronecker.startswith("PASS") and "best peer (0.250)" in kronecker
