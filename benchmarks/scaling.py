"""Scaling in n: time should grow linearly and peak memory stay flat (exact and Kronecker families).

The benchmark network (MLP 64-256-256-10, problem.py) scores generated training sets of n = 1k
… 50k points against the first 10 of its test points (10, not 100, so that the largest exact run
takes minutes: the cost of a solve is linear in the number of test points at any n). The data is
generated, not downloaded: digits drawn with replacement from the training split plus Gaussian
pixel noise (σ = 0.1), clipped to [0, 1], labelled by the digit they came from. The network is
not at a minimum of these sets, so the exact family uses the (positive semi-definite)
Gauss-Newton curvature with damping 1e-3:

- exact: block CG preconditioned by EK-FAC to relative residual 1e-4;
- Kronecker: EK-FAC alone.

Each (n, method) runs in its own process so that peak memory (VmHWM, see peak_memory.py) is
its own. The table reports seconds, seconds per 1k points, peak memory and CG iterations; the
JSON records it all.

Run: ``python benchmarks/scaling.py --out outputs/bench`` (``make bench`` does).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SIZES = (1_000, 2_000, 5_000, 10_000, 20_000, 50_000)
METHODS = ("exact: CG + EK-FAC preconditioner", "Kronecker: EK-FAC")
NUM_TEST = 10


def generated_training_set(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy copies of training digits, (n, 64) in [0, 1], with their labels."""
    sys.path.insert(0, str(HERE))
    from problem import _digits

    X, y, _, _ = _digits()
    generator = torch.Generator().manual_seed(seed)
    source = torch.randint(len(y), (n,), generator=generator)
    noise = 0.1 * torch.randn(n, X.shape[1], generator=generator, dtype=X.dtype)
    return (X[source] + noise).clamp(0.0, 1.0).float(), y[source]


def _worker(problem_path: str, n: int, method: str, threads: int) -> dict:
    sys.path.insert(0, str(HERE))
    from peak_memory import peak_rss_bytes

    import influencekit as ik

    from problem import load

    torch.set_num_threads(threads)
    problem = load(Path(problem_path))
    X, y = generated_training_set(n)
    solver = ik.CG(preconditioner="ekfac", tol=1e-4) if method.startswith("exact") else "ekfac"
    start = time.perf_counter()
    inf = ik.Influence(problem.model, ik.CrossEntropyObjective(), (X, y), solver=solver,
                       damping=problem.damping, curvature="gauss-newton", chunk_size=1024).fit()
    scores = inf.influence((problem.X_test[:NUM_TEST], problem.y_test[:NUM_TEST]))
    seconds = time.perf_counter() - start
    report = inf.last_solve_report
    return {"n": n, "method": method, "seconds": seconds,
            "peak_rss_bytes": peak_rss_bytes(),
            "iterations": report.iterations, "residual": report.relative_residual,
            "finite": bool(torch.isfinite(scores).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--worker", nargs=3, metavar=("PROBLEM", "N", "METHOD"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = _worker(args.worker[0], int(args.worker[1]), args.worker[2], args.threads)
        print(json.dumps(result))
        return
    sys.path.insert(0, str(HERE))
    import problem as problem_module

    out = Path(args.out)
    problem_path = problem_module.prepare(out)
    rows = []
    for method in METHODS:
        for n in args.sizes:
            completed = subprocess.run(
                [sys.executable, __file__, "--threads", str(args.threads), "--worker",
                 str(problem_path), str(n), method], capture_output=True, text=True, check=False)
            if completed.returncode != 0:
                rows.append({"n": n, "method": method, "error": completed.stderr[-2000:]})
                print(f"{method:38s} n={n:>6d}  FAILED: {completed.stderr.strip()[-300:]}")
                continue
            row = json.loads(completed.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{method:38s} n={n:>6d}  {row['seconds']:8.2f} s  "
                  f"{1000 * row['seconds'] / n:7.3f} s/1k  "
                  f"{row['peak_rss_bytes'] / 2**30:5.2f} GiB  iterations {row['iterations']}")
    payload = {"benchmark": "scaling", "date": time.strftime("%Y-%m-%d"),
               "versions": {"torch": torch.__version__, "python": platform.python_version()},
               "machine": {"processor": platform.processor() or platform.machine(),
                           "threads": args.threads},
               "settings": {"sizes": args.sizes, "methods": METHODS,
                            "data": "digits resampled with replacement + N(0, 0.1²) pixel noise",
                            "curvature": "gauss-newton", "damping": 1e-3, "chunk_size": 1024,
                            "num_test": NUM_TEST},
               "results": rows}
    from influencekit.io import atomic_write_json

    finite = json.loads(json.dumps(payload), parse_constant=lambda _: None)  # NaN → null
    print(f"Saved {atomic_write_json(out / 'scaling.json', finite)}")


if __name__ == "__main__":
    main()
