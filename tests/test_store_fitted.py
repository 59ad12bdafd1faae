"""A fitted Influence saved and loaded: the same scores to the bit, no pass of the model over the
data, refused when anything it depends on differs, no pickle."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

import influencekit as ik
from influencekit.data import ExampleSet
from influencekit.parameters import TrackedParameters

from conftest import Problem

SOLVERS = {
    "direct": lambda: ik.Direct(),
    "cg": lambda: ik.CG(),
    "cg-ekfac": lambda: ik.CG(preconditioner="ekfac"),
    "cg-deflated": lambda: ik.CG(preconditioner=ik.Deflated(rank=3, iterations=10, subset=20)),
    "cg-auto": lambda: ik.CG(preconditioner="auto", block=False, tol=1e-12),
    "lissa": lambda: ik.LiSSA(depth=50, batch_size=16, repeats=2),
    "lissa-ekfac": lambda: ik.LiSSA(depth=30, batch_size=1000, preconditioner="ekfac"),
    "kfac": lambda: ik.KFAC(),
    "ekfac": lambda: ik.EKFAC(refine=2),
    "arnoldi": lambda: ik.Arnoldi(rank=10, remainder="trace"),
    "deflated": lambda: ik.Deflated(base=ik.Arnoldi(rank=8), rank=4, iterations=12),
}


class Evaluations:
    """Counts every evaluation of the model (all passes go through forward_parts)."""

    def __enter__(self) -> Evaluations:
        self.calls = 0
        original = TrackedParameters.forward_parts

        def counted(tracked: TrackedParameters, *args: object) -> torch.Tensor:
            self.calls += 1
            return original(tracked, *args)

        self._patch = mock.patch.object(TrackedParameters, "forward_parts", counted)
        self._patch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._patch.stop()


@pytest.mark.parametrize("name", list(SOLVERS))
def test_a_saved_fit_gives_bit_identical_scores_without_a_pass(mlp: Problem, name: str,
                                                               tmp_path: Path) -> None:
    inf = ik.Influence(mlp.model, mlp.objective, mlp.train, solver=SOLVERS[name]()).fit()
    scores, self_scores = inf.influence(mlp.test), inf.self_influence()
    inf.save(tmp_path)
    with Evaluations() as evaluations:
        loaded = ik.Influence.load(tmp_path, mlp.model, mlp.objective, mlp.train)
    assert evaluations.calls == 0
    assert loaded.damping_ == inf.damping_ and loaded.damping_reason_ == inf.damping_reason_
    assert torch.equal(loaded.influence(mlp.test), scores)
    assert torch.equal(loaded.self_influence(), self_scores)
    assert loaded.stationarity_ == inf.stationarity_


def test_with_a_data_id_loading_does_not_read_the_data(mlp: Problem, tmp_path: Path) -> None:
    inf = ik.Influence(mlp.model, mlp.objective, TensorDataset(*mlp.train), solver="ekfac").fit()
    inf.save(tmp_path, data_id="mlp-train-v1")
    with mock.patch.object(ExampleSet, "batches", side_effect=AssertionError("read")):
        loaded = ik.Influence.load(tmp_path, mlp.model, mlp.objective,
                                   TensorDataset(*mlp.train), data_id="mlp-train-v1")
    torch.testing.assert_close(loaded.influence(mlp.test), inf.influence(mlp.test), rtol=0,
                               atol=0)
    with pytest.raises(ik.CacheMismatchError, match="pass the same data_id"):
        ik.Influence.load(tmp_path, mlp.model, mlp.objective, TensorDataset(*mlp.train))


@pytest.mark.parametrize(("change", "field"), [
    ("theta", "theta"), ("objective", "objective"), ("data", "data"),
    ("structure", "model_structure")])
def test_loading_for_anything_else_is_refused_naming_it(mlp: Problem, tmp_path: Path,
                                                       change: str, field: str) -> None:
    ik.Influence(mlp.model, mlp.objective, mlp.train, solver="direct").fit().save(tmp_path)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model.load_state_dict(mlp.model.state_dict())
    objective, train = mlp.objective, mlp.train
    if change == "theta":
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-9
    elif change == "objective":
        objective = ik.CrossEntropyObjective(weight_decay=0.02)
    elif change == "data":
        train = (mlp.X.flip(0), mlp.y.flip(0))
    elif change == "structure":
        model[1] = nn.Sigmoid()
    with pytest.raises(ik.CacheMismatchError, match=rf"\b{field}\b.*differ"):
        ik.Influence.load(tmp_path, model, objective, train)


def test_the_saved_files_are_safetensors_and_json_and_tie_together(mlp: Problem,
                                                                   tmp_path: Path) -> None:
    inf = ik.Influence(mlp.model, mlp.objective, mlp.train, solver="ekfac").fit()
    inf.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fitted.safetensors", "manifest.json"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    tensors = load_file(tmp_path / "fitted.safetensors")  # no pickle involved
    assert set(tensors) == set(manifest["tensors"])
    assert torch.equal(tensors["theta"], inf.theta_)
    assert manifest["solver"] == {"solver": "EKFAC", "settings": inf.solver.settings()}
    assert manifest["torch"] == torch.__version__ and manifest["influencekit"] == ik.__version__
    assert manifest["fingerprint"]["theta"]
    ik.Influence(mlp.model, mlp.objective, mlp.train, solver="direct").fit().save(
        tmp_path / "other")
    (tmp_path / "fitted.safetensors").write_bytes(
        (tmp_path / "other" / "fitted.safetensors").read_bytes())
    with pytest.raises(ik.CacheMismatchError, match="SHA-256 differs"):
        ik.Influence.load(tmp_path, mlp.model, mlp.objective, mlp.train)
    with pytest.raises(ik.CacheMismatchError, match="holds no saved fit"):
        ik.Influence.load(tmp_path / "missing", mlp.model, mlp.objective, mlp.train)


def test_saving_needs_a_fit(mlp: Problem, tmp_path: Path) -> None:
    with pytest.raises(ik.NotFittedError):
        ik.Influence(mlp.model, mlp.objective, mlp.train).save(tmp_path)
