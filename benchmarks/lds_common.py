"""What the LDS benchmarks share: timing each method, scoring it against the ground truth, and
the record of versions. Only torch, numpy and influencekit are imported here."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

import influencekit as ik
from influencekit.io import atomic_write_json
from influencekit.validation import SubsetGroundTruth, linear_datamodeling_score


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


class Table:
    """Rows of (method, LDS with its interval, seconds, agreement with a reference)."""

    def __init__(self, truth: SubsetGroundTruth, reference: torch.Tensor | None = None) -> None:
        self.truth, self.reference, self.rows = truth, reference, []

    def record(self, name: str, work: Callable[[], torch.Tensor], **extra: object) -> None:
        """Time ``work`` (returns (m, n) scores oriented as I_up,loss), score it, print a line.
        A method that fails, or returns scores that cannot be scored (non-finite), is recorded
        with its error, not allowed to stop the benchmark."""
        begun = time.perf_counter()
        try:
            scores = work()
            seconds = time.perf_counter() - begun
            lds = linear_datamodeling_score(scores, self.truth)  # refuses non-finite scores
        except Exception as error:
            self.rows.append({"method": name, "error": repr(error)[:300],
                              "traceback": traceback.format_exc()[-2000:], **extra})
            print(f"{name:46s} failed: {error!r}"[:220], flush=True)
            return
        row = {"method": name, "seconds": seconds, "lds": lds.mean, "low": lds.low,
               "high": lds.high, "defined": lds.defined, **extra}
        line = (f"{name:46s} LDS {lds.mean:.3f} [{lds.low:.3f}, {lds.high:.3f}]  "
                f"{seconds:7.1f} s")
        if self.reference is not None:
            rows = [pearson(scores[j], self.reference[j]) for j in range(scores.shape[0])]
            row["pearson_rows_mean"] = sum(rows) / len(rows)
            row["pearson_all"] = pearson(scores, self.reference)
            line += (f"  R(rows) {row['pearson_rows_mean']:.3f}  "
                     f"R(all) {row['pearson_all']:.3f}")
        self.rows.append(row)
        print(line, flush=True)


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__,
             "influencekit": ik.__version__, "machine": platform.platform(),
             "threads": torch.get_num_threads()}
    for package in ("kronfluence", "pydvl", "dattri", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def run_workers(count: int) -> None:
    """Run this script ``count`` times more, with its own arguments and ``--worker i``, and
    wait for all (each fills its share of the ground truth; see retrain_on_subsets)."""
    if count <= 1:
        return
    workers = [subprocess.Popen([sys.executable, sys.argv[0], *sys.argv[1:], "--worker", str(i)])
               for i in range(count)]
    for worker in workers:
        worker.wait()


def write_result(path: Path, payload: dict, rows: list[dict], merge: bool) -> None:
    """Write ``payload`` with its rows to ``path`` atomically, each row stamped with the time
    it was measured. ``merge``: keep the rows of the file already there that were not rerun."""
    kept = {row["method"]: row for row in (json.loads(path.read_text())["rows"]
                                           if merge and path.exists() else [])}
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    kept.update({row["method"]: row | {"measured": stamp} for row in rows})
    atomic_write_json(path, payload | {"rows": list(kept.values())})
