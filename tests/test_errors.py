"""Bad input: each case raises a typed error whose message says what was expected and received."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

import influencekit as ik

from conftest import Problem


def _fitted(problem: Problem) -> ik.Influence:
    return ik.Influence(problem.model, problem.objective, problem.train, solver="direct").fit()


def test_test_inputs_of_another_shape(logreg: Problem) -> None:
    inf = _fitted(logreg)
    with pytest.raises(ik.ShapeMismatchError, match=r"shape \(6,\) per example.*shape \(5,\)"):
        inf.influence((torch.zeros(2, 6, dtype=torch.float64), torch.zeros(2, dtype=torch.long)))


def test_inputs_and_targets_of_different_lengths(logreg: Problem) -> None:
    with pytest.raises(ik.ShapeMismatchError, match=r"same number of examples.*\(60, 5\).*\(59,\)"):
        ik.Influence(logreg.model, logreg.objective, (logreg.X, logreg.y[:-1]))


def test_model_output_that_does_not_fit_the_objective(logreg: Problem) -> None:
    inf = ik.Influence(logreg.model, ik.BinaryLogisticObjective(), (logreg.X, logreg.y % 2))
    with pytest.raises(ik.ObjectiveMismatchError, match=r"one score per example.*\(60, 3\)"):
        inf.fit()


def test_targets_that_do_not_fit_the_objective(logreg: Problem) -> None:
    inf = ik.Influence(logreg.model, logreg.objective, (logreg.X, logreg.y + 5))
    with pytest.raises(ik.ObjectiveMismatchError, match=r"must lie in \[0, 3\)"):
        inf.fit()


def test_nan_in_the_training_data_names_the_example(logreg: Problem) -> None:
    X = logreg.X.clone()
    X[17, 2] = float("nan")
    with pytest.raises(ik.NonFiniteError, match=r"training data contains NaN.*\[17\]"):
        ik.Influence(logreg.model, logreg.objective, (X, logreg.y)).fit()


def test_nan_in_the_test_data(logreg: Problem) -> None:
    X = logreg.X_test.clone()
    X[1, 0] = float("inf")
    with pytest.raises(ik.NonFiniteError, match=r"test data contains NaN or infinite.*\[1\]"):
        _fitted(logreg).influence((X, logreg.y_test))


class LogOfOutput(ik.Objective):
    """A loss that is NaN where the model output is negative."""

    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.log(outputs[:, 0])


def test_nan_in_the_loss(logreg: Problem) -> None:
    with pytest.raises(ik.NonFiniteError, match="training loss is NaN or infinite"):
        ik.Influence(logreg.model, LogOfOutput(), logreg.train).fit()


class MeanReduced(ik.Objective):
    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(outputs, targets)


def test_objective_that_returns_a_scalar(logreg: Problem) -> None:
    with pytest.raises(ik.ObjectiveMismatchError, match=r"one value per example.*reduction='none'"):
        ik.Influence(logreg.model, MeanReduced(), logreg.train).fit()


def test_unknown_solver_name(logreg: Problem) -> None:
    with pytest.raises(ik.UnknownSolverError, match=r"Unknown solver 'arnoldy'.*'direct'"):
        ik.Influence(logreg.model, logreg.objective, logreg.train, solver="arnoldy")


@pytest.mark.parametrize("method", ["influence", "loo_change", "top_k", "test_gradients"])
def test_scores_before_fit(logreg: Problem, method: str) -> None:
    inf = ik.Influence(logreg.model, logreg.objective, logreg.train)
    with pytest.raises(ik.NotFittedError, match=r"not fitted yet: call fit\(\)"):
        getattr(inf, method)(logreg.test)


def test_self_influence_and_params_influence_before_fit(logreg: Problem) -> None:
    inf = ik.Influence(logreg.model, logreg.objective, logreg.train)
    with pytest.raises(ik.NotFittedError):
        inf.self_influence()
    with pytest.raises(ik.NotFittedError):
        inf.params_influence([0])


def test_empty_training_set(logreg: Problem) -> None:
    with pytest.raises(ik.EmptyDatasetError, match="training data has no examples"):
        ik.Influence(logreg.model, logreg.objective, (logreg.X[:0], logreg.y[:0]))


def test_empty_test_set(logreg: Problem) -> None:
    with pytest.raises(ik.EmptyDatasetError, match="test data has no examples"):
        _fitted(logreg).influence((logreg.X_test[:0], logreg.y_test[:0]))


def test_parameter_name_that_does_not_exist_is_refused_at_construction(logreg: Problem) -> None:
    with pytest.raises(ik.UnknownParameterError, match=r"'fc\.weight'.*Available parameters"):
        ik.Influence(logreg.model, logreg.objective, logreg.train, params=["fc.weight"])


def test_training_index_out_of_range(logreg: Problem) -> None:
    with pytest.raises(IndexError, match=r"must lie in \[0, 60\).*got values from 0 to 60"):
        _fitted(logreg).params_influence([0, 60])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"damping": -1.0}, "damping must be a finite number ≥ 0"),
    ({"chunk_size": 0}, "chunk_size must be a positive integer"),
])
def test_bad_settings(logreg: Problem, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ik.Influence(logreg.model, logreg.objective, logreg.train, **kwargs)


def test_objective_of_the_wrong_type(logreg: Problem) -> None:
    with pytest.raises(TypeError, match=r"objective must be an influencekit\.Objective"):
        ik.Influence(logreg.model, nn.CrossEntropyLoss(), logreg.train)  # type: ignore[arg-type]


def test_dataloader_with_a_subset_sampler(logreg: Problem) -> None:
    loader = DataLoader(TensorDataset(*logreg.train), sampler=SubsetRandomSampler([0, 1, 2]))
    with pytest.raises(TypeError, match=r"Pass a torch\.utils\.data\.Subset"):
        ik.Influence(logreg.model, logreg.objective, loader)


def test_dataset_items_must_be_pairs(logreg: Problem) -> None:
    with pytest.raises(TypeError, match=r"\(input, target\) pair"):
        ik.Influence(logreg.model, logreg.objective, TensorDataset(logreg.X))


class SqrtMeasurement(ik.Objective):
    """A finite measurement whose gradient is infinite where the loss is 0: sqrt at 0."""

    def train_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    def test_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.sqrt(outputs[:, 0] - outputs[:, 0].detach())


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_a_non_finite_gradient_of_a_finite_measurement(logreg: Problem, solver: str) -> None:
    inf = ik.Influence(logreg.model, SqrtMeasurement(weight_decay=0.05), logreg.train,
                       solver=solver).fit()
    with pytest.raises(ik.NonFiniteError, match=r"gradient of the test measurement is NaN.*\[0, 1"):
        inf.influence(logreg.test)


def test_solvers_refuse_non_finite_right_hand_sides(logreg: Problem) -> None:
    inf = _fitted(logreg)
    V = torch.zeros(3, 15, dtype=torch.float64)
    V[1, 4] = float("nan")
    with pytest.raises(ik.NonFiniteError, match=r"rows: \[1\]"):
        inf.solve(V)
