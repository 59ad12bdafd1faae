"""Scores from layer inputs and output gradients equal those from per-example gradients; the
per-layer method follows the cost rule; truncated queries report their error."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import influencekit as ik
from influencekit.scoring import leading_singular_triplets

from conftest import Problem, relative_error


class SharedLayer(nn.Module):
    """One Linear applied twice per forward (weights shared between the uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def _problem(kind: str) -> Problem:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    if kind == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                              nn.Linear(3 * 5 * 5, 3)).double()
        X = torch.randn(30, 2, 5, 5, generator=g, dtype=torch.float64)
    elif kind == "shared":
        model = SharedLayer().double()
        X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    else:  # an MLP with a LayerNorm (scored per example) and a layer without bias
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(),
                              nn.Linear(6, 3, bias=False)).double()
        X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(3, (30,), generator=g)
    objective = ik.CrossEntropyObjective(weight_decay={"": 0.01, "bias": 0.003})
    ik.training.train_steps(model, objective, (X, y), steps=100, lr=0.02, batch_size=30)
    return Problem(model, objective, X, y, X[:5] + 0.1, y[:5],
                   [n for n, _ in model.named_parameters()])


def _influence(problem: Problem, **options: object) -> ik.Influence:
    return ik.Influence(problem.model, problem.objective, problem.train, damping=0.1,
                        curvature="gauss-newton", chunk_size=7, stationarity_tol=None,
                        **options).fit()


# a convolution's pixels and a shared layer's two calls are positions t: T > 1 and m > 1
@pytest.mark.parametrize(("kind", "method"), [("mlp", "direct"), ("cnn", "outer"),
                                              ("shared", "outer")])
def test_layer_scores_equal_per_example_gradient_scores(kind: str, method: str) -> None:
    problem = _problem(kind)
    layers = _influence(problem, scoring="layers")
    gradients = _influence(problem, scoring="gradients")
    scores = layers.influence(problem.test)
    assert relative_error(scores, gradients.influence(problem.test)) < 1e-12
    report = layers.last_scoring_report
    assert report.method == "layers" and gradients.last_scoring_report.method != "layers"
    first = next(iter(report.layers))
    assert report.layers[first] == method
    if kind == "mlp":
        assert report.rest_parameters == 12  # the LayerNorm's weight and bias


def test_a_tracked_subset_is_scored_by_its_layers_only() -> None:
    problem = _problem("mlp")
    options = {"params": ["3"]}
    layers = _influence(problem, scoring="layers", **options)
    gradients = _influence(problem, scoring="gradients", **options)
    assert relative_error(layers.influence(problem.test),
                          gradients.influence(problem.test)) < 1e-12
    assert list(layers.last_scoring_report.layers) == ["3"]


def test_a_single_query_or_a_convolution_picks_the_cheaper_product() -> None:
    problem = _problem("cnn")
    inf = _influence(problem, scoring="layers")
    inf.influence((problem.X_test[:1], problem.y_test[:1]))
    assert inf.last_scoring_report.layers["0"] == "direct"  # m = 1: m·T·o·i < T·o·i + m·o·i
    inf.influence(problem.test)
    assert inf.last_scoring_report.layers["0"] == "outer"


def test_truncated_queries_report_their_error_and_stay_within_its_bound() -> None:
    problem = _problem("mlp")
    exact = _influence(problem)
    truncated = _influence(problem, query_rank=1)
    scores, approximate = exact.influence(problem.test), truncated.influence(problem.test)
    report = truncated.last_scoring_report
    assert report.query_rank == 1 and set(report.query_error) == {"0", "3"}
    S = exact.solve(exact.test_gradients(problem.test))
    G = exact.train_gradients()
    bound = torch.zeros_like(scores)
    for name, (rows, columns) in {"0": ((6, 5), slice(0, 30)),
                                  "3": ((3, 6), slice(42, 60))}.items():
        Q = S[:, columns].reshape(-1, *rows) if name == "3" else torch.cat(
            [S[:, :24].reshape(-1, 6, 4), S[:, 24:30].reshape(-1, 6, 1)], dim=2)
        U, sigma, Vh = torch.linalg.svd(Q, full_matrices=False)
        residual = Q - (U[:, :, :1] * sigma[:, None, :1]) @ Vh[:, :1, :]
        relative = residual.flatten(1).norm(dim=1) / Q.flatten(1).norm(dim=1)
        assert float(relative.max()) == pytest.approx(report.query_error[name], rel=1e-9)
        G_layer = (G[:, columns] if name == "3" else G[:, :30])
        bound += residual.flatten(1).norm(dim=1)[:, None] * G_layer.norm(dim=1)[None, :]
    assert bool(((approximate - scores).abs() <= bound * (1 + 1e-9) + 1e-14).all())
    assert 0 < report.total_query_error < 1
    full = _influence(problem, query_rank=100)  # not smaller than any layer: exact
    assert relative_error(full.influence(problem.test), scores) < 1e-12


def test_query_rank_needs_layer_scoring(logreg: Problem) -> None:
    with pytest.raises(ik.InvalidSettingError, match="query_rank"):
        ik.Influence(logreg.model, logreg.objective, logreg.train, scoring="gradients",
                     query_rank=4)


def test_randomized_truncation_reports_the_exact_error_of_what_it_uses() -> None:
    """Matrices larger than r + 10: the randomized range finder's U σ Vᴴ is U Uᵀ Q, its
    reported error is ‖Q − U σ Vᴴ‖_F exactly, and it is within 1% of the optimal (full SVD)."""
    g = torch.Generator().manual_seed(0)
    left = torch.randn(3, 80, 80, generator=g, dtype=torch.float64)
    decay = torch.logspace(0, -3, 60, dtype=torch.float64)  # a decaying spectrum
    Q = (left[:, :, :60] * decay) @ torch.randn(3, 60, 70, generator=g, dtype=torch.float64)
    U, sigma, Vh = leading_singular_triplets(Q, 8)
    approximation = (U * sigma[:, None, :]) @ Vh
    torch.testing.assert_close(approximation, U @ (U.transpose(1, 2) @ Q), rtol=1e-9,
                               atol=1e-12)
    claimed = (Q.flatten(1).pow(2).sum(1) - sigma.pow(2).sum(1)).clamp_min(0).sqrt()
    actual = (Q - approximation).flatten(1).norm(dim=1)
    torch.testing.assert_close(claimed, actual, rtol=1e-8, atol=1e-10)
    optimal = torch.linalg.svdvals(Q)[:, 8:].pow(2).sum(1).sqrt()
    assert bool((actual <= optimal * 1.01).all()) and bool((actual >= optimal * (1 - 1e-9)).all())
    alone = leading_singular_triplets(Q[1:2], 8, first=1)  # Ω depends on the query alone
    for together, single in zip((U, sigma, Vh), alone, strict=True):
        torch.testing.assert_close(together[1:2], single, rtol=1e-12, atol=1e-12)
