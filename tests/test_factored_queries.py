"""K-FAC/EK-FAC queries kept factored (``query_rank`` with a Kronecker solver): exact where
nothing is truncated, the reported error is the true ‖Q − U Vᵀ‖_F/‖Q‖_F, the scores are those of
the rank-r queries, and the dense route is kept where the factored one does not apply. Also the
per-example gradient norms of the stationarity check, from layer signals."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import influencekit as ik
from influencekit.factored_queries import inverse_factors
from influencekit.gradient_norms import squared_gradient_norms
from influencekit.gradients import GradientComputer
from influencekit.layers import weight_matrix
from influencekit.parameters import TrackedParameters

from conftest import relative_error


def _mlp() -> tuple[nn.Module, ik.CrossEntropyObjective, tuple, tuple]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 12, generator=g, dtype=torch.float64)
    y = torch.randint(4, (200,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 30), nn.Tanh(),
                          nn.Linear(30, 4)).double()
    objective = ik.CrossEntropyObjective(weight_decay={"": 0.01, "bias": 0.002})
    ik.training.train_steps(model, objective, (X, y), steps=150, lr=0.05, batch_size=200)
    return model, objective, (X, y), (X[:7] + 0.1, y[:7])


@pytest.fixture(scope="module")
def mlp() -> tuple:
    return _mlp()


def _fit(problem: tuple, solver: object, **options: object) -> ik.Influence:
    model, objective, train, _ = problem
    return ik.Influence(model, objective, train, solver=solver, damping=0.01, chunk_size=64,
                        stationarity_tol=None, **options).fit()


def _factored(inf: ik.Influence, test: tuple) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the queries the factored route scores with, as dense (m, out, in)."""
    scorer = inf._factored_scorer(inf._test_set(test))
    assert scorer is not None
    out = []
    for U, V in scorer.factors:
        m = scorer.m
        U = U.reshape(U.shape[0], m, -1).permute(1, 0, 2)
        V = V.reshape(V.shape[0], m, -1).permute(1, 0, 2)
        out.append(U @ V.transpose(1, 2))
    return out


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_untruncated_factored_queries_give_the_dense_scores(mlp: tuple, solver: str) -> None:
    test = mlp[3]
    dense = _fit(mlp, solver)
    factored = _fit(mlp, solver, query_rank=64)  # not smaller than any layer
    assert relative_error(factored.influence(test), dense.influence(test)) < 1e-12
    report = factored.last_scoring_report
    assert report.total_query_error == 0 and set(report.layers.values()) == {"low-rank"}
    assert any("factored form" in note for note in factored.last_solve_report.notes)
    assert not any("factored form" in note for note in dense.last_solve_report.notes)


def test_the_reported_error_is_that_of_the_rank_r_queries_and_they_are_what_is_scored(
        mlp: tuple) -> None:
    test = mlp[3]
    dense = _fit(mlp, "ekfac")
    inf = _fit(mlp, "ekfac", query_rank=3)
    scores = inf.influence(test)
    report = inf.last_scoring_report
    S = dense.solve(dense.test_gradients(test))  # the exact preconditioned queries
    truncated = torch.zeros_like(S)
    blocks = inf._factored_scorer(inf._test_set(test)).blocks
    squared_errors = torch.zeros(S.shape[0], dtype=S.dtype)
    for block, Q_r in zip(blocks, _factored(inf, test), strict=True):
        Q = weight_matrix(block, S)
        relative = (Q - Q_r).flatten(1).norm(dim=1) / Q.flatten(1).norm(dim=1)
        squared_errors += (Q - Q_r).flatten(1).pow(2).sum(dim=1)
        # exact up to the float64 cancellation floor (about 1e-8 of ‖Q‖)
        assert abs(float(relative.max()) - report.query_error[block.name]) < 1e-7
        truncated[:, block.weight] = Q_r[:, :, :-1].flatten(1)
        truncated[:, block.bias] = Q_r[:, :, -1]
    assert report.query_error["0"] > 1e-3  # truncation did happen
    total = (squared_errors / S.pow(2).sum(dim=1)).sqrt().max()
    assert abs(float(total) - report.total_query_error) < 1e-7
    # the scores are exactly those of the rank-r queries, regulariser included
    expected = -dense._dot_train_gradients(truncated, "reference")
    assert relative_error(scores, expected) < 1e-12
    # and close to the optimal rank-r truncation of each query: within 2x its error
    for block in blocks:
        Q = weight_matrix(block, S)
        tail = torch.linalg.svdvals(Q)[:, 3:].pow(2).sum(dim=1).sqrt()
        optimal = float((tail / Q.flatten(1).norm(dim=1)).max())
        assert report.query_error[block.name] <= 2 * optimal + 1e-7


def test_the_shared_inverse_factorisation_is_exact_or_the_leading_triplets() -> None:
    g = torch.Generator().manual_seed(1)
    D = torch.rand(9, 14, generator=g, dtype=torch.float64) + 0.05
    U, V = inverse_factors(D, 9)  # L = min(out, in): exact
    torch.testing.assert_close(U @ V.T, 1 / D, rtol=1e-14, atol=1e-14)
    U, V = inverse_factors(D.T.contiguous(), 9)
    torch.testing.assert_close(U @ V.T, 1 / D.T, rtol=1e-14, atol=1e-14)
    big = torch.rand(60, 50, generator=g, dtype=torch.float64) + 0.05
    U, V = inverse_factors(big, 5)
    optimal = torch.linalg.svdvals(1 / big)[5:].pow(2).sum().sqrt()
    assert float((1 / big - U @ V.T).norm()) <= 1.01 * float(optimal)


def test_the_dense_route_is_kept_where_the_factored_one_does_not_apply(mlp: tuple) -> None:
    test = mlp[3]
    for inf in (_fit(mlp, ik.EKFAC(verify=True), query_rank=3),  # the residual needs S
                _fit(mlp, "cg", query_rank=3),  # not a Kronecker solver
                _fit(mlp, "ekfac")):  # nothing to truncate
        assert inf._factored_scorer(inf._test_set(test)) is None
    g = torch.Generator().manual_seed(2)
    X = torch.randn(40, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(3, (40,), generator=g)
    torch.manual_seed(2)
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                        nn.Linear(75, 3)).double()
    objective = ik.CrossEntropyObjective(weight_decay=0.01)
    inf = ik.Influence(cnn, objective, (X, y), solver="ekfac", damping=0.01, query_rank=2,
                       stationarity_tol=None).fit()
    assert inf._factored_scorer(inf._test_set((X[:3], y[:3]))) is None  # T = 25 positions
    inf.influence((X[:3], y[:3]))
    assert not any("factored form" in note for note in inf.last_solve_report.notes)


class _Mixed(nn.Module):
    """A convolution (T > 1), a Linear, an Embedding and a LayerNorm (outside the layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(48, 12)
        self.norm = nn.LayerNorm(12)
        self.embedding = nn.Embedding(5, 4)
        self.out = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        image, token = x[:, :36].reshape(-1, 1, 6, 6), x[:, 36].long()
        h = self.norm(torch.tanh(self.fc(torch.tanh(self.conv(image)).flatten(1))))
        return self.out(torch.cat([h, self.embedding(token)], dim=1))


@pytest.mark.parametrize("decay", [0.01, {"": 0.01, "bias": 0.0}, 0.0])
def test_gradient_norms_from_layer_signals_equal_the_per_example_gradients(decay: object
                                                                           ) -> None:
    torch.manual_seed(0)
    model = _Mixed().double()
    X = torch.cat([torch.randn(9, 36), torch.randint(5, (9, 1)).float()], dim=1).double()
    y = torch.randint(3, (9,))
    tracked = TrackedParameters(model, None)
    gradients = GradientComputer(tracked, ik.CrossEntropyObjective(weight_decay=decay), True)
    theta = tracked.flat()
    reference = gradients.train(theta, X, y).pow(2).sum(dim=1)
    torch.testing.assert_close(squared_gradient_norms(gradients, theta, X, y), reference,
                               rtol=1e-12, atol=0)


def test_a_score_store_keeps_the_factored_queries_and_equals_the_in_memory_scores(
        mlp: tuple, tmp_path) -> None:
    test = mlp[3]
    inf = _fit(mlp, "ekfac", query_rank=3)
    expected = inf.loo_change(test)
    store = inf.score(test, out=tmp_path / "scores", shard_size=64)
    assert torch.equal(torch.from_numpy(store.to_numpy()), expected)
    assert (tmp_path / "scores" / "query-factors-0-U.npy").exists()
    assert not (tmp_path / "scores" / "queries.npy").exists()
    # a resumed job reads the committed factors instead of computing them again
    (tmp_path / "scores" / "scores-000001.npy").unlink()
    inf._factored_scorer = lambda *args: pytest.fail("the factors were computed again")
    again = inf.score(test, out=tmp_path / "scores", shard_size=64)
    assert torch.equal(torch.from_numpy(again.to_numpy()), expected)
