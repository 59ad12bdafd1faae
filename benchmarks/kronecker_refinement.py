"""Does the least-squares refinement of the Kronecker factors help beyond the benchmark MLP?

Four small classifiers (two digit MLPs, a breast-cancer MLP, a digit CNN), each trained at two
weight decays and scored at two dampings: 16 settings. For each, I_up,loss of 30 test points
against every training point comes from K-FAC and EK-FAC with ``refine`` = 0 (the published
factors), 1 (the default) and 2, and is compared by Pearson R with the exact influence of a
float64 dense solve of H + λ_d I. Where that Hessian is indefinite at the damping, the exact
Gauss-Newton solve is the reference instead (marked "GN"): both Kronecker solvers approximate G.

Run: ``.bench-venv/bin/python benchmarks/kronecker_refinement.py --out outputs/bench`` (a few
minutes on 2 cores). Prints the table and saves ``kronecker_refinement.json`` with versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from sklearn.datasets import load_breast_cancer, load_digits
from torch import Tensor, nn

import influencekit as ik
from influencekit.errors import IndefiniteHessianError
from influencekit.io import atomic_write_json
from influencekit.validation import correlations

REFINE_STEPS = (0, 1, 2)
WEIGHT_DECAYS = (1e-3, 1e-4)
DAMPINGS = (1e-2, 1e-3)


def _digits() -> tuple[Tensor, Tensor]:
    bunch = load_digits()
    return torch.tensor(bunch.data, dtype=torch.float32) / 16, torch.tensor(bunch.target)


def _cancer() -> tuple[Tensor, Tensor]:
    bunch = load_breast_cancer()
    X = torch.tensor(bunch.data, dtype=torch.float32)
    return (X - X.mean(0)) / X.std(0), torch.tensor(bunch.target)


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 6, 3), nn.ReLU(),
                         nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10))


# name: (architecture, data, training rows, test rows)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Tensor, Tensor]], slice,
                       slice]] = {
    "digits MLP 64-32-32-10 ReLU": (
        lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                              nn.Linear(32, 10)), _digits, slice(0, 600), slice(1500, 1530)),
    "digits MLP 64-48-10 tanh": (
        lambda: nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10)), _digits,
        slice(0, 800), slice(1500, 1530)),
    "breast-cancer MLP 30-16-16-2 tanh": (
        lambda: nn.Sequential(nn.Linear(30, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                              nn.Linear(16, 2)), _cancer, slice(0, 400), slice(400, 430)),
    "digits CNN conv6-conv8-linear": (_cnn, _digits, slice(0, 500), slice(1500, 1530)),
}


def _train(model: nn.Module, X: Tensor, y: Tensor, weight_decay: float) -> nn.Module:
    """Full-batch Adam, 300 steps at lr 1e-2 (the same recipe for every case)."""
    optimizer = torch.optim.Adam(model.parameters(), 1e-2, weight_decay=weight_decay)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    return model.double()


def _scores(model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
            solver: ik.solvers.Solver | str, damping: float, curvature: str = "hessian") -> Tensor:
    return ik.Influence(model, ik.CrossEntropyObjective(), train, solver=solver, damping=damping,
                        curvature=curvature).fit().influence(test)


def run_case(name: str, weight_decay: float, damping: float) -> dict:
    architecture, data, train_rows, test_rows = CASES[name]
    X, y = data()
    torch.manual_seed(0)
    model = _train(architecture(), X[train_rows], y[train_rows], weight_decay)
    train = (X[train_rows].double(), y[train_rows])
    test = (X[test_rows].double(), y[test_rows])
    try:
        reference, kind = _scores(model, train, test, "direct", damping), "H"
    except IndefiniteHessianError:
        reference, kind = _scores(model, train, test, "direct", damping, "gauss-newton"), "GN"
    row = {"case": name, "weight_decay": weight_decay, "damping": damping, "reference": kind}
    for solver in (ik.solvers.KFAC, ik.solvers.EKFAC):
        for refine in REFINE_STEPS:
            row[f"{solver.name}-{refine}"] = correlations(
                _scores(model, train, test, solver(refine=refine), damping), reference)[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    columns = [f"{s}-{r}" for s in ("kfac", "ekfac") for r in REFINE_STEPS]
    print(f"{'case':36s} {'wd':>6s} {'λ_d':>6s} ref  " + " ".join(f"{c:>8s}" for c in columns))
    rows = []
    for name in CASES:
        for weight_decay in WEIGHT_DECAYS:
            for damping in DAMPINGS:
                row = run_case(name, weight_decay, damping)
                rows.append(row)
                print(f"{name:36s} {weight_decay:6.0e} {damping:6.0e} {row['reference']:4s} "
                      + " ".join(f"{row[c]:8.3f}" for c in columns), flush=True)
    wins = {solver: sum(row[f"{solver}-1"] > row[f"{solver}-0"] for row in rows)
            for solver in ("kfac", "ekfac")}
    print(f"\nrefine=1 above refine=0 in {wins['kfac']}/{len(rows)} settings for K-FAC, "
          f"{wins['ekfac']}/{len(rows)} for EK-FAC")
    payload = {"benchmark": "kronecker_refinement", "date": time.strftime("%Y-%m-%d"),
               "versions": {"torch": torch.__version__, "python": platform.python_version(),
                            "influencekit": ik.__version__},
               "settings": {"refine": REFINE_STEPS, "weight_decays": WEIGHT_DECAYS,
                            "dampings": DAMPINGS, "test_points": 30, "threads": args.threads,
                            "training": "full-batch Adam, 300 steps, lr 1e-2, seed 0"},
               "rows": rows, "wins_refine_1_over_0": wins}
    path = atomic_write_json(Path(args.out) / "kronecker_refinement.json",
                             json.loads(json.dumps(payload)))
    print(f"Saved {path}")


if __name__ == "__main__":
    main()
