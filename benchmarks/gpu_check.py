"""CUDA against CPU float64, and CUDA against CPU time: the prepared check for a GPU machine.

1. Agreement. A tanh MLP 64-32-10 (2,410 parameters) trained on scikit-learn's digits, its
   influence on 20 test points by every solver, on the device in float32, against a float64
   Direct solve on the CPU (the reference): relative error and Pearson R per solver, and the
   same solver on the CPU in float32 (what the device should match). Also a score store with
   top-k, and layer scoring, on the device against the CPU.
2. Time. The benchmark architecture (MLP 64-256-256-10, 85,002 parameters) on 20,000 noisy
   digits: EK-FAC fit plus 100 queries, and block CG preconditioned by EK-FAC to 1e-4, on the
   device and on the CPU, side by side.

Run on a machine with a GPU: ``python benchmarks/gpu_check.py --out outputs/gpu`` (a few
minutes there). ``--device cpu --train-size 2000`` runs it on the CPU only (a smoke test). Writes
``gpu_check.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import influencekit as ik

SOLVERS = {
    "direct": lambda: ik.solvers.Direct(),
    "cg": lambda: ik.CG(tol=1e-5),
    "cg+ekfac": lambda: ik.CG(tol=1e-5, preconditioner="ekfac"),
    "lissa": lambda: ik.solvers.LiSSA(),
    "kfac": lambda: ik.solvers.KFAC(),
    "ekfac": lambda: ik.solvers.EKFAC(),
    "arnoldi": lambda: ik.solvers.Arnoldi(rank=50),
}


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    bunch = load_digits()
    return torch.tensor(bunch.data, dtype=torch.float32) / 16.0, torch.tensor(bunch.target)


def _trained(hidden: list[int], X: torch.Tensor, y: torch.Tensor) -> nn.Module:
    sizes = [64, *hidden, 10]
    layers: list[nn.Module] = []
    for first, second in itertools.pairwise(sizes):
        layers += [nn.Linear(first, second), nn.Tanh()]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(*layers[:-1])
    ik.training.train_steps(model, ik.CrossEntropyObjective(weight_decay=1e-3), (X, y),
                            steps=500, lr=1e-2, batch_size=256)
    return model


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1])


def agreement(device: torch.device, out: Path) -> dict:
    X, y = _digits()
    train, test = (X[:1257], y[:1257]), (X[1257:1277], y[1257:1277])
    model = _trained([32], *train)
    objective = ik.CrossEntropyObjective(weight_decay=1e-3)
    settings = dict(damping=1e-3, curvature="gauss-newton", stationarity_tol=None)
    reference = ik.Influence(model.double(), objective, train, solver="direct",
                             **settings).fit().influence(test)
    model = model.float()
    results = {}
    for name, make in SOLVERS.items():
        row = {}
        for where in dict.fromkeys(("cpu", device.type)):
            inf = ik.Influence(model.to(where), objective, train, solver=make(), **settings)
            scores = inf.fit().influence(test).double().cpu()
            row[where] = {"rel_error": float((scores - reference).norm() / reference.norm()),
                          "pearson": _pearson(scores, reference)}
        results[name] = row
        print(f"{name:10s} " + "  ".join(f"{where}: rel. error {v['rel_error']:.2e}, Pearson "
                                         f"{v['pearson']:.6f}" for where, v in row.items()),
              flush=True)
    model = model.to(device)
    inf = ik.Influence(model, objective, train, solver="ekfac", **settings).fit()
    folder = out / "gpu-check-store"
    shutil.rmtree(folder, ignore_errors=True)
    store = inf.score(test, out=folder, top_k=5)
    in_memory = inf.loo_change(test).cpu()
    stored = torch.from_numpy(store.to_numpy())
    results["score_store"] = {"max_abs_difference": float((stored - in_memory).abs().max()),
                              "top_k_equal": bool(torch.equal(
                                  torch.from_numpy(store.top("largest")[0]),
                                  in_memory.topk(5, dim=1).indices))}
    shutil.rmtree(folder, ignore_errors=True)
    print(f"score store on {device}: {results['score_store']}", flush=True)
    model.cpu()
    return results


def timing(device: torch.device, n: int) -> dict:
    X, y = _digits()
    model = _trained([256, 256], X[:1257], y[:1257])
    generator = torch.Generator().manual_seed(1)
    source = torch.randint(1257, (n,), generator=generator)
    train = ((X[source] + 0.1 * torch.randn(n, 64, generator=generator)).clamp(0, 1),
             y[source])
    queries = (X[1257:1357], y[1257:1357])
    objective = ik.CrossEntropyObjective(weight_decay=1e-3)
    results = {}
    for name, make in (("ekfac", lambda: "ekfac"),
                       ("cg+ekfac", lambda: ik.CG(tol=1e-4, preconditioner="ekfac"))):
        row = {}
        for where in dict.fromkeys(("cpu", device.type)):
            placed = model.to(where)
            data = tuple(t.to(where) for t in train)
            start = time.perf_counter()
            inf = ik.Influence(placed, objective, data, solver=make(), damping=1e-3,
                               curvature="gauss-newton", chunk_size=2048,
                               stationarity_tol=None).fit()
            scores = inf.influence(tuple(t.to(where) for t in queries))
            if where == "cuda":
                torch.cuda.synchronize()
            row[where] = {"seconds": time.perf_counter() - start,
                          "scores": scores.double().cpu()}
        if device.type != "cpu":
            row["speed-up"] = row["cpu"]["seconds"] / row[device.type]["seconds"]
            row["pearson_device_cpu"] = _pearson(row["cpu"]["scores"],
                                                 row[device.type]["scores"])
        for where in dict.fromkeys(("cpu", device.type)):
            row[where] = {"seconds": row[where]["seconds"]}
        results[name] = row
        print(f"{name:10s} {row}", flush=True)
    model.cpu()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--train-size", type=int, default=20_000)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device here; run with --device cpu for a smoke test.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"benchmark": "gpu_check", "date": time.strftime("%Y-%m-%d"),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "versions": {"influencekit": ik.__version__, "torch": torch.__version__,
                            "python": platform.python_version()},
               "agreement": agreement(device, out),
               "timing": timing(device, args.train_size)}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"Saved {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
