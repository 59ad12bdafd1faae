"""A memory budget: sizes parsed, chunks and query groups shrunk to fit, the same scores, and a
plan made from one forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.memory import parse_size
from test_store_fitted import Evaluations

from conftest import Problem, _classification_data, relative_error


@pytest.mark.parametrize(("text", "size"), [("4GB", 4 * 10**9), ("512 MiB", 512 * 2**20),
                                            ("1.5gb", 1.5e9), (3_000_000, 3_000_000)])
def test_sizes_are_parsed(text: object, size: float) -> None:
    assert parse_size(text) == int(size)


@pytest.mark.parametrize("text", ["4 parsecs", "", "-1GB", 1000, True, [1]])
def test_bad_sizes_are_refused(text: object) -> None:
    with pytest.raises(ik.InfluenceKitError, match="max_memory"):
        parse_size(text)


def test_a_small_budget_shrinks_chunks_and_query_groups_not_the_scores() -> None:
    """A 2,403-parameter MLP in float64: 19 kB per parameter vector, 14 kB of activations per
    example and pass; a 1.1 MB budget allows 4 queries per solve and 18 examples per chunk."""
    X, y = _classification_data(66, 4, 3, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 300), nn.Tanh(), nn.Linear(300, 3)).double()
    objective = ik.CrossEntropyObjective(weight_decay=0.01)
    ik.training.train_steps(model, objective, (X[:60], y[:60]), steps=50, lr=0.01)
    train, test = (X[:60], y[:60]), (X[60:], y[60:])
    options = {"damping": 0.01, "solver": ik.CG(tol=1e-12), "stationarity_tol": None,
               "curvature": "gauss-newton"}
    free = ik.Influence(model, objective, train, **options).fit()
    tight = ik.Influence(model, objective, train, max_memory="1.1MB", **options).fit()
    sizes = tight.sizes_
    assert sizes.query_group < 6 and sizes.chunk_size < 60
    assert tight.chunk_size == sizes.chunk_size
    assert tight.operator_.max_vectors == sizes.max_vectors
    scores = tight.influence(test)
    assert relative_error(scores, free.influence(test)) < 1e-9
    assert tight.last_solve_report.details["solves"] == -(-6 // sizes.query_group)


def test_the_plan_costs_one_forward_of_one_example(mlp: Problem) -> None:
    inf = ik.Influence(mlp.model, mlp.objective, mlp.train, solver="ekfac", max_memory="64MB")
    with Evaluations() as evaluations:
        plan = inf.plan(num_test=10)
    assert evaluations.calls == 1
    text = str(plan)
    for stage in ("fit: data checks", "fit: K-FAC factors", "solve: EKFAC", "scores: 10 × 40"):
        assert stage in text
    assert plan.sizes.budget == 64 * 10**6 and plan.parameters == mlp.theta().numel()
    assert all(peak > 0 for _, peak, _, _ in plan.stages)


def test_queries_beyond_half_the_budget_take_several_passes_and_a_store_refuses_them(
        tmp_path: Path) -> None:
    """12,003 float64 parameters: 96 kB per solved query, twice with layer scoring; the
    quarter of a 2.2 MB budget kept for them holds 2 of 6."""
    X, y = _classification_data(46, 4, 3, seed=1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 1500), nn.Tanh(), nn.Linear(1500, 3)).double()
    objective = ik.CrossEntropyObjective(weight_decay=0.01)
    train, test = (X[:40], y[:40]), (X[40:], y[40:])
    options = {"damping": 0.01, "solver": "ekfac", "stationarity_tol": None,
               "curvature": "gauss-newton"}
    free = ik.Influence(model, objective, train, **options).fit()
    tight = ik.Influence(model, objective, train, max_memory="2.2MB", **options).fit()
    held = tight.queries_held()
    assert held == 2
    assert relative_error(tight.influence(test), free.influence(test)) < 1e-10
    with pytest.raises(ik.InvalidSettingError, match="groups of at most 2"):
        tight.score(test, out=tmp_path / "six")
    assert not (tmp_path / "six").exists()  # refused before anything was written
    store = tight.score((X[40:42], y[40:42]), out=tmp_path / "two", top_k=3)
    torch.testing.assert_close(torch.from_numpy(store.to_numpy()),
                               free.loo_change((X[40:42], y[40:42])), rtol=1e-10, atol=1e-14)
