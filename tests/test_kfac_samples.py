"""K-FAC / EK-FAC with random-sign pullbacks (``samples=r``) against the exact expectation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.randomness import rademacher

from conftest import Problem, make_operator, pearson, relative_error


def _problem(n: int = 600, classes: int = 5, seed: int = 3) -> Problem:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + 8, 6, generator=g, dtype=torch.float64)
    y = torch.randint(classes, (n + 8,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, classes)).double()
    return Problem(model, ik.CrossEntropyObjective(weight_decay=0.01), X[:n], y[:n], X[n:],
                   y[n:], [name for name, _ in model.named_parameters()])


def _fitted(problem: Problem, chunk_size: int = 64, **settings: object) -> ik.solvers.EKFAC:
    solver = ik.solvers.EKFAC(**settings)  # type: ignore[arg-type]
    solver.prepare(make_operator(problem, damping=0.01, chunk_size=chunk_size))
    return solver


def test_signs_are_balanced_uncorrelated_and_a_function_of_the_example() -> None:
    signs = rademacher(torch.arange(40_000), 6, 3, seed=0).double()
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    columns = signs.permute(1, 0, 2).reshape(40_000, 18)
    moments = columns.T @ columns / 40_000  # E[ξ ξᵀ] = I, within 5/√n
    assert (moments - torch.eye(18, dtype=torch.float64)).abs().max() < 5 / 40_000 ** 0.5
    part = rademacher(torch.arange(1_000, 1_050), 6, 3, seed=0).double()
    assert torch.equal(part, signs[:, 1_000:1_050])
    other = rademacher(torch.arange(40_000), 6, 3, seed=1).double()
    assert 0.45 < (other != signs).double().mean() < 0.55


def test_sampled_factors_estimate_the_exact_expectation_without_bias() -> None:
    """The error shrinks with the number of draws (unbiased estimate of the same factors)."""
    problem = _problem()
    exact = _fitted(problem, refine=0)
    errors = {}
    for samples in (1, 256):
        sampled = _fitted(problem, samples=samples, refine=0)
        errors[samples] = max(relative_error(s.S, e.S) for s, e in
                              zip(sampled.blocks_, exact.blocks_, strict=True))
        for s, e in zip(sampled.blocks_, exact.blocks_, strict=True):
            torch.testing.assert_close(s.A, e.A, rtol=1e-12, atol=1e-14)  # A has no s in it
    assert errors[1] < 0.25
    assert errors[256] < errors[1] / 4  # measured 0.069 and 0.0043: the 1/√r of noise


def test_sampled_ekfac_scores_agree_with_the_exact_expectation() -> None:
    problem = _problem()
    V = torch.randn(4, sum(p.numel() for p in problem.model.parameters()),
                    generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = _fitted(problem).apply_inverse(V)
    sampled = _fitted(problem, samples=1).apply_inverse(V)
    assert pearson(sampled, exact) > 0.99


def test_the_estimate_does_not_depend_on_chunking() -> None:
    problem = _problem(n=100)
    first = _fitted(problem, chunk_size=7, samples=2)
    second = _fitted(problem, chunk_size=100, samples=2)
    for a, b in zip(first.blocks_, second.blocks_, strict=True):
        torch.testing.assert_close(a.S, b.S, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a.scale, b.scale, rtol=1e-12, atol=1e-14)


def test_the_report_and_the_plan_say_the_factors_are_sampled() -> None:
    problem = _problem(n=100)
    inf = ik.Influence(problem.model, problem.objective, problem.train,
                       solver=ik.solvers.EKFAC(samples=2), damping=0.01,
                       stationarity_tol=None).fit()
    inf.influence(problem.test)
    assert any("random-sign" in note for note in inf.last_solve_report.notes)
    assert "2 random-sign pullback(s) per example" in str(inf.plan(3))


@pytest.mark.parametrize("samples", [0, -1, 1.5, True])
def test_samples_must_be_a_positive_integer(samples: object) -> None:
    with pytest.raises((ik.InvalidSettingError, ik.InputTypeError), match="samples"):
        ik.solvers.EKFAC(samples=samples)  # type: ignore[arg-type]
