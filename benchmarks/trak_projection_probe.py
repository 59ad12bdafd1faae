"""Why TRAK scores near zero on the GPT of lds_gpt.py: the TRAK estimator with and without
its random projection, on the same ground truth.

TRAK with one model and the loss as output function scores a training sequence i against a
query by φ_qᵀ (ΦᵀΦ + λI)⁻¹ φ_i, φ = P g (per-example gradients g projected by a random P to k
dimensions). Unprojected (k = p) this is g_qᵀ Gᵀ(GGᵀ + λI)⁻¹ g_i in the n-dimensional dual. The
probe computes both, for several k and λ, with influencekit's own per-example gradients of the
seed-0 model, and prints the LDS of each against the cached ground truth (run lds_gpt.py first).

    .bench-venv/bin/python benchmarks/trak_projection_probe.py --out outputs/bench
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lds_common  # noqa: E402
import lds_gpt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--dimensions", type=int, nargs="+", default=[128, 512, 2048, 8192])
    parser.add_argument("--ridges", type=float, nargs="+", default=[0.0, 1e3, 1e4, 1e5])
    args = parser.parse_args()
    ids, queries, vocabulary = lds_gpt.sequences(500, 32)
    settings = argparse.Namespace(out=args.out, train=500, queries=32, layers=2, epochs=6,
                                  subsets=32)  # lds_gpt.py's defaults

    def untrained(indices, seed):
        raise RuntimeError("the ground truth is not cached: run lds_gpt.py first")

    truth = lds_gpt.ground_truth_store(untrained, queries, settings)
    torch.set_num_threads(2)
    model = lds_gpt.train(ids, vocabulary, 2, 6, 0)
    inf = lds_gpt._influence(model, ids, "cg", 0.1).fit()
    G = inf.train_gradients().double()  # (n, p)
    T = inf.test_gradients((queries, queries)).double()  # (m, p)
    table = lds_common.Table(truth)
    K, C = G @ G.T, T @ G.T
    print(f"n = {len(G)}, p = {G.shape[1]}, mean squared gradient norm {K.trace() / len(G):.4g}")
    for ridge in args.ridges:
        table.record(f"unprojected, λ = {ridge:g}", lambda ridge=ridge: -torch.linalg.solve(
            K + ridge * torch.eye(len(K), dtype=K.dtype), C.T).T)
    generator = torch.Generator().manual_seed(0)
    for k in args.dimensions:
        Gp = torch.zeros(len(G), k, dtype=torch.float64)
        Tp = torch.zeros(len(T), k, dtype=torch.float64)
        for start in range(0, G.shape[1], 20_000):
            rows = min(20_000, G.shape[1] - start)
            P = torch.randn(rows, k, generator=generator, dtype=torch.float64) / k ** 0.5
            Gp += G[:, start:start + rows] @ P
            Tp += T[:, start:start + rows] @ P
        for ridge in args.ridges:
            table.record(f"projected to k = {k}, λ = {ridge:g}",
                         lambda Gp=Gp, Tp=Tp, ridge=ridge, k=k: -(Tp @ torch.linalg.solve(
                             Gp.T @ Gp + ridge * torch.eye(k, dtype=torch.float64), Gp.T)))


if __name__ == "__main__":
    main()
