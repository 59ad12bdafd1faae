"""Scores and top-k to disk for n from 10⁴ to 10⁶ training points: time per point and peak memory.

The benchmark MLP architecture (64-256-256-10, tanh, 85,002 parameters), trained briefly with
Adam on scikit-learn's digits; training sets of n points are the digits resampled with pixel
noise σ = 0.1 (as ``scaling.py``); 100 queries; float32; Gauss-Newton curvature with damping
1e-3. For each n, in its own process (so that VmHWM is that run's): fit, then stream the
``loo_change`` scores of the 100 queries and their top-10 to a score store
(``Influence.score``), with

- ``ekfac``: EK-FAC (refine=1), n = 10⁴ … 10⁶;
- ``exact``: block CG preconditioned by EK-FAC to tol 1e-4, n = 10⁴ … ``--exact-max``.

Writes ``scaling_store.json`` with seconds (fit, scoring, total), seconds per 1,000 points, peak
resident memory per run and the peak before any influence work (torch, the model and the
generated data, which grows with n), and versions and settings. ``--methods ekfac`` runs one
family only; ``make bench`` runs the exact family up to ``--exact-max 30000`` (about 18 s per
1,000 points with 100 queries here, so 10⁶ would take five hours).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_memory import peak_rss_bytes

SIZES = [10_000, 30_000, 100_000, 300_000, 1_000_000]


def run(method: str, n: int, out: Path) -> dict:
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    import influencekit as ik

    torch.set_num_threads(args.threads)
    bunch = load_digits()
    X = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target)
    base, labels, test = X[:1257], y[:1257], (X[1257:1357], y[1257:1357])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                              nn.Linear(256, 10))
    objective = ik.CrossEntropyObjective(weight_decay=1e-4)
    ik.training.train_steps(model, objective, (base, labels), steps=400, lr=1e-3,
                            batch_size=64)
    generator = torch.Generator().manual_seed(1)
    source = torch.randint(1257, (n,), generator=generator)
    noise = 0.1 * torch.randn(n, 64, generator=generator)
    train = ((base[source] + noise).clamp(0, 1), labels[source])
    del noise, source
    data_peak = peak_rss_bytes()  # torch, the model and the data, before any influence work
    solver = "ekfac" if method == "ekfac" else ik.CG(tol=1e-4, preconditioner="ekfac")
    start = time.perf_counter()
    inf = ik.Influence(model, objective, train, solver=solver, damping=1e-3,
                       curvature="gauss-newton", stationarity_tol=None, chunk_size=1024).fit()
    fitted = time.perf_counter()
    folder = out / f"{method}-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    store = inf.score(test, out=folder, top_k=10)
    done = time.perf_counter()
    report = inf.last_solve_report
    record = {"method": method, "n": n, "fit_seconds": fitted - start,
              "score_seconds": done - fitted, "seconds": done - start,
              "seconds_per_1000": 1000 * (done - start) / n, "peak_bytes": peak_rss_bytes(),
              "data_peak_bytes": data_peak, "data_bytes": train[0].nbytes + train[1].nbytes,
              "iterations": report.iterations if report else None,
              "complete": store.complete}
    shutil.rmtree(folder, ignore_errors=True)  # 400 MB at n = 10⁶; the figures are kept
    return record


def main() -> None:
    import torch

    import influencekit as ik

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for method, sizes in (("ekfac", SIZES), ("exact", [n for n in SIZES
                                                      if n <= args.exact_max])):
        if method not in args.methods:
            continue
        for n in sizes:
            result = subprocess.run([sys.executable, __file__, "--worker", method, str(n),
                                     "--out", args.out, "--threads", str(args.threads)],
                                    check=True, capture_output=True, text=True)
            record = json.loads(result.stdout.strip().splitlines()[-1])
            records.append(record)
            print(f"{method:6s} n = {n:>9,}: fit {record['fit_seconds']:8.1f} s, scores "
                  f"{record['score_seconds']:8.1f} s, {record['seconds_per_1000']:6.2f} s per "
                  f"1k, peak {record['peak_bytes'] / 2**30:.2f} GiB (before fitting "
                  f"{record['data_peak_bytes'] / 2**30:.2f} GiB)", flush=True)
    summary = {"benchmark": "scaling_store", "date": time.strftime("%Y-%m-%d"),
               "machine": {"processor": platform.processor() or platform.machine(),
                           "cpus": __import__("os").cpu_count()},
               "versions": {"influencekit": ik.__version__, "torch": torch.__version__,
                            "python": platform.python_version()},
               "settings": {"model": "MLP 64-256-256-10 tanh, 85,002 parameters",
                            "queries": 100, "top_k": 10, "curvature": "gauss-newton",
                            "damping": 1e-3, "chunk_size": 1024, "threads": args.threads,
                            "exact": "CG(tol=1e-4, preconditioner='ekfac')"},
               "results": records}
    (out / "scaling_store.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"Saved {out / 'scaling_store.json'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "N"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--exact-max", type=int, default=100_000)
    parser.add_argument("--methods", nargs="+", default=["ekfac", "exact"])
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run(args.worker[0], int(args.worker[1]), Path(args.out))))
    else:
        main()
