"""Linear datamodeling score (LDS) of every method on the benchmark MLP, in one run.

Ground truth (cached in ``OUT/lds-mlp-truth``, resumable): ``--subsets`` random halves of the
1,257 training points (influencekit.validation.retrain_on_subsets, seed 0), each trained from
scratch with the benchmark's recipe (problem.train_model: Adam lr 1e-3, weight decay 1e-4,
batch 64, 200 epochs, then the float64 L-BFGS polish, here capped at ``--polish`` iterations:
the full 20,000-iteration polish takes 5–6 minutes per model on this machine), with a seed of
its own per training (initialisation and batch order); the measurement is the cross-entropy of
each of the problem's 100 test points. ``--workers`` processes train in parallel (one thread
each), each its share of the trainings.

Methods score the problem's model (the fully polished seed-0 model of problem.py) and are all
measured against the same subsets, with influencekit.validation.linear_datamodeling_score:
Spearman R per test point, mean over test points, 95% bootstrap interval over test points.
Ensembles use ``--members`` models: the problem's model and ``members − 1`` more trained on all
points with seeds 1, 2, … (the same capped recipe). Agreement with the exact influence (the
problem's float64 CG reference) is given beside the LDS, per test point and over the whole
matrix. Run in the benchmark environment (``make bench``):

    .bench-venv/bin/python benchmarks/lds_mlp.py --out outputs/bench
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lds_common  # noqa: E402

import influencekit as ik  # noqa: E402
from influencekit.validation import (  # noqa: E402
    loss_measurement,
    retrain_on_subsets,
)

import problem as problem_module  # noqa: E402

SINGLE = ["influencekit-cg-deflated", "influencekit-cg-ekfac", "influencekit-cg-ekfac-3",
          "influencekit-cg-deflated-3", "influencekit-ekfac", "influencekit-arnoldi-50",
          "influencekit-gradient-dot", "influencekit-ekfac-heuristic-damping",
          "kronfluence-ekfac", "kronfluence-ekfac-empirical",
          "kronfluence-ekfac-heuristic-damping", "pydvl-ekfac", "pydvl-cg-block", "dattri-cg",
          "dattri-ekfac", "dattri-arnoldi", "dattri-trak"]
ENSEMBLE_SOLVERS = {"influencekit-ekfac": "ekfac",
                    "influencekit-cg-ekfac-3": "cg-ekfac-3"}


def _train_function(X: torch.Tensor, y: torch.Tensor, polish: int) -> Callable:
    def train(indices: torch.Tensor, seed: int) -> torch.nn.Module:
        model, _ = problem_module.train_model(X[indices], y[indices], seed % 2**31, polish)
        return model
    return train


def _truth(args: argparse.Namespace, share: tuple[int, int]):
    X, y, X_test, y_test = problem_module._digits()
    m = problem_module.SETTINGS["num_test"]
    key = (f"problem.train_model, polish <= {args.polish}; cross-entropy of test points "
           f"0..{m - 1}; recipe version {problem_module.VERSION}")
    return retrain_on_subsets(_train_function(X, y, args.polish),
                              loss_measurement(ik.CrossEntropyObjective(),
                                               (X_test[:m], y_test[:m])),
                              n=len(y), subsets=args.subsets, fraction=0.5, seeds=args.seeds,
                              seed=0, out=Path(args.out) / "lds-mlp-truth", key=key,
                              progress=share == (0, 1), share=share)


def _member_path(args: argparse.Namespace, seed: int) -> Path:
    folder = Path(args.out) / "lds-mlp-members"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"member-{seed}-polish-{args.polish}.pt"


def _train_members(args: argparse.Namespace, share: tuple[int, int]) -> None:
    """Train (and cache) the ensemble members of this share that are missing."""
    X, y, _, _ = problem_module._digits()
    for seed in range(1, args.members):
        path = _member_path(args, seed)
        if seed % share[1] == share[0] and not path.exists():
            model, info = problem_module.train_model(X, y, seed, args.polish)
            problem_module.atomic_save({"state": model.state_dict(), "info": info}, path)


def _members(args: argparse.Namespace, problem) -> list[torch.nn.Module]:
    """The problem's model and members − 1 more, trained on all points (cached)."""
    _train_members(args, (0, 1))
    models = [problem.model]
    for seed in range(1, args.members):
        path = _member_path(args, seed)
        model = problem_module.build_model()
        model.load_state_dict(torch.load(path, weights_only=True)["state"])
        models.append(model.float().eval())
    return models


def _method(name: str) -> Callable:
    import ours

    if name.startswith("influencekit"):
        return ours.METHODS[name]
    library = name.split("-")[0]
    module = __import__(f"peers.{library}_methods", fromlist=["METHODS"])
    return module.METHODS[name]


def _ensemble_scores(solver: str, problem, models: list[torch.nn.Module]) -> torch.Tensor:
    if solver == "ekfac":
        make = ik.EKFAC
    else:
        def make() -> ik.CG:
            return ik.CG(preconditioner="ekfac", max_iter=3, tol=1e-12, verify=False)
    members = [ik.Influence(model, ik.CrossEntropyObjective(), (problem.X_train, problem.y_train),
                            solver=make(), damping=problem.damping,
                            stationarity_tol=None).fit() for model in models]
    return ik.Ensemble(members).influence((problem.X_test, problem.y_test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--polish", type=int, default=1000)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="*", default=None,
                        help="run only these (names of SINGLE, or NAME-ensemble for the "
                             "ensembles: influencekit-ekfac, influencekit-cg-ekfac-3, "
                             "dattri-trak) and merge their rows into the existing JSON")
    args = parser.parse_args()
    if args.worker is not None:
        torch.set_num_threads(1)
        _truth(args, (args.worker, args.workers))
        _train_members(args, (args.worker, args.workers))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    lds_common.run_workers(args.workers)
    truth = _truth(args, (0, 1))  # trains whatever a worker left
    truth_seconds = time.perf_counter() - started
    problem = problem_module.load(problem_module.prepare(out))
    torch.set_num_threads(2)
    table = lds_common.Table(truth, problem.reference)
    record = table.record

    chosen = args.methods if args.methods is not None else SINGLE
    record("exact influence (float64 CG reference)", lambda: problem.reference,
           note="the problem's cached reference; its time is not measured here")
    for name in chosen:
        if not name.endswith("-ensemble"):
            record(name, lambda name=name: _method(name)(problem))
    if args.methods is None or any("ensemble" in name for name in chosen):
        models = _members(args, problem)
        for name, solver in ENSEMBLE_SOLVERS.items():
            label = f"{name} ensemble of {len(models)}"
            if args.methods is None or f"{name}-ensemble" in chosen:
                record(label, lambda solver=solver: _ensemble_scores(solver, problem, models),
                       members=len(models))
        if args.methods is None or "dattri-trak-ensemble" in chosen:
            from peers import dattri_methods

            states = [{k: v.detach().clone() for k, v in m.state_dict().items()}
                      for m in models]
            record(f"dattri-trak over {len(models)} models",
                   lambda: dattri_methods.trak(problem, states), members=len(models))
    path = out / "lds_mlp.json"
    payload = {"benchmark": "lds_mlp", "settings": vars(args) | problem_module.SETTINGS,
               "ground_truth": {"subsets": args.subsets, "fraction": 0.5,
                                "seeds_per_subset": args.seeds, "folder": str(truth.folder),
                                "seconds_this_run": truth_seconds},
               "versions": lds_common.versions()}
    lds_common.write_result(path, payload, table.rows, merge=bool(args.methods))
    print(f"wrote {path} ({'rows merged into the earlier run' if args.methods else 'all rows'})")


if __name__ == "__main__":
    main()

