"""The training-gradient store and its projections: exact rows, projections against explicit
references, scores from a store, and resumption after SIGKILL."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.projection import _real_fourier

from conftest import Problem, relative_error
from jobs import _files, _run


def _fitted(problem: Problem, **options: object) -> ik.Influence:
    return ik.Influence(problem.model, problem.objective, problem.train, chunk_size=4,
                        **{"solver": "direct", **options}).fit()


def test_an_unprojected_store_holds_the_training_gradients(mlp: Problem, tmp_path: Path) -> None:
    inf = _fitted(mlp)
    store = inf.index(tmp_path, shard_size=12)
    rows = np.concatenate([array for _, array in store.blocks()])
    assert store.complete and store.dim == inf.tracked_.dim and store.distortion is None
    assert np.array_equal(rows, inf.train_gradients().numpy())
    scores = inf.score(mlp.test, out=tmp_path / "scores", gradients=store, top_k=3)
    assert relative_error(torch.from_numpy(scores.to_numpy()), inf.loo_change(mlp.test)) < 1e-13


@pytest.mark.parametrize("p", [1, 2, 7, 10])
def test_the_real_fourier_transform_is_orthonormal(p: int) -> None:
    F = _real_fourier(torch.eye(p, dtype=torch.float64))
    torch.testing.assert_close(F @ F.T, torch.eye(p, dtype=torch.float64))


def test_the_random_projection_keeps_inner_products_on_average() -> None:
    """E[PᵀP] = I over the draws of D and S: (1/trials)·Σ PᵀP → I."""
    p, k, trials = 12, 4, 3000
    identity = torch.eye(p, dtype=torch.float64)
    rows = [ik.RandomProjection(dim=k, seed=seed).project(identity) for seed in range(trials)]
    mean = sum(M @ M.T for M in rows) / trials  # row i of M is P e_i, so M Mᵀ = PᵀP
    assert float((mean - identity).abs().max()) < 0.15
    assert ik.RandomProjection(dim=p).project(identity).equal(identity)  # k ≥ p: identity


def _layered_problem() -> Problem:
    """Linear layers with and without bias, a LayerNorm (projected as the rest), float64."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 9), nn.LayerNorm(9), nn.Tanh(),
                          nn.Linear(9, 4, bias=False)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(4, (30,), generator=g)
    objective = ik.CrossEntropyObjective(weight_decay={"": 0.01, "1": 0.002})
    ik.training.train_steps(model, objective, (X, y), steps=200, lr=0.02, batch_size=30)
    return Problem(model, objective, X, y, X[:3], y[:3],
                   [n for n, _ in model.named_parameters()])


def test_kronecker_rows_equal_p_out_g_p_in_transposed_of_the_full_gradients(
        tmp_path: Path) -> None:
    problem = _layered_problem()
    inf = ik.Influence(problem.model, problem.objective, problem.train, damping=0.1,
                       chunk_size=7, stationarity_tol=None, curvature="gauss-newton").fit()
    projection = ik.KroneckerProjection(input_dim=3, output_dim=2, rest_dim=5, seed=2)
    store = inf.index(tmp_path, projection=projection, shard_size=14)
    rows = torch.from_numpy(np.concatenate([array for _, array in store.blocks()]))
    G = torch.stack([problem.train_grad(i) for i in range(30)])  # independent autograd
    names = problem.names  # 0.weight, 0.bias, 1.weight, 1.bias, 3.weight
    sizes = [dict(problem.model.named_parameters())[n].numel() for n in names]
    parts = dict(zip(names, G.split(sizes, dim=1), strict=True))
    W0 = torch.cat([parts["0.weight"].reshape(30, 9, 5), parts["0.bias"].reshape(30, 9, 1)], 2)
    W3 = parts["3.weight"].reshape(30, 4, 9)
    expected = []
    for index, W in enumerate((W0, W3)):
        P_out, P_in = projection.factors(index, W.shape[1], W.shape[2], torch.float64, "cpu")
        expected.append((P_out @ W @ P_in.T).flatten(1))
    rest = torch.cat([parts["1.weight"], parts["1.bias"]], dim=1)
    expected.append(projection.rest().project(rest))
    torch.testing.assert_close(rows, torch.cat(expected, dim=1), rtol=1e-10, atol=1e-12)
    assert store.dim == 2 * 3 + 2 * 3 + 5
    distortion = store.distortion
    assert distortion["sample"] == 7 and distortion["inner_product_error_max"] > 0  # a chunk
    scores = inf.score((problem.X[:2], problem.y[:2]), out=tmp_path / "scores",
                       gradients=store, kind="influence")
    queries = ik.store.gradients.Projector(inf, projection).queries(
        inf.solve(inf.test_gradients((problem.X[:2], problem.y[:2]))))
    torch.testing.assert_close(torch.from_numpy(scores.to_numpy()), -(queries @ rows.T))


def test_a_convolution_is_projected_from_its_unfolded_inputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 2)).double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(2, (12,), generator=g)
    objective = ik.CrossEntropyObjective(weight_decay=0.05)
    problem = Problem(model, objective, X, y, X[:2], y[:2],
                      [n for n, _ in model.named_parameters()])
    inf = ik.Influence(model, objective, (X, y), damping=0.1, stationarity_tol=None).fit()
    projection = ik.KroneckerProjection(input_dim=4, output_dim=2, seed=5)
    rows = torch.from_numpy(np.concatenate(
        [a for _, a in inf.index(tmp_path, projection=projection).blocks()]))
    G = torch.stack([problem.train_grad(i) for i in range(12)])
    W = torch.cat([G[:, :27].reshape(12, 3, 9), G[:, 27:30].reshape(12, 3, 1)], dim=2)
    P_out, P_in = projection.factors(0, 3, 10, torch.float64, "cpu")
    torch.testing.assert_close(rows[:, :8], (P_out @ W @ P_in.T).flatten(1), rtol=1e-10,
                               atol=1e-12)


def test_a_store_for_another_fit_is_refused(mlp: Problem, tmp_path: Path) -> None:
    store = _fitted(mlp).index(tmp_path / "g", shard_size=8)
    other = ik.Influence(mlp.model, ik.CrossEntropyObjective(weight_decay=0.5), mlp.train,
                         chunk_size=4, solver="direct", stationarity_tol=None).fit()
    with pytest.raises(ik.CacheMismatchError, match="objective"):
        other.score(mlp.test, out=tmp_path / "s", gradients=store)
    with pytest.raises(ik.CacheMismatchError, match="other settings"):
        _fitted(mlp).index(tmp_path / "g", projection=ik.RandomProjection(dim=4), shard_size=8)


# writes: manifest (1), distortion (2), then per shard .npy and record, then "complete"
@pytest.mark.parametrize(("kill_at", "when"), [(3, "during"), (6, "after"), (9, "during")])
def test_an_indexing_job_killed_at_any_point_resumes_to_the_same_store(
        tmp_path: Path, job: tuple[Path, dict[str, Path]], kill_at: int, when: str) -> None:
    script, references = job
    reference, resumed = references["index"], tmp_path / "resumed"
    assert _run(script, resumed, "index", kill_at, when) == -signal.SIGKILL
    finished = {p.name: p.stat().st_ino for p in resumed.glob("gradients-*.npy")
                if p.with_suffix(".done.json").exists()}
    assert _run(script, resumed, "index") == 0
    assert _files(resumed) == _files(reference)
    assert {name: (resumed / name).stat().st_ino for name in finished} == finished
    assert math.isclose(ik.open_store(resumed).distortion["norm_ratio_mean"],
                        ik.open_store(reference).distortion["norm_ratio_mean"])
