"""The training-gradient cache: same scores, reused across batches and runs, never mixed."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch

import influencekit as ik
from influencekit.cache import CacheMismatchError

from conftest import Problem


@pytest.mark.parametrize("solver", ["direct", "cg", "ekfac", "arnoldi"])
def test_cached_scores_equal_uncached_and_skip_the_training_pass(mlp: Problem,
                                                                 solver: str) -> None:
    plain = ik.Influence(mlp.model, mlp.objective, mlp.train, solver=solver, damping=0.01).fit()
    cached = ik.Influence(mlp.model, mlp.objective, mlp.train, solver=solver,
                          damping=0.01).fit().cache_train_gradients()
    with mock.patch.object(cached.gradients_, "train", side_effect=AssertionError("recomputed")):
        scores = cached.influence(mlp.test)
        second_batch = cached.influence((mlp.X[:3], mlp.y[:3]))
    torch.testing.assert_close(scores, plain.influence(mlp.test), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second_batch, plain.influence((mlp.X[:3], mlp.y[:3])),
                               rtol=1e-10, atol=1e-12)


def test_a_cache_file_is_reused_for_the_same_model(mlp: Problem, tmp_path: Path) -> None:
    path = tmp_path / "grads.pt"
    first = ik.Influence(mlp.model, mlp.objective, mlp.train).fit().cache_train_gradients(path)
    assert path.exists() and not list(tmp_path.glob(".*.tmp"))
    second = ik.Influence(mlp.model, mlp.objective, mlp.train).fit()
    with mock.patch.object(second.gradients_, "train", side_effect=AssertionError("recomputed")):
        second.cache_train_gradients(path)
        torch.testing.assert_close(second.influence(mlp.test), first.influence(mlp.test))


def test_a_cache_file_made_for_something_else_is_refused(mlp: Problem, tmp_path: Path) -> None:
    path = tmp_path / "grads.pt"
    ik.Influence(mlp.model, mlp.objective, mlp.train).fit().cache_train_gradients(path)
    other_objective = ik.CrossEntropyObjective(weight_decay=0.5)
    with pytest.raises(CacheMismatchError, match=r"objective: file .*weight_decay=0.01"):
        ik.Influence(mlp.model, other_objective, mlp.train).fit().cache_train_gradients(path)
    with pytest.raises(CacheMismatchError, match="data"):
        ik.Influence(mlp.model, mlp.objective, (mlp.X + 1, mlp.y)).fit().cache_train_gradients(
            path)
