"""Time to score every training point against 100 test points, per solver, next to the floor.

Model: a small tanh MLP 64-32-10 (2,410 parameters) on scikit-learn's digits (1,257 training /
540 test images, 70/30 stratified split), float32, trained with Adam and polished with full-batch
L-BFGS in float64 (to ‖∇R‖ ~ 1e-7) so that the Hessian is positive definite at θ̂; damping 1e-3.

For each solver the time covers ``fit()`` (which includes the solver's one-off work: forming and
factorising H for Direct, estimating the spectrum for LiSSA) plus ``influence()`` on 100 test
points. The floor is one pass of per-example gradients over the training set, which any exact
method must pay; the ratio column is solver time / floor time, measured in the same run. Agreement
is against a float64 Direct solve.

Run: ``make bench`` (or ``python benchmarks/bench_solvers.py --out DIR``).
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import influencekit as ik
from influencekit.datasets import digits
from influencekit.io import atomic_write_json
from influencekit.training import minimize, train_steps

SETTINGS = {
    "model": "MLP 64-32-10, tanh",
    "data": "scikit-learn digits, 1,257 train / 540 test (70/30 stratified, seed 0)",
    "weight_decay": 1e-3,
    "damping": 1e-3,
    "num_test": 100,
    "dtype": "float32",
    "threads": 2,
    "chunk_size": 256,
}


def _model() -> tuple[nn.Module, ik.Objective, ik.datasets.Split]:
    data = digits(dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    objective = ik.CrossEntropyObjective(weight_decay=SETTINGS["weight_decay"])
    train_steps(model, objective, data.train, steps=1500, lr=1e-2, batch_size=128)
    minimize(model, objective, data.train, method="lbfgs", tol=1e-7)
    return model, objective, data


def _timed(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.double().ravel().numpy(), b.double().ravel().numpy())[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench", help="folder for bench_solvers.json")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per entry (best kept)")
    args = parser.parse_args()
    torch.set_num_threads(SETTINGS["threads"])
    warnings.simplefilter("ignore", ik.ConvergenceWarning)

    model64, objective, data = _model()
    test64 = (data.X_test[: SETTINGS["num_test"]], data.y_test[: SETTINGS["num_test"]])
    reference = ik.Influence(model64, objective, data.train, solver="direct",
                             damping=SETTINGS["damping"]).fit().influence(test64)

    model = copy.deepcopy(model64).float()
    train = (data.X_train.float(), data.y_train)
    test = (test64[0].float(), test64[1])

    def influence(solver: str | ik.solvers.Solver) -> ik.Influence:
        return ik.Influence(model, objective, train, solver=solver, damping=SETTINGS["damping"],
                            chunk_size=SETTINGS["chunk_size"])

    base = influence("cg").fit()
    entries: dict[str, dict[str, float]] = {}

    def best_of(function: Callable[[], Any]) -> tuple[float, Any]:
        function()  # warm-up: first calls of torch.func transforms pay one-off costs
        times, value = [], None
        for _ in range(args.repeats):
            seconds, value = _timed(function)
            times.append(seconds)
        return min(times), value

    floor, _ = best_of(lambda: base.train_gradients())
    hvp, _ = best_of(lambda: base.operator_.matvec(torch.ones(1, base.tracked_.dim)))
    entries["floor: per-example gradients, one pass"] = {"seconds": floor}
    entries["floor: one full-batch HVP"] = {"seconds": hvp}
    for name in ("direct", "cg", "lissa"):
        seconds, (scores, report) = best_of(
            lambda name=name: (lambda inf: (inf.influence(test), inf.last_solve_report))(
                influence(name).fit()))
        rows = [_pearson(s, r) for s, r in zip(scores, reference, strict=True)]
        entries[name] = {
            "seconds": seconds,
            "relative_error": float((scores.double() - reference).norm() / reference.norm()),
            "pearson_min": min(rows),
            "pearson_mean": float(np.mean(rows)),
            "residual": report.relative_residual,
        }

    machine = platform.processor() or platform.machine()
    print(f"influencekit {ik.__version__}, torch {torch.__version__}, {machine}, "
          f"{SETTINGS['threads']} threads")
    print(f"{SETTINGS['model']} ({base.tracked_.dim} parameters), {SETTINGS['data']}")
    print(f"All {base.num_train_} training points scored against {SETTINGS['num_test']} test "
          f"points; damping {SETTINGS['damping']}; {SETTINGS['dtype']}; best of {args.repeats}.")
    print()
    print(f"{'method':42s} {'time (s)':>9s} {'× floor':>8s} {'rel. error':>11s} "
          f"{'Pearson min':>12s} {'residual':>9s}")
    for name, entry in entries.items():
        ratio = entry["seconds"] / floor
        extra = ""
        if "relative_error" in entry:
            extra = (f" {entry['relative_error']:11.2e} {entry['pearson_min']:12.6f} "
                     f"{entry['residual']:9.1e}")
        print(f"{name:42s} {entry['seconds']:9.3f} {ratio:8.1f}{extra}")
    payload = {
        "benchmark": "bench_solvers",
        "date": time.strftime("%Y-%m-%d"),
        "versions": {"influencekit": ik.__version__, "torch": torch.__version__,
                     "python": platform.python_version(), "numpy": np.__version__},
        "machine": {"processor": platform.processor() or platform.machine(),
                    "cpus": torch.get_num_threads()},
        "settings": {**SETTINGS, "num_parameters": base.tracked_.dim,
                     "num_train": base.num_train_, "repeats": args.repeats},
        "results": entries,
    }
    path = atomic_write_json(Path(args.out) / "bench_solvers.json", payload)
    print(f"\nSaved {path}")


if __name__ == "__main__":
    main()
