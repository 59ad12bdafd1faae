"""Two gloo processes under torchrun give what one process gives: influence, self-influence,
top-k, score stores and saved fits, to 1e-10 relative in float64, for every solver family."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import influencekit as ik

SOLVERS = {
    "direct": "ik.Direct()",
    "cg": "ik.CG(tol=1e-12)",
    "cg-ekfac": "ik.CG(tol=1e-12, preconditioner='ekfac')",
    "cg-deflated": "ik.CG(tol=1e-12, preconditioner=ik.Deflated(rank=4, iterations=12, "
                   "subset=40))",
    "lissa": "ik.LiSSA(depth=200, batch_size=10**6, tol=1.0)",
    "kfac": "ik.KFAC()",
    "ekfac": "ik.EKFAC(refine=2)",
    "arnoldi": "ik.Arnoldi(rank=12, remainder='trace')",
}

SCRIPT = textwrap.dedent('''
    import sys, warnings
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch import nn
    import influencekit as ik

    warnings.simplefilter("ignore")
    out = sys.argv[1]
    if len(sys.argv) > 2:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(70, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(3, (70,), generator=generator)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    objective = ik.CrossEntropyObjective(weight_decay=0.01)
    ik.training.train_steps(model, objective, (X, y), steps=150, lr=0.05, batch_size=70)
    test = (X[:4] + 0.05, y[:4])
    results = {}
    for name, solver in SOLVERS.items():
        inf = ik.Influence(model, objective, (X, y), solver=eval(solver), damping=0.05,
                           chunk_size=8).fit()
        results[f"{name}/influence"] = inf.influence(test)
        results[f"{name}/self"] = inf.self_influence()
        top = inf.top_k(test, k=5)
        results[f"{name}/helpful"] = top.helpful.double()
        results[f"{name}/harmful_scores"] = top.harmful_scores
        results[f"{name}/train_gradients"] = inf.train_gradients()
        store = inf.score(test, out=f"{out}/{name}-scores", top_k=3, shard_size=16)
        results[f"{name}/store"] = torch.from_numpy(store.to_numpy())
        results[f"{name}/store_top"] = torch.from_numpy(store.top("largest")[1])
        inf.save(f"{out}/{name}-fit")
        loaded = ik.Influence.load(f"{out}/{name}-fit", model, objective, (X, y))
        results[f"{name}/loaded"] = loaded.influence(test)
    index = inf.index(f"{out}/gradients", shard_size=16)
    results["index"] = torch.cat([torch.from_numpy(a.copy()) for _, a in index.blocks()])
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in results.items()}, f"{out}/results.safetensors")
    if dist.is_initialized():
        # without this, gloo's worker threads can abort the interpreter as it shuts down
        dist.barrier()
        dist.destroy_process_group()
''')


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path, Path]:
    folder = tmp_path_factory.mktemp("distributed")
    script = folder / "job.py"
    script.write_text(f"SOLVERS = {SOLVERS!r}\n" + SCRIPT)
    single, double = folder / "single", folder / "double"
    for command in ([sys.executable, str(script), str(single)],
                    [sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node", "2", str(script), str(double), "distributed"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return (load_file(single / "results.safetensors"), load_file(double / "results.safetensors"),
            single, double)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_two_processes_give_what_one_gives(runs: tuple, name: str) -> None:
    one, two, _, _ = runs
    for key in ("influence", "self", "harmful_scores", "train_gradients", "store", "store_top",
                "loaded"):
        a, b = one[f"{name}/{key}"], two[f"{name}/{key}"]
        assert float((a - b).norm() / a.norm()) <= 1e-10, f"{name}/{key}"
    assert torch.equal(one[f"{name}/helpful"], two[f"{name}/helpful"])


def test_the_stores_of_two_processes_hold_what_one_process_writes(runs: tuple) -> None:
    one, two, single, double = runs
    assert torch.equal(one["index"], two["index"])
    for name in SOLVERS:
        shards = sorted(p.name for p in (single / f"{name}-scores").glob("*.npy"))
        assert shards == sorted(p.name for p in (double / f"{name}-scores").glob("*.npy"))
        for shard in shards:
            a = np.load(single / f"{name}-scores" / shard)
            b = np.load(double / f"{name}-scores" / shard)
            # relative to the shard's norm, as the in-memory results: entries near zero
            # differ by ~1e-13 of the largest (summation order of the all-reduces)
            assert np.linalg.norm(a - b) <= 1e-10 * np.linalg.norm(a), shard
        assert (double / f"{name}-scores" / "complete.json").exists()
        assert ik.open_store(double / f"{name}-scores").complete
