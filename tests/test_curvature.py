"""Hessian-vector products against a dense torch.func.hessian, in every mode and chunking."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.curvature import HessianOperator
from influencekit.data import ExampleSet
from influencekit.gradients import GradientComputer
from influencekit.parameters import TrackedParameters
from influencekit.spectrum import lanczos_ritz_values

from conftest import Problem, dense_gauss_newton, make_operator


@pytest.mark.parametrize("name", ["logreg", "mlp", "binary_logreg"])
@pytest.mark.parametrize("mode", ["forward-over-reverse", "reverse-over-reverse", "loop"])
def test_hvp_equals_dense_hessian_product(name: str, mode: str,
                                          request: pytest.FixtureRequest) -> None:
    problem: Problem = request.getfixturevalue(name)
    H = problem.dense_hessian(damping=0.3)
    op = make_operator(problem, damping=0.3, chunk_size=7, mode=mode)
    V = torch.randn(4, H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V), V @ H, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matvec(V[0]), H @ V[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_dense_matrix_equals_torch_func_hessian_for_any_chunk_size(mlp: Problem,
                                                                   chunk_size: int) -> None:
    op = make_operator(mlp, damping=0.01, chunk_size=chunk_size)
    torch.testing.assert_close(op.dense(block=10), mlp.dense_hessian(0.01), rtol=1e-10,
                               atol=1e-12)


def test_sampled_products_use_only_the_chosen_examples(mlp: Problem) -> None:
    op = make_operator(mlp, damping=0.2)
    idx = torch.tensor([[0, 3, 3, 9], [5, 6, 7, 8]])
    V = torch.randn(2, 3, op.dim, dtype=torch.float64)
    out = op.sampled_matvec(V, idx)
    for r in range(2):
        sub = Problem(mlp.model, mlp.objective, mlp.X[idx[r]], mlp.y[idx[r]], mlp.X_test,
                      mlp.y_test, mlp.names)
        torch.testing.assert_close(out[r], V[r] @ sub.dense_hessian(0.2), rtol=1e-10,
                                   atol=1e-12)


def test_lanczos_finds_the_extreme_eigenvalues(logreg: Problem) -> None:
    H = logreg.dense_hessian()
    exact = torch.linalg.eigvalsh(H)
    ritz = lanczos_ritz_values(lambda v: v @ H, H.shape[0], num_iter=H.shape[0])
    assert float(ritz[-1]) == pytest.approx(float(exact[-1]), rel=1e-8)
    assert float(ritz[0]) == pytest.approx(float(exact[0]), rel=1e-6)


@pytest.mark.parametrize("name", ["logreg", "mlp", "binary_logreg"])
def test_gauss_newton_products_equal_the_dense_gauss_newton_matrix(
        name: str, request: pytest.FixtureRequest) -> None:
    problem: Problem = request.getfixturevalue(name)
    G = dense_gauss_newton(problem, damping=0.1)
    tracked = TrackedParameters(problem.model)
    op = HessianOperator(GradientComputer(tracked, problem.objective), ExampleSet(problem.train),
                         tracked.flat(), 0.1, 7, curvature="gauss-newton")
    V = torch.randn(3, G.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V), V @ G, rtol=1e-10, atol=1e-12)
    idx = torch.tensor([[0, 1, 2], [3, 4, 5]])
    sub = Problem(problem.model, problem.objective, problem.X[idx[1]], problem.y[idx[1]],
                  problem.X_test, problem.y_test, problem.names)
    sampled = op.sampled_matvec(V[:2].unsqueeze(1).expand(2, 2, -1).contiguous(), idx)
    torch.testing.assert_close(sampled[1, 0], dense_gauss_newton(sub, 0.1) @ V[1],
                               rtol=1e-10, atol=1e-12)


def test_gauss_newton_equals_the_hessian_for_a_linear_model(logreg: Problem) -> None:
    """For a model linear in θ the network's second derivatives vanish, so G = H."""
    tracked = TrackedParameters(logreg.model)
    ops = [HessianOperator(GradientComputer(tracked, logreg.objective), ExampleSet(logreg.train),
                           tracked.flat(), 0.0, 7, curvature=c)
           for c in ("hessian", "gauss-newton")]
    torch.testing.assert_close(ops[1].dense(), ops[0].dense(), rtol=1e-10, atol=1e-12)


def test_gauss_newton_is_positive_semidefinite_where_the_hessian_is_not() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(30, 3, dtype=torch.float64), torch.randint(3, (30,))
    tracked = TrackedParameters(model)
    H, G = (HessianOperator(GradientComputer(tracked, ik.CrossEntropyObjective()),
                            ExampleSet((X, y)), tracked.flat(), 0.0, 8, curvature=c).dense()
            for c in ("hessian", "gauss-newton"))
    assert float(torch.linalg.eigvalsh(H)[0]) < -1e-6
    assert float(torch.linalg.eigvalsh(G)[0]) > -1e-10


def test_products_do_not_depend_on_how_many_vectors_go_together(mlp: Problem) -> None:
    V = torch.randn(9, mlp.theta().numel(), dtype=torch.float64)
    together = make_operator(mlp).matvec(V)
    tracked = TrackedParameters(mlp.model)
    one_by_one = HessianOperator(GradientComputer(tracked, mlp.objective), ExampleSet(mlp.train),
                                 tracked.flat(), 0.0, 7, max_vectors=2).matvec(V)
    torch.testing.assert_close(one_by_one, together, rtol=1e-12, atol=1e-13)


def test_lanczos_estimates_the_largest_eigenvalue_in_few_steps(mlp: Problem) -> None:
    """LiSSA's scale uses 20 Lanczos steps: enough for λ_max to a fraction of a percent."""
    H = mlp.dense_hessian()
    exact = float(torch.linalg.eigvalsh(H)[-1])
    ritz = lanczos_ritz_values(make_operator(mlp).matvec, H.shape[0], num_iter=20)
    assert float(ritz[-1]) == pytest.approx(exact, rel=1e-3)
    assert float(ritz[-1]) <= exact * (1 + 1e-10)  # Ritz values never exceed λ_max


def test_auto_mode_follows_a_fixed_rule_and_gives_bit_identical_products(mlp: Problem) -> None:
    H = mlp.dense_hessian(damping=0.3)
    V = torch.randn(20, H.shape[0], dtype=torch.float64)
    first, second = (make_operator(mlp, damping=0.3, chunk_size=7) for _ in range(2))
    products = [first.matvec(V), second.matvec(V)]
    assert torch.equal(products[0], products[1])  # no wall-clock decision between them
    torch.testing.assert_close(products[0], V @ H, rtol=1e-10, atol=1e-12)
    assert first.chosen_mode == second.chosen_mode == "reverse-over-reverse"
    assert first._large_block_mode is None  # nothing was timed


def test_timed_mode_times_both_modes_once_and_records_the_faster(mlp: Problem) -> None:
    H = mlp.dense_hessian(damping=0.3)
    op = make_operator(mlp, damping=0.3, chunk_size=7, mode="timed")
    V = torch.randn(20, H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V), V @ H, rtol=1e-10, atol=1e-12)
    chosen = op.chosen_mode
    assert chosen in ("forward-over-reverse", "reverse-over-reverse")
    assert op._modes(20)[0] == chosen and op._modes(3)[0] in (chosen, "reverse-over-reverse")
    torch.testing.assert_close(op.matvec(V[:17]), V[:17] @ H, rtol=1e-10, atol=1e-12)
    assert op.chosen_mode == chosen  # measured once, kept


def test_curvature_weights_match_the_cross_entropy_closed_form(mlp: Problem) -> None:
    """w_i = ‖p_i − e_{y_i}‖ + ‖diag(p_i) − p_i p_iᵀ‖_F for softmax cross-entropy."""
    weights = make_operator(mlp).curvature_weights()
    with torch.no_grad():
        p = torch.softmax(mlp.model(mlp.X), dim=1)
    onehot = nn.functional.one_hot(mlp.y, p.shape[1]).to(p.dtype)
    output_hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    expected = (p - onehot).norm(dim=1) + output_hessian.flatten(1).norm(dim=1)
    torch.testing.assert_close(weights, expected, rtol=1e-10, atol=1e-12)


def test_curvature_weights_of_wide_outputs_come_from_probes() -> None:
    """300 outputs (> 256): ‖∇²_f ℓ‖_F is estimated by Rademacher probes, exact when ∇²_f ℓ ∝ I
    (mean squared error: ∇²_f ℓ = (2/K)·I, ‖·‖_F = 2/√K)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 300).double()
    X, Y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 300, dtype=torch.float64)
    tracked = TrackedParameters(model)
    op = HessianOperator(GradientComputer(tracked, ik.MSEObjective()), ExampleSet((X, Y)),
                         tracked.flat())
    with torch.no_grad():
        residual_norm = (model(X) - Y).norm(dim=1)
    expected = 2 / 300 * residual_norm + 2 / 300**0.5
    torch.testing.assert_close(op.curvature_weights(), expected, rtol=1e-10, atol=1e-12)


def test_a_restricted_operator_sums_only_its_examples_over_the_full_n(mlp: Problem) -> None:
    """A_S = (1/n) Σ_{i∈S} H_i + shift·I: against an operator built on S alone, whose mean
    divides by |S| instead, and A_S + A_{S^c} − shift·I = A."""
    op = make_operator(mlp, damping=0.01)
    n, shift = op.num_train, op.shift
    chosen = torch.tensor([0, 3, 4, 10, 17, 30])
    rest = torch.tensor([i for i in range(n) if i not in set(chosen.tolist())])
    V = torch.randn(3, op.dim, dtype=torch.float64)
    on_subset = HessianOperator(op.gradients, ExampleSet((mlp.X[chosen], mlp.y[chosen])),
                                op.theta, 0.01, chunk_size=4)
    expected = (on_subset.matvec(V) - shift * V) * (len(chosen) / n) + shift * V
    restricted = op.restricted(chosen)
    torch.testing.assert_close(restricted.matvec(V), expected, rtol=1e-10, atol=1e-12)
    total = restricted.matvec(V) + op.restricted(rest).matvec(V) - shift * V
    torch.testing.assert_close(total, op.matvec(V), rtol=1e-10, atol=1e-12)
