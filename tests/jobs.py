"""A deterministic scoring or indexing job run in a subprocess that can be SIGKILLed at the
N-th file replace (during a write, or just after a shard lands before its commit record)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import torch
    from torch import nn
    import influencekit as ik

    out, kind, kill_at, when = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    replace, calls = os.replace, [0]

    def replace_then_maybe_die(source, destination):
        calls[0] += 1
        if calls[0] == kill_at and when == "during":   # the shard's bytes are in a temporary
            os.kill(os.getpid(), signal.SIGKILL)       # file, not yet renamed into place
        replace(source, destination)
        if calls[0] == kill_at and when == "after":    # renamed, its commit record not written
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace_then_maybe_die
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(40, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(3, (40,), generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    objective = ik.CrossEntropyObjective(weight_decay=0.01)
    ik.training.train_steps(model, objective, (X, y), steps=100, lr=0.05, batch_size=40)
    inf = ik.Influence(model, objective, (X, y), solver="cg", chunk_size=4).fit()
    if kind == "index":
        inf.index(out, projection=ik.RandomProjection(dim=16), shard_size=8)
    else:
        test = None if kind == "self_influence" else (X[:5] + 0.1, y[:5])
        inf.score(test, out=out, kind=kind, top_k=4, shard_size=8)
''')


def _run(script: Path, out: Path, kind: str, kill_at: int = 0, when: str = "never") -> int:
    return subprocess.run([sys.executable, str(script), str(out), kind, str(kill_at), when],
                          timeout=300).returncode


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*"))}


def _identities(folder: Path) -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns)
            for path in folder.glob("scores-*.npy") if path.with_suffix(".done.json").exists()}
