"""EK-FAC fit plus scoring 100 queries, in units of one training epoch, on a 1.1M-parameter MLP.

The network is an MLP 64-1024-1024-10 (tanh, 1,126,410 parameters) trained briefly with Adam on
scikit-learn's digits; the training set is 20,000 digits resampled with pixel noise σ = 0.1 (as
``scaling.py``); the 100 queries are held-out digits. Float32, two threads, Gauss-Newton
curvature with damping 1e-3, weight decay 1e-4.

Each configuration runs in its own process (so that VmHWM, see ``peak_memory.py``, is its own)
and measures, in that process and before anything else, one training epoch two ways:

- ``epoch (train)``: forward, backward and an Adam step over the 20,000 examples in batches of
  128, as the network would be trained;
- ``epoch (fwd+bwd)``: forward and backward of the summed loss in chunks of 1,024 (the chunk
  the influence passes use), no optimiser: the cheaper of the two, and the unit of the ratio.

Then ``Influence(...).fit()`` (with its checks: finite data, the objective's fit, the
stationarity test) and ``influence(queries)``, timed separately. Configurations:

- ``default``: ``EKFAC()`` (exact expectation over the 10 outputs, one least-squares step) and
  exact layer scores;
- ``fast``: ``EKFAC(samples=1, refine=0)`` (one random-sign pullback per example, the published
  EK-FAC factors) and ``query_rank=32``: the queries are preconditioned in factored form
  (``influencekit.factored_queries``), never as 100 dense vectors;
- ``fast-16``: the same with ``query_rank=16``.

The scores of each fast configuration are compared with those of ``default`` (Pearson R over the
whole (100, 20,000) matrix and per query) and with those of ``fast`` (what rank 16 loses).
Writes ``epoch_budget.json``.

Run: ``python benchmarks/epoch_budget.py --out outputs/bench`` (``make bench`` does).
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

N, QUERIES, HIDDEN = 20_000, 100, 1024
CONFIGS = {
    "default": {"solver": {}, "query_rank": None},
    "fast": {"solver": {"samples": 1, "refine": 0}, "query_rank": 32},
    "fast-16": {"solver": {"samples": 1, "refine": 0}, "query_rank": 16},
}


def _problem():
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    import influencekit as ik

    bunch = load_digits()
    X = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target)
    base, labels = X[:1257], y[:1257]
    queries = (X[1257:1257 + QUERIES], y[1257:1257 + QUERIES])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN),
                              nn.Tanh(), nn.Linear(HIDDEN, 10))
    objective = ik.CrossEntropyObjective(weight_decay=1e-4)
    ik.training.train_steps(model, objective, (base, labels), steps=300, lr=1e-3,
                            batch_size=128)
    generator = torch.Generator().manual_seed(1)
    source = torch.randint(1257, (N,), generator=generator)
    noise = 0.1 * torch.randn(N, 64, generator=generator)
    train = ((base[source] + noise).clamp(0, 1), labels[source])
    return model, objective, train, queries


def _epochs(model, objective, train) -> dict:
    import copy

    import torch

    X, y = train
    trained = copy.deepcopy(model)
    optimiser = torch.optim.Adam(trained.parameters(), lr=1e-4)
    start = time.perf_counter()
    for first in range(0, N, 128):
        optimiser.zero_grad()
        objective.train_loss(trained(X[first:first + 128]), y[first:first + 128]).mean().backward()
        optimiser.step()
    train_epoch = time.perf_counter() - start
    start = time.perf_counter()
    for first in range(0, N, 1024):
        model.zero_grad()
        objective.train_loss(model(X[first:first + 1024]), y[first:first + 1024]).sum().backward()
    pass_epoch = time.perf_counter() - start
    model.zero_grad()
    return {"epoch_train_seconds": train_epoch, "epoch_forward_backward_seconds": pass_epoch}


def run(name: str, out: Path) -> dict:
    import torch

    import influencekit as ik

    torch.set_num_threads(args.threads)
    model, objective, train, queries = _problem()
    record = {"config": name, **_epochs(model, objective, train)}
    config = CONFIGS[name]
    start = time.perf_counter()
    inf = ik.Influence(model, objective, train, solver=ik.solvers.EKFAC(**config["solver"]),
                       damping=1e-3, curvature="gauss-newton", chunk_size=1024,
                       query_rank=config["query_rank"]).fit()
    fitted = time.perf_counter()
    scores = inf.influence(queries)
    done = time.perf_counter()
    torch.save(scores, out / f"epoch_budget_{name}.pt")
    scoring = inf.last_scoring_report
    unit = min(record["epoch_train_seconds"], record["epoch_forward_backward_seconds"])
    record.update({
        "parameters": inf.tracked_.dim, "fit_seconds": fitted - start,
        "score_seconds": done - fitted, "total_seconds": done - start,
        "epochs": (done - start) / unit, "peak_bytes": peak_rss_bytes(),
        "query_error": scoring.total_query_error if scoring else None,
        "notes": list(inf.last_solve_report.notes)})
    return record


def main() -> None:
    import torch

    import influencekit as ik

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = {}
    for name in CONFIGS:
        result = subprocess.run([sys.executable, __file__, "--worker", name, "--out", args.out,
                                 "--threads", str(args.threads)],
                                check=True, capture_output=True, text=True)
        record = json.loads(result.stdout.strip().splitlines()[-1])
        records[name] = record
        print(f"{name:8s}: epoch {record['epoch_forward_backward_seconds']:.2f} s (fwd+bwd), "
              f"{record['epoch_train_seconds']:.2f} s (train); fit {record['fit_seconds']:.1f} s"
              f", 100 queries {record['score_seconds']:.1f} s = {record['epochs']:.1f} epochs; "
              f"peak {record['peak_bytes'] / 2**30:.2f} GiB", flush=True)
    agreement = {}
    for name, against in (("fast", "default"), ("fast-16", "default"), ("fast-16", "fast")):
        scores = torch.load(out / f"epoch_budget_{name}.pt")
        reference = torch.load(out / f"epoch_budget_{against}.pt")
        whole = float(torch.corrcoef(torch.stack([scores.flatten(), reference.flatten()]))[0, 1])
        per_query = [float(torch.corrcoef(torch.stack([a, b]))[0, 1])
                     for a, b in zip(scores, reference, strict=True)]
        pair = {"pearson_whole": whole, "pearson_per_query_mean": sum(per_query) / QUERIES,
                "pearson_per_query_min": min(per_query),
                "relative_error": float((scores - reference).norm() / reference.norm())}
        agreement[f"{name} against {against}"] = pair
        print(f"{name} against {against}: Pearson {whole:.4f} whole matrix, per query mean "
              f"{pair['pearson_per_query_mean']:.4f}, min {pair['pearson_per_query_min']:.4f}; "
              f"rel. error {pair['relative_error']:.2e}")
    summary = {"benchmark": "epoch_budget", "date": time.strftime("%Y-%m-%d"),
               "machine": {"processor": platform.processor() or platform.machine(),
                           "cpus": __import__("os").cpu_count()},
               "versions": {"influencekit": ik.__version__, "torch": torch.__version__,
                            "python": platform.python_version()},
               "settings": {"model": f"MLP 64-{HIDDEN}-{HIDDEN}-10 tanh", "n": N,
                            "queries": QUERIES, "damping": 1e-3, "weight_decay": 1e-4,
                            "curvature": "gauss-newton", "chunk_size": 1024,
                            "threads": args.threads, "configs": CONFIGS},
               "runs": records, "agreement": agreement}
    (out / "epoch_budget.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"Saved {out / 'epoch_budget.json'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--worker", metavar="CONFIG")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run(args.worker, Path(args.out))))
    else:
        main()
