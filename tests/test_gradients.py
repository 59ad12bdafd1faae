"""Per-example gradients against a loop of backward(); input gradients against double backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.gradients import GradientComputer
from influencekit.parameters import TrackedParameters

from conftest import Problem


def _loop_of_backward(problem: Problem, test: bool = False) -> torch.Tensor:
    rows = []
    for i in range(problem.X.shape[0]):
        problem.model.zero_grad()
        out = problem.model(problem.X[i : i + 1])
        fn = problem.objective.test_loss if test else problem.objective.train_loss
        loss = fn(out, problem.y[i : i + 1]).sum()
        if not test:
            loss = loss + sum(0.5 * problem.objective.weight_decay * p.pow(2).sum()
                              for p in problem.model.parameters())
        loss.backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in problem.model.parameters()]))
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_per_example_gradients_equal_a_loop_of_backward(name: str,
                                                        request: pytest.FixtureRequest) -> None:
    problem: Problem = request.getfixturevalue(name)
    tracked = TrackedParameters(problem.model)
    computer = GradientComputer(tracked, problem.objective)
    theta = tracked.flat()
    torch.testing.assert_close(computer.train(theta, *problem.train), _loop_of_backward(problem),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(computer.test(theta, *problem.train),
                               _loop_of_backward(problem, test=True), rtol=1e-10, atol=1e-12)


class ItemInForward(nn.Module):
    """A model vmap cannot batch: it reads a value with .item() inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 if x.abs().max().item() < 1e6 else 0.5
        return self.linear(x) * scale


def test_models_vmap_cannot_handle_fall_back_to_a_loop_with_a_warning_naming_the_cause() -> None:
    model = ItemInForward().double()
    objective = ik.CrossEntropyObjective(weight_decay=0.1)
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(3, (6,))
    tracked = TrackedParameters(model)
    computer = GradientComputer(tracked, objective)
    with pytest.warns(RuntimeWarning, match=r"one example at a time.*|RuntimeError: vmap") as seen:
        G = computer.train(tracked.flat(), X, y)
    assert any(".item()" in str(w.message) and "one example at a time" in str(w.message)
               for w in seen)
    assert not computer.vectorize
    reference = GradientComputer(TrackedParameters(model), objective, vectorize=False)
    torch.testing.assert_close(G, reference.train(tracked.flat(), X, y))
    problem = Problem(model, objective, X, y, X, y, [n for n, _ in model.named_parameters()])
    torch.testing.assert_close(G, torch.stack([problem.train_grad(i) for i in range(6)]))


def test_input_gradients_equal_double_backward(mlp: Problem) -> None:
    tracked = TrackedParameters(mlp.model)
    computer = GradientComputer(tracked, mlp.objective)
    theta = tracked.flat()
    S = torch.randn(3, theta.numel(), dtype=torch.float64)
    X, y = mlp.X[:4], mlp.y[:4]
    Q = computer.input_gradients(theta, S, X, y)
    assert Q.shape == (3, 4, X.shape[1])
    for k in range(4):
        x = X[k].clone().requires_grad_(True)
        th = theta.clone().requires_grad_(True)
        loss = mlp.objective.train_loss(mlp.outputs(th, x[None]), y[k : k + 1]).sum()
        (g,) = torch.autograd.grad(loss, th, create_graph=True)
        for j in range(3):
            (expected,) = torch.autograd.grad(g @ S[j], x, retain_graph=True)
            torch.testing.assert_close(Q[j, k], expected, rtol=1e-10, atol=1e-12)
    looped = GradientComputer(tracked, mlp.objective, vectorize=False)
    torch.testing.assert_close(looped.input_gradients(theta, S, X, y), Q)


def test_input_gradients_need_floating_point_inputs(logreg: Problem) -> None:
    tracked = TrackedParameters(logreg.model)
    computer = GradientComputer(tracked, logreg.objective)
    with pytest.raises(TypeError, match="must be one floating-point tensor"):
        computer.input_gradients(tracked.flat(), torch.zeros(1, tracked.dim, dtype=torch.float64),
                                 torch.zeros(2, 5, dtype=torch.long), logreg.y[:2])


def test_every_score_works_end_to_end_for_a_model_vmap_cannot_batch() -> None:
    torch.manual_seed(0)
    model = ItemInForward().double()
    objective = ik.CrossEntropyObjective(weight_decay=0.1)
    X, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(3, (12,))
    ik.training.minimize(model, objective, (X, y), tol=1e-12)
    names = [n for n, _ in model.named_parameters()]
    problem = Problem(model, objective, X, y, X[:3], y[:3], names)
    with pytest.warns(RuntimeWarning, match="one example at a time"):
        inf = ik.Influence(model, objective, (X, y), solver="cg").fit()
        scores = inf.influence(problem.test)
        Q = inf.perturbation_influence(problem.test, [0, 1])
        self_scores = inf.self_influence()
    torch.testing.assert_close(scores, problem.reference_influence(), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(Q, problem.reference_perturbation([0, 1]), rtol=1e-8, atol=1e-12)
    as_test = Problem(model, objective, X, y, X, y, names)
    torch.testing.assert_close(self_scores, torch.diagonal(as_test.reference_influence()),
                               rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("vectorize", [True, False])
def test_gradient_blocks_are_the_flat_gradients_split_by_parameter(mlp: Problem,
                                                                   vectorize: bool) -> None:
    tracked = TrackedParameters(mlp.model)
    computer = GradientComputer(tracked, mlp.objective, vectorize=vectorize)
    theta = tracked.flat()
    blocks = computer.train_blocks(theta, *mlp.train)
    assert [b.shape[1] for b in blocks] == tracked.numels
    flat = computer.train(theta, *mlp.train) - mlp.objective.weight_decay * theta
    torch.testing.assert_close(torch.cat(blocks, dim=1), flat, rtol=1e-12, atol=1e-14)
