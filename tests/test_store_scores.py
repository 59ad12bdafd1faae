"""Scores streamed to disk: equal to the in-memory scores, readable lazily, refused when made
with other settings, and resumed bit for bit after SIGKILL at any point."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import influencekit as ik

from conftest import Problem
from jobs import _files, _identities, _run


def _fitted(problem: Problem, **options: object) -> ik.Influence:
    return ik.Influence(problem.model, problem.objective, problem.train, chunk_size=4,
                        **{"solver": "direct", **options}).fit()


@pytest.mark.parametrize("kind", ["loo_change", "influence", "self_influence"])
def test_a_streamed_store_equals_the_in_memory_scores(mlp: Problem, tmp_path: Path,
                                                      kind: str) -> None:
    inf = _fitted(mlp)
    test = None if kind == "self_influence" else mlp.test
    store = inf.score(test, out=tmp_path, kind=kind, top_k=5, shard_size=12)
    expected = {"loo_change": lambda: inf.loo_change(mlp.test),
                "influence": lambda: inf.influence(mlp.test),
                "self_influence": inf.self_influence}[kind]().numpy()
    assert store.complete and store.shape == expected.shape
    assert np.array_equal(store.to_numpy(), expected)
    assert np.array_equal(store.columns(7, 30), expected[..., 7:30])
    rows = expected.reshape(-1 if kind != "self_influence" else 1, expected.shape[-1])
    for side, descending in (("largest", True), ("smallest", False)):
        indices, scores = store.top(side)
        order = np.argsort(-rows if descending else rows, axis=1, kind="stable")[:, :5]
        assert np.array_equal(indices, order)
        assert np.array_equal(scores, np.take_along_axis(rows, order, axis=1))
    assert np.array_equal(ik.open_store(tmp_path).to_numpy(), expected)


def test_a_store_made_with_other_settings_is_refused(mlp: Problem, tmp_path: Path) -> None:
    inf = _fitted(mlp)
    inf.score(mlp.test, out=tmp_path, top_k=3, shard_size=8)
    with pytest.raises(ik.CacheMismatchError, match=r"top_k: store 3 vs now 4"):
        inf.score(mlp.test, out=tmp_path, top_k=4, shard_size=8)
    with pytest.raises(ik.CacheMismatchError, match="queries"):
        inf.score((mlp.X[:2], mlp.y[:2]), out=tmp_path, top_k=3, shard_size=8)
    other = _fitted(mlp, damping=0.5)
    with pytest.raises(ik.CacheMismatchError, match="damping"):
        other.score(mlp.test, out=tmp_path, top_k=3, shard_size=8)
    with pytest.raises(ik.InvalidSettingError, match="multiple of chunk_size=4"):
        inf.score(mlp.test, out=tmp_path / "new", shard_size=6)


# writes in order: manifest (1), queries .npy (2) and record (3), then per shard .npy and record
@pytest.mark.parametrize(("kind", "kill_at", "when"), [
    ("loo_change", 2, "during"), ("loo_change", 6, "after"), ("loo_change", 9, "during"),
    ("loo_change", 14, "after"), ("self_influence", 4, "during"),
    ("self_influence", 11, "after")])
def test_a_job_killed_at_any_point_resumes_to_the_same_store(
        tmp_path: Path, job: tuple[Path, dict[str, Path]], kind: str, kill_at: int,
        when: str) -> None:
    script, references = job
    reference, resumed = references[kind], tmp_path / "resumed"
    assert _run(script, resumed, kind, kill_at, when) == -signal.SIGKILL
    assert not (resumed / "complete.json").exists()
    finished = _identities(resumed)
    assert _run(script, resumed, kind) == 0
    assert _files(resumed) == _files(reference)  # bit for bit, and no temporary files left
    assert {name: _identities(resumed)[name] for name in finished} == finished  # not redone
    store = ik.open_store(resumed)
    assert store.complete and np.array_equal(store.to_numpy(),
                                             ik.open_store(reference).to_numpy())


def test_store_files_hold_no_pickle(mlp: Problem, tmp_path: Path) -> None:
    _fitted(mlp).score(mlp.test, out=tmp_path, top_k=2, shard_size=8)
    for path in tmp_path.glob("*.npy"):
        np.load(path, allow_pickle=False)  # raises if an object array hid a pickle
    assert os.listdir(tmp_path)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "scores-000000.npy")),
                       _fitted(mlp).loo_change(mlp.test)[:, :8])
