"""A model of ≥ 10⁷ parameters within ``max_memory="4GB"``: fitted, indexed and scored.

Model: an MLP 256-2048-2048-2048-2048-10 (tanh; 13,135,882 parameters), float32, trained
briefly on generated data (n training points, Gaussian inputs, labels from a random linear
map). EK-FAC curvature with damping 1e-3. Three runs, each in its own process so that its peak
resident memory (VmHWM) is its own:

- ``exact``: fit, then stream the scores of m queries to a score store (layer scoring, no
  per-example gradient), with ``max_memory="4GB"``;
- ``projected``: fit, index the training gradients with ``KroneckerProjection(256, 256)`` (LoGra:
  P_out G P_inᵀ per layer, never the full gradient), then score the m queries from the store,
  with ``max_memory="4GB"``;
- ``plan``: what ``inf.plan(m)`` predicted, for the record.

It writes ``large_model.json`` with times, peaks, the budget, the store sizes, the distortion
the projection reported, the Pearson R of the projected scores against the exact ones (per
query and over the whole matrix), and the share of the exact top-10 and top-50 training points
(largest and smallest) that the projected scores also put there.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_memory import peak_rss_bytes

BUDGET = "4GB"


def _problem(n: int):
    import torch
    from torch import nn

    import influencekit as ik

    generator = torch.Generator().manual_seed(0)
    X = torch.randn(n + 100, 256, generator=generator)
    W = torch.randn(256, 10, generator=generator)
    y = (X @ W).argmax(dim=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layers = [nn.Linear(256, 2048), nn.Tanh()]
        for _ in range(3):
            layers += [nn.Linear(2048, 2048), nn.Tanh()]
        model = nn.Sequential(*layers, nn.Linear(2048, 10))
    objective = ik.CrossEntropyObjective(weight_decay=1e-4)
    ik.training.train_steps(model, objective, (X[:n], y[:n]), steps=60, lr=1e-4, batch_size=64)
    return model, objective, (X[:n], y[:n]), (X[n:n + args.queries], y[n:n + args.queries])


def run(mode: str, out: Path) -> None:
    import torch

    import influencekit as ik

    torch.set_num_threads(args.threads)
    model, objective, train, test = _problem(args.n)
    inf = ik.Influence(model, objective, train, solver="ekfac", damping=1e-3,
                       curvature="gauss-newton", max_memory=BUDGET, stationarity_tol=None)
    record: dict = {"parameters": sum(p.numel() for p in model.parameters())}
    if mode == "plan":
        record["plan"] = str(inf.plan(args.queries))
    else:
        start = time.perf_counter()
        inf.fit()
        record["fit_seconds"] = time.perf_counter() - start
        record["sizes"] = vars(inf.sizes_)
        start = time.perf_counter()
        if mode == "exact":
            store = inf.score(test, out=out / "exact-scores", top_k=10)
        else:
            gradients = inf.index(out / "projected-gradients",
                                  projection=ik.KroneckerProjection(256, 256))
            record["index_seconds"] = time.perf_counter() - start
            record["store_dim"] = gradients.dim
            record["store_megabytes"] = sum(
                p.stat().st_size for p in (out / "projected-gradients").glob("*.npy")) / 1e6
            record["distortion"] = gradients.distortion
            start = time.perf_counter()
            store = inf.score(test, out=out / "projected-scores", top_k=10, gradients=gradients)
        record["score_seconds"] = time.perf_counter() - start
        record["scoring"] = vars(inf.last_scoring_report) if inf.last_scoring_report else None
        torch.save(torch.from_numpy(store.to_numpy()), out / f"{mode}.pt")
    record["peak_bytes"] = peak_rss_bytes()
    (out / f"{mode}.json").write_text(json.dumps(record, indent=2, default=str))


def main() -> None:
    import torch

    import influencekit as ik

    out = Path(args.out) / "large-model"
    out.mkdir(parents=True, exist_ok=True)
    for mode in ("plan", "exact", "projected"):
        subprocess.run([sys.executable, __file__, "--mode", mode, "--out", args.out,
                        "--n", str(args.n), "--queries", str(args.queries),
                        "--threads", str(args.threads)], check=True)
    runs = {mode: json.loads((out / f"{mode}.json").read_text())
            for mode in ("plan", "exact", "projected")}
    exact, projected = torch.load(out / "exact.pt"), torch.load(out / "projected.pt")

    def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]).double())[0, 1])

    rows = [pearson(a, b) for a, b in zip(projected, exact, strict=True)]

    def overlap(k: int, largest: bool) -> float:
        """Mean share of the exact top-k training points also in the projected top-k."""
        ours = projected.topk(k, dim=1, largest=largest).indices.tolist()
        truth = exact.topk(k, dim=1, largest=largest).indices.tolist()
        return sum(len(set(a) & set(b)) / k for a, b in zip(ours, truth, strict=True)) / len(truth)

    record = {
        "benchmark": "large_model", "date": time.strftime("%Y-%m-%d"),
        "machine": {"processor": platform.processor() or platform.machine(),
                    "cpus": __import__("os").cpu_count()},
        "versions": {"influencekit": ik.__version__, "torch": torch.__version__},
        "settings": {"model": "MLP 256-2048x4-10 tanh", "n": args.n, "queries": args.queries,
                     "budget": BUDGET, "solver": "ekfac", "damping": 1e-3,
                     "curvature": "gauss-newton", "threads": args.threads,
                     "projection": "KroneckerProjection(256, 256)"},
        "runs": runs,
        "pearson_all": pearson(projected, exact),
        "pearson_per_query_min": min(rows), "pearson_per_query_mean": sum(rows) / len(rows),
        "top_k_overlap": {f"{side} {k}": overlap(k, side == "largest")
                          for k in (10, 50) for side in ("largest", "smallest")},
    }
    (Path(args.out) / "large_model.json").write_text(json.dumps(record, indent=2, default=str))
    print(runs["plan"]["plan"])
    for mode in ("exact", "projected"):
        r = runs[mode]
        print(f"{mode:9s} fit {r['fit_seconds']:7.1f} s, score {r['score_seconds']:7.1f} s, "
              f"peak {r['peak_bytes'] / 2**30:.2f} GiB (budget {BUDGET})")
    print(f"projected store: {runs['projected']['store_dim']} numbers per example, "
          f"{runs['projected']['store_megabytes']:.0f} MB; Pearson R against exact: "
          f"{record['pearson_all']:.3f} (all), {record['pearson_per_query_min']:.3f} (worst "
          "query)")
    print(f"top-k overlap with exact: {record['top_k_overlap']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--mode", default="main")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.mode == "main":
        main()
    else:
        run(args.mode, Path(args.out) / "large-model")
