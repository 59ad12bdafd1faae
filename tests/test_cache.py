"""The training-gradient cache: same scores, reused across batches and runs, never mixed; and a
fitted Influence that refuses a model changed after fit()."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import influencekit as ik
from influencekit.gradients import GradientComputer
from influencekit.scoring import LayerScorer

from conftest import Problem, make_mlp


class PassCounter:
    """Counts passes over the training examples' gradients (flat rows, per-block, and the
    layer scorer's passes alike)."""

    def __init__(self) -> None:
        self.calls = 0
        self._train = GradientComputer.train
        self._blocks = GradientComputer.train_blocks
        self._layers = LayerScorer.scores

    def __enter__(self) -> PassCounter:
        counter = self

        def train(computer: GradientComputer, *args: object) -> torch.Tensor:
            counter.calls += 1
            return counter._train(computer, *args)

        def blocks(computer: GradientComputer, *args: object) -> list[torch.Tensor]:
            counter.calls += 1
            return counter._blocks(computer, *args)

        def layers(scorer: LayerScorer, *args: object) -> torch.Tensor:
            counter.calls += 1
            return counter._layers(scorer, *args)

        self._patches = [mock.patch.object(GradientComputer, "train", train),
                         mock.patch.object(GradientComputer, "train_blocks", blocks),
                         mock.patch.object(LayerScorer, "scores", layers)]
        for patch in self._patches:
            patch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for patch in self._patches:
            patch.stop()


@pytest.mark.parametrize("solver", ["direct", "cg", "ekfac", "arnoldi"])
def test_cached_scores_equal_uncached_and_skip_the_training_pass(mlp: Problem,
                                                                 solver: str) -> None:
    plain = ik.Influence(mlp.model, mlp.objective, mlp.train, solver=solver, damping=0.01).fit()
    with PassCounter() as uncached:
        expected = plain.influence(mlp.test)
    assert uncached.calls > 0  # the counter sees the uncached path's pass
    cached = ik.Influence(mlp.model, mlp.objective, mlp.train, solver=solver,
                          damping=0.01).fit().cache_train_gradients()
    with PassCounter() as counter:
        scores = cached.influence(mlp.test)
        second_batch = cached.influence((mlp.X[:3], mlp.y[:3]))
    assert counter.calls == 0
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second_batch, plain.influence((mlp.X[:3], mlp.y[:3])),
                               rtol=1e-10, atol=1e-12)


def test_a_cache_file_is_reused_for_the_same_model(mlp: Problem, tmp_path: Path) -> None:
    path = tmp_path / "grads.pt"
    first = ik.Influence(mlp.model, mlp.objective, mlp.train).fit().cache_train_gradients(path)
    assert path.exists() and not list(tmp_path.glob(".*.tmp"))
    second = ik.Influence(mlp.model, mlp.objective, mlp.train).fit()
    with PassCounter() as counter:
        second.cache_train_gradients(path)
        torch.testing.assert_close(second.influence(mlp.test), first.influence(mlp.test))
    assert counter.calls == 0


def _fresh_mlp() -> Problem:
    return make_mlp(n=24, seed=5)


def _cache(problem: Problem, path: Path, objective: ik.Objective | None = None,
           train: object = None, **options: object) -> ik.Influence:
    inf = ik.Influence(problem.model, objective or problem.objective,
                       problem.train if train is None else train, damping=0.01,
                       stationarity_tol=None)
    return inf.fit().cache_train_gradients(path, **options)


@pytest.mark.parametrize("change", ["theta", "untracked parameter", "buffer", "objective setting",
                                    "weight decay per parameter", "data of the same length",
                                    "dataset of the same length", "dtype", "swapped module"])
def test_every_way_a_cache_file_goes_stale_is_refused(change: str, tmp_path: Path) -> None:
    """Each change that alters the training gradients makes the file refused, naming the field."""
    problem = _fresh_mlp()
    path = tmp_path / "grads.pt"
    model, objective, train = problem.model, problem.objective, problem.train
    tracked = None
    if change == "untracked parameter":
        tracked = ["2"]  # the last layer; the first layer stays untracked
    if change == "buffer":
        model = nn.Sequential(*problem.model, nn.BatchNorm1d(3)).double().eval()
        model[3].running_mean.fill_(0.1)
    inf = ik.Influence(model, objective, train, damping=0.01, params=tracked,
                       stationarity_tol=None).fit().cache_train_gradients(path)
    del inf
    field = {"theta": "theta", "untracked parameter": "untracked_parameters_and_buffers",
             "buffer": "untracked_parameters_and_buffers", "objective setting": "objective",
             "weight decay per parameter": "weight_decay", "data of the same length": "data",
             "dataset of the same length": "data", "dtype": "dtype",
             "swapped module": "model_structure"}[change]
    if change == "theta":
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-6
    elif change == "untracked parameter":
        with torch.no_grad():
            model[0].bias[0] += 1e-6
    elif change == "buffer":
        model[3].running_mean[0] += 1e-6
    elif change == "objective setting":
        objective = ik.CrossEntropyObjective(weight_decay=objective.weight_decay * 2)
    elif change == "weight decay per parameter":
        objective = ik.CrossEntropyObjective(weight_decay={"": objective.weight_decay,
                                                           "bias": 0.0})
    elif change == "data of the same length":
        X = problem.X.clone()
        X[3, 1] += 1e-9
        train = (X, problem.y)
    elif change == "dataset of the same length":
        first = ik.Influence(model, objective, TensorDataset(*problem.train), damping=0.01,
                             stationarity_tol=None)
        first.fit().cache_train_gradients(tmp_path / "dataset.pt")
        X = problem.X.clone()
        X[5, 0] += 1e-9
        train = DataLoader(TensorDataset(X, problem.y), batch_size=4, shuffle=True)
        path = tmp_path / "dataset.pt"
    elif change == "dtype":
        model = model.float()
        train = (problem.X.float(), problem.y)
    elif change == "swapped module":  # the same parameters, another activation
        model[1] = nn.Softplus()
    inf = ik.Influence(model, objective, train, damping=0.01, params=tracked,
                       stationarity_tol=None).fit()
    with pytest.raises(ik.CacheMismatchError, match=rf"{field}: file .* vs now"):
        inf.cache_train_gradients(path)


def test_a_data_id_replaces_the_content_hash_and_is_required_again(tmp_path: Path) -> None:
    problem = _fresh_mlp()
    path = tmp_path / "grads.pt"
    _cache(problem, path, data_id="digits-v1")
    inf = ik.Influence(problem.model, problem.objective, problem.train, damping=0.01).fit()
    with PassCounter() as counter:
        inf.cache_train_gradients(path, data_id="digits-v1")
    assert counter.calls == 0
    with pytest.raises(ik.CacheMismatchError, match="pass the same data_id"):
        _cache(problem, path)
    with pytest.raises(ik.CacheMismatchError, match="data_id digits-v1"):
        _cache(problem, path, data_id="digits-v2")


def test_a_cache_file_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    problem = _fresh_mlp()
    path = tmp_path / "grads.pt"
    _cache(problem, path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        gradients = handle.get_tensor("gradients")
    save_file({"gradients": gradients[:-1].contiguous()}, path, metadata=metadata)
    with pytest.raises(ik.CacheMismatchError, match=r"holds \(23, \d+\).*expected .*\(24, \d+\)"):
        _cache(problem, path)
    path.write_bytes(b"not a cache")
    with pytest.raises(ik.CacheMismatchError, match="cannot be read"):
        _cache(problem, path)


def test_cache_files_respect_the_umask(tmp_path: Path) -> None:
    problem = _fresh_mlp()
    previous = os.umask(0o022)
    try:
        _cache(problem, tmp_path / "shared.pt")
        os.umask(0o077)
        _cache(problem, tmp_path / "private.pt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "shared.pt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.pt").stat().st_mode) == 0o600


@pytest.mark.parametrize("change", ["optimizer step", "load_state_dict", "buffer", "dtype",
                                    "replaced parameter", "edit through .data",
                                    "untracked edit through .data", "swapped activation",
                                    "forward hook", "layer setting", "objective setting",
                                    "training tensors"])
def test_a_model_changed_after_fit_is_refused_by_every_call(change: str) -> None:
    problem = _fresh_mlp()
    model = nn.Sequential(*problem.model, nn.BatchNorm1d(3)).double().eval()
    objective = ik.CrossEntropyObjective(weight_decay=problem.objective.weight_decay)
    X = problem.X.clone()
    inf = ik.Influence(model, objective, (X, problem.y), damping=0.01,
                       params=["2", "3"] if change.startswith("untracked") else None,
                       stationarity_tol=None).fit()
    inf.influence(problem.test)
    if change == "optimizer step":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        problem.objective.train_loss(model(problem.X), problem.y).mean().backward()
        optimizer.step()
    elif change == "load_state_dict":
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["0.weight"][0, 0] += 1.0
        model.load_state_dict(state)
    elif change == "buffer":
        model.train()
        model(problem.X)  # batch norm updates its running statistics
        model.eval()
    elif change == "dtype":
        model.float()
    elif change == "replaced parameter":
        model[2].bias = nn.Parameter(model[2].bias.detach() + 1.0)
    elif change == "edit through .data":  # bypasses the version counter, as EMA code does
        model[2].weight.data.add_(1e-7)
    elif change == "untracked edit through .data":
        model[0].weight.data.mul_(1.5)
    elif change == "swapped activation":
        model[1] = nn.Softplus()
    elif change == "forward hook":
        model[0].register_forward_hook(lambda module, inputs, output: 2 * output)
    elif change == "layer setting":
        model[3].eps = 0.5
    elif change == "objective setting":
        objective.weight_decay = 0.5
    elif change == "training tensors":
        X[0, 0] += 1.0
    calls = [lambda: inf.influence(problem.test), lambda: inf.loo_change(problem.test),
             lambda: inf.self_influence(), lambda: inf.params_influence([0]),
             lambda: inf.solve(torch.zeros(inf.tracked_.dim, dtype=torch.float64)),
             lambda: inf.top_k(problem.test, k=2), lambda: inf.cache_train_gradients(),
             lambda: inf.perturbation_influence(problem.test, [0])]
    for call in calls:
        with pytest.raises(ik.StaleFitError, match=r"changed after fit\(\).*Call fit\(\) again"):
            call()


def test_rewriting_the_same_values_is_not_a_change_and_refitting_clears_it() -> None:
    problem = _fresh_mlp()
    inf = ik.Influence(problem.model, problem.objective, problem.train, damping=0.01,
                       stationarity_tol=None).fit()
    before = inf.influence(problem.test)
    problem.model.load_state_dict({k: v.clone() for k, v in problem.model.state_dict().items()})
    torch.testing.assert_close(inf.influence(problem.test), before, rtol=0, atol=0)
    with torch.no_grad():
        problem.model[0].weight.mul_(1.01)
    with pytest.raises(ik.StaleFitError):
        inf.influence(problem.test)
    inf.fit()
    assert not torch.equal(inf.influence(problem.test), before)
