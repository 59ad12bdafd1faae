"""What a new user runs into first: each gets a clear error or just works."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import influencekit as ik
from influencekit.io import atomic_write_bytes, atomic_write_json

from conftest import Problem


class TupleOutput(nn.Module):
    """Returns (logits, features), as many research models do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = torch.tanh(self.body(x))
        return self.head(features), features


def test_a_model_returning_a_tuple_gets_a_wrapper_recipe(logreg: Problem) -> None:
    model = TupleOutput().double()
    with pytest.raises(ik.InputTypeError, match=r"returned a tuple.*return self\.m\(x\)\[0\]"):
        ik.Influence(model, logreg.objective, logreg.train, damping=0.1).fit()


def test_a_bfloat16_model_is_refused_before_any_work(logreg: Problem) -> None:
    model = nn.Linear(5, 3).to(torch.bfloat16)
    with pytest.raises(ik.DtypeError, match=r"float32 or float64.*bfloat16.*model\.float\(\)"):
        ik.Influence(model, logreg.objective, (logreg.X.bfloat16(), logreg.y))


class Bag(nn.Module):
    """An EmbeddingBag text classifier: torch has no second derivative of embedding_bag."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 4, mode="mean")
        self.head = nn.Linear(4, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.bag(tokens))


def _bag_problem() -> tuple[nn.Module, ik.Objective, tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(20, (40, 6), generator=generator)
    labels = (tokens < 10).sum(dim=1).gt(3).long()
    torch.manual_seed(0)
    model = Bag().double()
    objective = ik.CrossEntropyObjective(weight_decay=0.01)
    ik.training.train_steps(model, objective, (tokens, labels), steps=100, lr=0.05,
                            batch_size=40)
    return model, objective, (tokens, labels)


@pytest.mark.parametrize("curvature", ["hessian", "gauss-newton"])
def test_embedding_bag_under_cg_says_which_solvers_work(curvature: str) -> None:
    model, objective, data = _bag_problem()
    with pytest.raises(ik.UnsupportedModelError,
                       match=r"EmbeddingBag.*solver='ekfac' or 'kfac'") as raised:
        ik.Influence(model, objective, data, solver="cg", damping=0.01,
                     curvature=curvature).fit().influence((data[0][:3], data[1][:3]))
    assert isinstance(raised.value, NotImplementedError)  # still what torch's callers catch
    inf = ik.Influence(model, objective, data, solver="ekfac").fit()
    scores = inf.influence((data[0][:3], data[1][:3]))
    assert scores.shape == (3, 40) and bool(torch.isfinite(scores).all())
    assert inf.damping_ >= 0 and "ekfac factors" in inf.damping_reason_


def test_the_readmes_solvers_are_exported_at_the_top_level() -> None:
    for name in ("EKFAC", "KFAC", "Arnoldi", "Deflated", "CG", "Direct", "LiSSA",
                 "CacheMismatchError", "StaleFitError", "StationarityWarning", "SolveReport"):
        assert hasattr(ik, name) and name in ik.__all__
    assert ik.solvers.Deflated is ik.Deflated and "Deflated" in ik.solvers.__all__
    from influencekit.cache import CacheMismatchError
    assert CacheMismatchError is ik.CacheMismatchError


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_output_files_respect_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "figure.png", b"\x89PNG")
        atomic_write_json(tmp_path / "results.json", {"pearson": 0.99})
    finally:
        os.umask(previous)
    for name in ("figure.png", "results.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode
    assert json.loads((tmp_path / "results.json").read_text()) == {"pearson": 0.99}
    assert not list(tmp_path.glob(".*.tmp"))


def test_python_dash_m_runs_the_command_line() -> None:
    result = subprocess.run([sys.executable, "-m", "influencekit", "--version"],
                            capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == f"influencekit {ik.__version__}"
