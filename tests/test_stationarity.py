"""θ̂ must minimise the objective influence is taken for: measured at fit(), warned about with
the figures; per-parameter weight decay, since most networks do not decay biases."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import influencekit as ik
from influencekit.training import minimize

from conftest import _classification_data, relative_error

NO_BIAS_DECAY = {"": 0.02, "bias": 0.0}


def _data(n: int = 80) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    X, y = _classification_data(n + 6, 4, 3, seed=4)
    return X[:n], y[:n], X[n:], y[n:]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_a_fitted_convex_model_is_stationary_and_not_warned_about() -> None:
    X, y, _, _ = _data()
    model = nn.Linear(4, 3).double()
    objective = ik.CrossEntropyObjective(weight_decay=0.05)
    minimize(model, objective, (X, y), tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ik.StationarityWarning)
        inf = ik.Influence(model, objective, (X, y)).fit()
    assert inf.stationarity_.stationary and inf.stationarity_.ratio < 1e-8


def test_a_model_trained_with_adamw_decoupled_decay_is_warned_about_with_figures() -> None:
    X, y, _, _ = _data()
    model = nn.Linear(4, 3).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
    for _ in range(400):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    with pytest.warns(ik.StationarityWarning) as caught:
        inf = ik.Influence(model, ik.CrossEntropyObjective(weight_decay=0.5), (X, y),
                           damping=0.01).fit()
    message = str(caught[0].message)
    check = inf.stationarity_
    assert f"{check.gradient_norm:.3g}" in message and f"{check.ratio:.3g}" in message
    assert check.ratio > 0.05
    for remedy in ("AdamW", "'bias': 0.0", "curvature='gauss-newton'", "minimize"):
        assert remedy in message


def test_biases_left_out_of_the_decay_need_a_per_parameter_weight_decay() -> None:
    X, y, _, _ = _data()
    model = _mlp()
    minimize(model, ik.CrossEntropyObjective(weight_decay=NO_BIAS_DECAY), (X, y), tol=1e-11)
    with pytest.warns(ik.StationarityWarning, match="not a stationary point"):
        ik.Influence(model, ik.CrossEntropyObjective(weight_decay=0.02), (X, y)).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ik.StationarityWarning)
        inf = ik.Influence(model, ik.CrossEntropyObjective(weight_decay=NO_BIAS_DECAY),
                           (X, y)).fit()
    assert inf.stationarity_.ratio < 1e-7


def _per_parameter_reference(model: nn.Module, decay: dict[str, float], X: torch.Tensor,
                             y: torch.Tensor, X_test: torch.Tensor,
                             y_test: torch.Tensor, damping: float) -> torch.Tensor:
    """I_up,loss with R(θ) = mean ℓ + Σ_k (λ_k/2)‖θ_k‖² and H + λ_d·I, from a dense Hessian by
    torch.func."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    lam = torch.cat([torch.full((size,), decay[name]) for name, size in
                     zip(names, sizes, strict=True)]).double()
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def params(th: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: piece.view(s) for n, piece, s in zip(names, th.split(sizes), shapes,
                                                          strict=True)}

    def loss(th: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, params(th), (x,)), t,
                                           reduction="sum")

    H = torch.func.hessian(lambda th: loss(th, X, y) / len(y) + 0.5 * (lam * th**2).sum())(theta)
    train = torch.stack([torch.func.grad(loss)(theta, X[i : i + 1], y[i : i + 1]) + lam * theta
                         for i in range(len(y))])
    test = torch.stack([torch.func.grad(loss)(theta, X_test[j : j + 1], y_test[j : j + 1])
                        for j in range(len(y_test))])
    H = H + damping * torch.eye(H.shape[0], dtype=H.dtype)
    return -test @ torch.linalg.solve(H, train.T)


@pytest.mark.parametrize("form", ["mapping", "function"])
def test_per_parameter_weight_decay_gives_the_dense_influence(form: str) -> None:
    """(An undecayed output bias leaves softmax regression's Hessian singular along the shift
    of all logits, hence the damping.)"""
    X, y, X_test, y_test = _data()
    model = _mlp()
    spec = NO_BIAS_DECAY if form == "mapping" else (
        lambda name, parameter: 0.0 if parameter.ndim == 1 else 0.02)
    objective = ik.CrossEntropyObjective(weight_decay=spec)
    report = minimize(model, objective, (X, y), tol=1e-11)
    assert report.converged
    expected = _per_parameter_reference(model, {"0.weight": 0.02, "0.bias": 0.0,
                                                "2.weight": 0.02, "2.bias": 0.0},
                                        X, y, X_test, y_test, damping=1e-3)
    for solver in ("direct", "cg"):
        inf = ik.Influence(model, objective, (X, y), solver=solver, damping=1e-3).fit()
        assert relative_error(inf.influence((X_test, y_test)), expected) < 1e-6


def test_kronecker_solvers_take_the_decay_diagonal_in_their_eigenbasis() -> None:
    """δ_jk = Σ_i (Q_A)_ik² λ_i: the diagonal of diag(λ) in the Kronecker eigenbasis."""
    X, y, _, _ = _data()
    model = _mlp()
    objective = ik.CrossEntropyObjective(weight_decay={"": 0.02, "2.bias": 0.3})
    inf = ik.Influence(model, objective, (X, y), solver="ekfac", damping=0.01,
                       stationarity_tol=None).fit()
    block = inf.solver.blocks_[1]  # the last layer: 5 weight columns and the bias column
    lam = torch.tensor([0.02] * 5 + [0.3], dtype=torch.float64)
    rotated = block.Q_A.T @ torch.diag(lam) @ block.Q_A
    torch.testing.assert_close(block.decay[0], rotated.diagonal())
    uniform = ik.Influence(model, ik.CrossEntropyObjective(weight_decay={"": 0.02}), (X, y),
                           solver="ekfac", damping=0.01, stationarity_tol=None).fit()
    plain = ik.Influence(model, ik.CrossEntropyObjective(weight_decay=0.02), (X, y),
                         solver="ekfac", damping=0.01, stationarity_tol=None).fit()
    V = torch.randn(2, plain.tracked_.dim, dtype=torch.float64)
    torch.testing.assert_close(uniform.solve(V), plain.solve(V))


@pytest.mark.parametrize(("spec", "error", "message"), [
    ({"": 0.1, "fc": 0.0}, ik.UnknownParameterError, r"keys \['fc'\] match none of the model"),
    ({"bias": 0.0}, ik.UnknownParameterError, "no λ for parameter '0.weight'"),
])
def test_weight_decay_keys_that_match_nothing_or_clash_are_refused(
        spec: dict, error: type, message: str) -> None:
    X, y, _, _ = _data()
    with pytest.raises(error, match=message):
        ik.Influence(_mlp(), ik.CrossEntropyObjective(weight_decay=spec), (X, y)).fit()


@pytest.mark.parametrize("spec", [-0.1, float("nan"), True, "0.1", {"": -1.0}, {"": True},
                                  {3: 0.1}])
def test_bad_weight_decays_are_refused_at_construction(spec: object) -> None:
    with pytest.raises(ik.InputError, match="weight_decay"):
        ik.CrossEntropyObjective(weight_decay=spec)  # type: ignore[arg-type]
