"""Property-based tests (hypothesis): generated bad input gets one of influencekit's typed errors,
and generated valid input is never refused.

The catalogue (also in the README's reliability section): every numeric setting of every public
constructor and function given bools, zeros, negatives, NaN/inf, strings and non-integers, and
valid values; right-hand sides of every shape and orientation and every dtype; NaN and infinity
at random positions in inputs, labels, parameters and buffers; out-of-range and wrongly typed
labels; empty and mismatched sets; test inputs of the wrong shape; models on mixed devices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import influencekit as ik
from influencekit.training import minimize, train_steps

from conftest import _classification_data

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
N_TRAIN, D, CLASSES = 24, 3, 3


@functools.cache
def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    X, y = _classification_data(N_TRAIN + 4, D, CLASSES, seed=9)
    return X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:]


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(D, CLASSES).double()
    X, y, _, _ = _data()
    minimize(model, ik.CrossEntropyObjective(weight_decay=0.1), (X, y), tol=1e-12)
    return model


@functools.cache
def _fitted(dtype: torch.dtype = torch.float64) -> ik.Influence:
    X, y, _, _ = _data()
    model = _model().to(dtype)
    return ik.Influence(model, ik.CrossEntropyObjective(weight_decay=0.1), (X.to(dtype), y),
                        solver="direct").fit()


# ------------------------------------------------------------------ every numeric setting


@dataclass(frozen=True)
class Setting:
    """One numeric argument: how to pass it, which values are valid, whether None is."""

    name: str
    call: Callable[[Any], Any]
    kind: str  # "positive int", "non-negative int", "positive real", "non-negative real",
    #            "unit interval", "half-open unit interval"
    optional: bool = False


def _influence(**kw: Any) -> ik.Influence:
    X, y, _, _ = _data()
    return ik.Influence(_model(), ik.CrossEntropyObjective(weight_decay=0.1), (X, y), **kw)


def _train_steps(**kw: Any) -> object:
    X, y, _, _ = _data()
    return train_steps(nn.Linear(D, CLASSES).double(), ik.CrossEntropyObjective(), (X, y),
                       **{"steps": 1, **kw})


def _minimize(**kw: Any) -> object:
    X, y, _, _ = _data()
    return minimize(nn.Linear(D, CLASSES).double(), ik.CrossEntropyObjective(weight_decay=0.1),
                    (X, y), **{"max_iter": 3, **kw})


CATALOGUE = [
    Setting("chunk_size", lambda v: _influence(chunk_size=v), "positive int"),
    Setting("damping", lambda v: _influence(damping=v), "non-negative real"),
    Setting("stationarity_tol", lambda v: _influence(stationarity_tol=v), "positive real",
            optional=True),
    Setting("tol", lambda v: ik.CG(tol=v), "positive real", optional=True),
    Setting("max_iter", lambda v: ik.CG(max_iter=v), "positive int"),
    Setting("truncate", lambda v: ik.CG(truncate=v), "unit interval"),
    Setting("scale", lambda v: ik.LiSSA(scale=v), "positive real", optional=True),
    Setting("depth", lambda v: ik.LiSSA(depth=v), "positive int"),
    Setting("repeats", lambda v: ik.LiSSA(repeats=v), "positive int"),
    Setting("batch_size", lambda v: ik.LiSSA(batch_size=v), "positive int"),
    Setting("damping", lambda v: ik.LiSSA(damping=v), "half-open unit interval"),
    Setting("seed", lambda v: ik.LiSSA(seed=v), "non-negative int"),
    Setting("tol", lambda v: ik.LiSSA(tol=v), "positive real"),
    Setting("tail", lambda v: ik.LiSSA(tail=v), "unit interval"),
    Setting("max_dim", lambda v: ik.Direct(max_dim=v), "positive int"),
    Setting("block", lambda v: ik.Direct(block=v), "positive int"),
    Setting("tol", lambda v: ik.Direct(tol=v), "positive real", optional=True),
    Setting("chunk_size", lambda v: ik.KFAC(chunk_size=v), "positive int", optional=True),
    Setting("refine", lambda v: ik.EKFAC(refine=v), "non-negative int"),
    Setting("tol", lambda v: ik.EKFAC(tol=v), "positive real", optional=True),
    Setting("rank", lambda v: ik.Arnoldi(rank=v), "positive int"),
    Setting("iterations", lambda v: ik.Arnoldi(rank=1, iterations=v), "positive int",
            optional=True),
    Setting("block", lambda v: ik.Arnoldi(block=v), "positive int"),
    Setting("probes", lambda v: ik.Arnoldi(probes=v), "positive int"),
    Setting("seed", lambda v: ik.Arnoldi(seed=v), "non-negative int"),
    Setting("rank", lambda v: ik.Deflated(rank=v, iterations=10**9), "positive int"),
    Setting("iterations", lambda v: ik.Deflated(rank=1, iterations=v), "positive int"),
    Setting("block", lambda v: ik.Deflated(block=v), "positive int"),
    Setting("subset", lambda v: ik.Deflated(subset=v), "positive int", optional=True),
    Setting("seed", lambda v: ik.Deflated(seed=v), "non-negative int"),
    Setting("weight_decay", lambda v: ik.CrossEntropyObjective(weight_decay=v),
            "non-negative real"),
    Setting("temperature", lambda v: ik.SmoothHingeObjective(temperature=v),
            "non-negative real"),
    Setting("k", lambda v: _fitted().top_k(_data()[2:], k=v), "positive int"),
    Setting("steps", lambda v: _train_steps(steps=v), "non-negative int"),
    Setting("lr", lambda v: _train_steps(lr=v), "positive real"),
    Setting("batch_size", lambda v: _train_steps(batch_size=v), "positive int"),
    Setting("seed", lambda v: _train_steps(seed=v), "non-negative int"),
    Setting("tol", lambda v: _minimize(tol=v), "positive real"),
    Setting("max_iter", lambda v: _minimize(max_iter=v), "positive int"),
    Setting("chunk_size", lambda v: _minimize(chunk_size=v), "positive int"),
]

NOT_NUMBERS = st.sampled_from([True, False, "1", [1], (1,), {"v": 1}, object()])
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def _invalid(kind: str, optional: bool) -> st.SearchStrategy:
    wrong = [NOT_NUMBERS, NON_FINITE] + ([] if optional else [st.none()])
    if kind.endswith("int"):
        low = 1 if kind.startswith("positive") else 0
        wrong += [st.integers(max_value=low - 1), st.floats(0.1, 100).filter(
            lambda f: f != int(f))]
    elif kind in ("positive real", "non-negative real"):
        wrong += [st.floats(max_value=-1e-300, allow_nan=False, allow_infinity=False)]
        if kind == "positive real":
            wrong += [st.just(0), st.just(0.0)]
    else:  # unit intervals
        wrong += [st.floats(max_value=-1e-9, allow_infinity=False, allow_nan=False),
                  st.floats(min_value=1.0 + 1e-9, allow_infinity=False, allow_nan=False)]
        if kind.startswith("half-open"):
            wrong += [st.just(1.0)]
    return st.one_of(*wrong)


def _valid(kind: str) -> st.SearchStrategy:
    if kind.endswith("int"):
        return st.integers(1 if kind.startswith("positive") else 0, 20)
    if kind == "positive real":
        return st.floats(1e-6, 1e3)
    if kind == "non-negative real":
        return st.one_of(st.just(0.0), st.floats(1e-8, 1e3), st.integers(0, 10))
    if kind.startswith("half-open"):
        return st.floats(0.0, 0.99)
    return st.floats(0.0, 1.0)


def _label(setting: Setting) -> str:
    return f"{setting.name}:{setting.kind}"


@pytest.mark.parametrize("setting", CATALOGUE, ids=_label)
@settings(SETTINGS, max_examples=40)
@given(data=st.data())
def test_every_bad_numeric_setting_gets_a_typed_error_naming_it(setting: Setting,
                                                                data: st.DataObject) -> None:
    value = data.draw(_invalid(setting.kind, setting.optional), label="value")
    assume(not (setting.name == "weight_decay" and isinstance(value, dict)))  # λ per parameter
    with pytest.raises(ik.InfluenceKitError) as raised:
        setting.call(value)
    assert isinstance(raised.value, ik.InvalidSettingError | ik.InputTypeError)
    assert setting.name in str(raised.value)


@pytest.mark.parametrize("setting", CATALOGUE, ids=_label)
@settings(SETTINGS, max_examples=15)
@given(data=st.data())
def test_no_valid_numeric_setting_is_refused(setting: Setting, data: st.DataObject) -> None:
    value = data.draw(_valid(setting.kind), label="value")
    if setting.name == "k":
        value = min(value, N_TRAIN)
    setting.call(value)


def test_top_k_beyond_n_is_refused_not_clipped() -> None:
    with pytest.raises(ik.InvalidSettingError, match=rf"k={N_TRAIN + 1} exceeds the {N_TRAIN}"):
        _fitted().top_k(_data()[2:], k=N_TRAIN + 1)


# ------------------------------------------------------------------ right-hand sides


def _entry_points(inf: ik.Influence) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    return [inf.solve, inf.operator_.matvec, inf.solver.apply_inverse,
            inf.solver.apply_inverse_sqrt]


@SETTINGS
@given(shape=st.lists(st.integers(0, 2 * (D + 1) * CLASSES), min_size=0, max_size=3))
def test_right_hand_sides_of_any_other_shape_are_refused(shape: list[int]) -> None:
    inf = _fitted()
    p = inf.tracked_.dim
    V = torch.ones(tuple(shape), dtype=torch.float64)
    valid = tuple(shape) == (p,) or (len(shape) == 2 and shape[1] == p)
    for entry in _entry_points(inf):
        if valid:
            assert entry(V).shape == V.shape
        else:
            with pytest.raises(ik.ShapeMismatchError, match=rf"\(k, {p}\).*\({p},\)"):
                entry(V)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_a_column_block_names_both_orientations(k: int) -> None:
    inf = _fitted()
    p = inf.tracked_.dim
    for entry in _entry_points(inf):
        with pytest.raises(ik.ShapeMismatchError, match=rf"got \({p}, {k}\).*scipy.*V\.T"):
            entry(torch.ones(p, k, dtype=torch.float64))


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64,
          torch.int32, torch.bool, torch.complex64]


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_right_hand_side_dtypes_are_upcast_or_refused_never_rounded(
        model_dtype: torch.dtype, dtype: torch.dtype) -> None:
    inf = _fitted(model_dtype)
    V = torch.ones(2, inf.tracked_.dim, dtype=dtype)
    losing = dtype.is_floating_point and torch.finfo(dtype).bits > torch.finfo(model_dtype).bits
    if not dtype.is_floating_point or losing:
        with pytest.raises(ik.DtypeError, match="floating point" if not losing else "rounded"):
            inf.solve(V)
    else:
        X = inf.solve(V)
        assert X.dtype == model_dtype
        torch.testing.assert_close(X, inf.solve(V.to(model_dtype)), rtol=0, atol=0)


# ------------------------------------------------------------------ data, labels, parameters


@SETTINGS
@given(row=st.integers(0, N_TRAIN - 1), column=st.integers(0, D - 1), value=NON_FINITE,
       where=st.sampled_from(["inputs", "test inputs"]))
def test_non_finite_inputs_are_refused_naming_the_example(row: int, column: int, value: float,
                                                           where: str) -> None:
    X, y, X_test, y_test = (t.clone() for t in _data())
    if where == "inputs":
        X[row, column] = value
        with pytest.raises(ik.NonFiniteError, match=rf"training data .*\[{row}\]"):
            ik.Influence(_model(), ik.CrossEntropyObjective(weight_decay=0.1), (X, y)).fit()
    else:
        row = row % X_test.shape[0]
        X_test[row, column] = value
        with pytest.raises(ik.NonFiniteError, match=rf"test data .*\[{row}\]"):
            _fitted().influence((X_test, y_test))


@SETTINGS
@given(row=st.integers(0, N_TRAIN - 1), value=NON_FINITE)
def test_non_finite_regression_targets_are_refused(row: int, value: float) -> None:
    X, _, _, _ = _data()
    targets = X.sum(dim=1, keepdim=True).clone()
    targets[row, 0] = value
    model = nn.Linear(D, 1).double()
    with pytest.raises(ik.NonFiniteError, match=rf"\[{row}\]"):
        ik.Influence(model, ik.MSEObjective(), (X, targets), damping=0.1).fit()


@SETTINGS
@given(data=st.data(), value=NON_FINITE)
def test_non_finite_parameters_and_buffers_are_refused_naming_them(data: st.DataObject,
                                                                   value: float) -> None:
    X, y, _, _ = _data()
    model = nn.Sequential(nn.Linear(D, CLASSES), nn.BatchNorm1d(CLASSES)).double().eval()
    named = [*model.named_parameters(), *model.named_buffers()]
    name, tensor = data.draw(st.sampled_from([(n, t) for n, t in named
                                              if t.is_floating_point()]), label="tensor")
    index = data.draw(st.integers(0, tensor.numel() - 1), label="index")
    with torch.no_grad():
        tensor.view(-1)[index] = value
    buffer = name not in dict(model.named_parameters())
    if buffer and value == -math.inf:  # allowed in buffers: attention masks hold −inf
        ik.Influence(model, ik.CrossEntropyObjective(), (X, y), damping=0.1)
        return
    with pytest.raises(ik.NonFiniteError, match=rf"'{name}' holds NaN or"):
        ik.Influence(model, ik.CrossEntropyObjective(), (X, y), damping=0.1)


@SETTINGS
@given(label=st.one_of(st.integers(-2**63, -1), st.integers(CLASSES, 2**63 - 1)),
       row=st.integers(0, N_TRAIN - 1))
def test_out_of_range_labels_are_refused(label: int, row: int) -> None:
    X, y, _, _ = _data()
    y = y.clone()
    y[row] = label
    with pytest.raises(ik.ObjectiveMismatchError, match=rf"must lie in \[0, {CLASSES}\)"):
        ik.Influence(_model(), ik.CrossEntropyObjective(weight_decay=0.1), (X, y)).fit()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int64])
def test_integer_labels_of_any_width_give_the_same_scores(dtype: torch.dtype) -> None:
    X, y, X_test, y_test = _data()
    inf = ik.Influence(_model(), ik.CrossEntropyObjective(weight_decay=0.1), (X, y.to(dtype)),
                       solver="direct").fit()
    torch.testing.assert_close(inf.influence((X_test, y_test.to(dtype))),
                               _fitted().influence((X_test, y_test)), rtol=0, atol=0)


@pytest.mark.parametrize("labels", ["float", "one-hot", "column"])
def test_labels_of_the_wrong_kind_get_advice_for_their_kind(labels: str) -> None:
    X, y, _, _ = _data()
    wrong, advice = {"float": (y.double(), r"y\.long\(\)"),
                     "one-hot": (nn.functional.one_hot(y, CLASSES).double(), r"argmax"),
                     "column": (y[:, None], r"y\.reshape\(-1\)")}[labels]
    with pytest.raises(ik.ObjectiveMismatchError, match=advice) as raised:
        ik.Influence(_model(), ik.CrossEntropyObjective(), (X, wrong), damping=0.1).fit()
    assert f"targets {tuple(wrong.shape)}" in str(raised.value)  # the data set's shape


@SETTINGS
@given(n_x=st.integers(0, 5), n_y=st.integers(0, 5), width=st.integers(1, 5))
def test_empty_or_mismatched_sets_are_refused(n_x: int, n_y: int, width: int) -> None:
    X = torch.zeros(n_x, width, dtype=torch.float64)
    y = torch.zeros(n_y, dtype=torch.long)
    if n_x != n_y:
        expected: type = ik.ShapeMismatchError
    elif n_x == 0:
        expected = ik.EmptyDatasetError
    elif width != D:
        expected = ik.ShapeMismatchError
    else:
        _fitted().influence((X, y))
        return
    with pytest.raises(expected):
        if n_x != n_y or n_x == 0:
            ik.Influence(_model(), ik.CrossEntropyObjective(weight_decay=0.1), (X, y))
        _fitted().influence((X, y))


def test_a_model_on_mixed_devices_is_refused() -> None:
    X, y, _, _ = _data()
    model = nn.Sequential(nn.Linear(D, 4), nn.Linear(4, CLASSES)).double()
    model[1].to("meta")
    with pytest.raises(ik.DeviceMismatchError, match=r"one device.*meta"):
        ik.Influence(model, ik.CrossEntropyObjective(), (X, y))
    with pytest.raises(ik.DeviceMismatchError, match="meta tensors hold none"):
        ik.Influence(model.to("meta"), ik.CrossEntropyObjective(), (X, y))


def test_sampled_products_check_their_shapes_and_dtypes() -> None:
    inf = _fitted(torch.float32)
    op, p = inf.operator_, inf.tracked_.dim
    indices = torch.zeros(2, 3, dtype=torch.long)
    assert op.sampled_matvec(torch.ones(2, 1, p), indices).shape == (2, 1, p)
    with pytest.raises(ik.ShapeMismatchError, match=rf"\(R, k, {p}\)"):
        op.sampled_matvec(torch.ones(2, p, 1), indices)
    with pytest.raises(ik.ShapeMismatchError, match="R = 3 groups"):
        op.sampled_matvec(torch.ones(3, 1, p), indices)
    with pytest.raises(ik.DtypeError, match="rounded"):
        op.sampled_matvec(torch.ones(2, 1, p, dtype=torch.float64), indices)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: ik.LiSSA(seed=2**64), r"seed must be .*≤ 4611686018427387904"),
    (lambda: _influence(damping="Auto"), r"damping must be 'auto' or a finite number"),
    (lambda: ik.Influence(_model(), ik.CrossEntropyObjective(weight_decay={"": 0.1, "fc": 0}),
                          _data()[:2]), r"keys \['fc'\] match none"),
])
def test_settings_found_wrong_only_later_are_refused_at_construction(make: Callable,
                                                                    message: str) -> None:
    with pytest.raises(ik.InfluenceKitError, match=message):
        make()
