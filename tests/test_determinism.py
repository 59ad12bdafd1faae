"""Same inputs and seed, same scores to the bit — across fresh processes, whatever the caller's
global random state; library code never seeds or reads the global RNG; the vmap fallback never
hides a user's bug."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import influencekit as ik
from influencekit.gradients import GradientComputer
from influencekit.parameters import TrackedParameters

from conftest import Problem

SOLVERS = {
    "direct": "ik.Direct()",
    "cg": "ik.CG()",
    "lissa": "ik.LiSSA(depth=60, batch_size=16, repeats=2, seed=3)",
    "kfac": "ik.KFAC()",
    "ekfac": "ik.EKFAC()",
    "arnoldi": "ik.Arnoldi(rank=8)",
    "deflated": "ik.Deflated(rank=4, iterations=20, subset=30)",
}

SCRIPT = textwrap.dedent('''
    import sys, warnings
    import torch
    from torch import nn
    import influencekit as ik

    warnings.simplefilter("ignore")
    out, global_seed = sys.argv[1], int(sys.argv[2])
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(48, 5, generator=generator)
    y = torch.randint(3, (48,), generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    objective = ik.CrossEntropyObjective(weight_decay=0.01)
    ik.training.train_steps(model, objective, (X, y), steps=200, lr=0.02, batch_size=16)
    torch.manual_seed(global_seed)            # the caller's random state differs per run
    torch.rand(global_seed)                   # and has been drawn from
    scores = {}
    for name, solver in SOLVERS.items():
        inf = ik.Influence(model, objective, (X, y), solver=eval(solver), chunk_size=20).fit()
        scores[name] = inf.influence((X[:6], y[:6]))
        scores[name + "-self"] = inf.self_influence()
    torch.save(scores, out)
''')


def test_every_solver_gives_bit_identical_scores_in_fresh_processes(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(f"SOLVERS = {SOLVERS!r}\n" + SCRIPT)
    runs = []
    for global_seed in (1, 2):
        out = tmp_path / f"scores{global_seed}.pt"
        subprocess.run([sys.executable, str(script), str(out), str(global_seed)], check=True,
                       timeout=600)
        runs.append(torch.load(out, weights_only=True))
    assert set(runs[0]) == {*SOLVERS, *(f"{name}-self" for name in SOLVERS)}
    for name, scores in runs[0].items():
        assert bool(torch.isfinite(scores).all()), name
        assert torch.equal(scores, runs[1][name]), f"{name} differs between processes"


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_library_calls_leave_the_global_random_state_alone(mlp: Problem, solver: str) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    inf = ik.Influence(mlp.model, mlp.objective, mlp.train, solver=eval(SOLVERS[solver]),
                       damping=0.01).fit()
    first = inf.influence(mlp.test)
    inf.self_influence()
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # another global state: the same scores
    again = ik.Influence(mlp.model, mlp.objective, mlp.train, solver=eval(SOLVERS[solver]),
                         damping=0.01).fit().influence(mlp.test)
    assert torch.equal(first, again)


def test_training_steps_leave_the_global_random_state_alone() -> None:
    data = (torch.randn(30, 4, dtype=torch.float64), torch.randint(3, (30,)))
    results = []
    for global_seed in (5, 6):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.3), nn.Linear(6, 3)).double()
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        ik.training.train_steps(model, ik.CrossEntropyObjective(), data, steps=20, seed=4)
        assert torch.equal(torch.get_rng_state(), before)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])  # dropout masks come from the seed argument


class SqueezedLoss(ik.Objective):
    """A user's bug that only shows per example: squeeze() also drops the batch dimension of a
    batch of one, so the loss of a single example has no batch axis."""

    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(outputs.squeeze(), targets, reduction="none")


def test_a_users_bug_is_raised_as_it_is_not_retried_in_a_loop(logreg: Problem) -> None:
    tracked = TrackedParameters(logreg.model)
    computer = GradientComputer(tracked, SqueezedLoss())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "falling back to a loop" warning
        with pytest.raises(RuntimeError) as raised:
            computer.train(tracked.flat(), logreg.X[:4], logreg.y[:4])
    assert not isinstance(raised.value, ik.InfluenceKitError)
    assert computer.vectorize  # still vectorised: nothing was wrong with vmap


@pytest.mark.parametrize("solver", ["deflated", "lissa", "arnoldi"])
def test_scores_do_not_depend_on_the_default_dtype(mlp: Problem, solver: str) -> None:
    """Random start vectors are drawn in float64 whatever torch's default dtype is."""
    runs = []
    for default in (torch.float32, torch.float64):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            runs.append(ik.Influence(mlp.model, mlp.objective, mlp.train,
                                     solver=eval(SOLVERS[solver]), damping=0.01).fit()
                        .influence(mlp.test))
        finally:
            torch.set_default_dtype(previous)
    assert torch.equal(runs[0], runs[1])
