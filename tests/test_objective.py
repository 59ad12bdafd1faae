"""Built-in objectives against their closed forms, and their input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import influencekit as ik


def test_cross_entropy_is_negative_log_softmax() -> None:
    logits = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(4, (7,))
    expected = -torch.log_softmax(logits, dim=1)[torch.arange(7), y]
    torch.testing.assert_close(ik.CrossEntropyObjective().train_loss(logits, y), expected)


@pytest.mark.parametrize("shape", [(6,), (6, 1)])
def test_binary_logistic_accepts_zero_one_and_signed_labels(shape: tuple[int, ...]) -> None:
    s = torch.randn(*shape, dtype=torch.float64)
    y01 = torch.tensor([0, 1, 1, 0, 1, 0])
    ypm = 2 * y01 - 1
    expected = torch.log1p(torch.exp(-ypm * s.reshape(-1)))
    objective = ik.BinaryLogisticObjective()
    torch.testing.assert_close(objective.train_loss(s, y01), expected)
    torch.testing.assert_close(objective.train_loss(s, ypm), expected)


def test_smooth_hinge_formula_and_limit() -> None:
    s = torch.linspace(-3, 3, 25, dtype=torch.float64)
    y = torch.ones(25)
    for t in (0.1, 0.5):
        expected = t * torch.log1p(torch.exp((1 - s) / t))
        torch.testing.assert_close(ik.SmoothHingeObjective(t).train_loss(s, y), expected)
    hinge = torch.clamp(1 - s, min=0)
    torch.testing.assert_close(ik.SmoothHingeObjective(0.0).train_loss(s, y), hinge)
    gap = (ik.SmoothHingeObjective(1e-3).train_loss(s, y) - hinge).abs().max()
    assert gap <= 1e-3 * math.log(2) + 1e-12  # t·log 2 is the largest gap, at the kink


def test_mse_matches_torch_mse_per_example() -> None:
    out, target = torch.randn(5, 3), torch.randn(5, 3)
    expected = F.mse_loss(out, target, reduction="none").mean(dim=1)
    torch.testing.assert_close(ik.MSEObjective().train_loss(out, target), expected)
    torch.testing.assert_close(ik.MSEObjective().train_loss(out[:, :1], target[:, 0]),
                               (out[:, 0] - target[:, 0]) ** 2)


def test_regularizer_is_half_lambda_squared_norm() -> None:
    theta = torch.tensor([1.0, -2.0, 2.0])
    assert float(ik.CrossEntropyObjective(weight_decay=0.1).regularizer(theta)) == pytest.approx(
        0.5 * 0.1 * 9.0)


def test_test_loss_defaults_to_training_loss_without_regularizer() -> None:
    logits, y = torch.randn(4, 3), torch.randint(3, (4,))
    objective = ik.CrossEntropyObjective(weight_decay=5.0)
    torch.testing.assert_close(objective.test_loss(logits, y), objective.train_loss(logits, y))


@pytest.mark.parametrize(
    ("objective", "outputs", "targets", "message"),
    [
        (ik.CrossEntropyObjective(), torch.randn(4), torch.zeros(4, dtype=torch.long),
         "expects logits of shape"),
        (ik.CrossEntropyObjective(), torch.randn(4, 3), torch.zeros(4),
         "integer class indices"),
        (ik.CrossEntropyObjective(), torch.randn(4, 3), torch.tensor([0, 1, 2, 3]),
         r"must lie in \[0, 3\)"),
        (ik.CrossEntropyObjective(), torch.randn(4, 3), torch.zeros(5, dtype=torch.long),
         "same number of examples"),
        (ik.BinaryLogisticObjective(), torch.randn(4, 3), torch.zeros(4),
         "one score per example"),
        (ik.BinaryLogisticObjective(), torch.randn(4), torch.tensor([0, 1, 2, 1]),
         r"labels in \{0, 1\} or \{-1, \+1\}"),
        (ik.SmoothHingeObjective(), torch.randn(4), torch.tensor([-1, 0, 1, 1]),
         r"labels in \{0, 1\} or \{-1, \+1\}"),
        (ik.MSEObjective(), torch.randn(4, 2), torch.randn(4, 3), "expects targets with the shape"),
    ],
)
def test_check_rejects_outputs_that_do_not_fit(objective: ik.Objective, outputs: torch.Tensor,
                                               targets: torch.Tensor, message: str) -> None:
    with pytest.raises(ik.ObjectiveMismatchError, match=message):
        objective.check(outputs, targets)


@pytest.mark.parametrize("value", [-0.1, float("nan"), "0.1"])
def test_weight_decay_must_be_a_non_negative_number(value: object) -> None:
    with pytest.raises(ValueError, match="weight_decay must be"):
        ik.CrossEntropyObjective(weight_decay=value)  # type: ignore[arg-type]


def test_negative_temperature_is_refused() -> None:
    with pytest.raises(ValueError, match=r"temperature .*must be a finite number ≥ 0"):
        ik.SmoothHingeObjective(temperature=-1.0)


def test_objective_must_implement_train_loss() -> None:
    class Incomplete(ik.Objective):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()  # type: ignore[abstract]


def test_cross_entropy_output_hessian_in_closed_form_equals_autodiff() -> None:
    from torch.func import hessian, vmap

    objective = ik.CrossEntropyObjective()
    g = torch.Generator().manual_seed(0)
    outputs = 3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    targets = torch.randint(5, (6,), generator=g)

    def loss(f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return objective.train_loss(f[None], t[None]).sum()

    torch.testing.assert_close(objective.output_hessian(outputs, targets),
                               vmap(hessian(loss))(outputs, targets), rtol=1e-12, atol=1e-14)

    class Smoothed(ik.CrossEntropyObjective):  # another loss: no closed form is claimed
        def train_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(outputs, targets, reduction="none",
                                                     label_smoothing=0.1)

    assert Smoothed().output_hessian(outputs, targets) is None
    assert ik.MSEObjective().output_hessian(outputs, outputs) is None
