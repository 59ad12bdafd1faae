"""Tracking all parameters or a named subset, flat views, functional evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.parameters import TrackedParameters


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def test_default_tracks_trainable_parameters_in_model_order() -> None:
    net = _net()
    net[0].bias.requires_grad_(False)
    tracked = TrackedParameters(net)
    assert tracked.names == ["0.weight", "2.weight", "2.bias"]
    assert tracked.dim == 12 + 8 + 2


def test_prefix_selects_a_layer_without_touching_requires_grad() -> None:
    net = _net()
    tracked = TrackedParameters(net, "2")
    assert tracked.names == ["2.weight", "2.bias"]
    assert all(p.requires_grad for p in net.parameters())


def test_flat_unflatten_round_trip_and_functional_forward() -> None:
    net = _net().double()
    tracked = TrackedParameters(net, ["0.weight", "2"])
    theta = tracked.flat()
    parts = tracked.unflatten(theta)
    assert list(parts) == tracked.names
    torch.testing.assert_close(parts["0.weight"], net[0].weight)
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(tracked.forward(theta, x), net(x))
    moved = tracked.forward(theta + 0.1, x)
    assert not torch.allclose(moved, net(x))


def test_assign_writes_only_tracked_parameters() -> None:
    net = _net()
    tracked = TrackedParameters(net, "2.bias")
    before = net[0].weight.detach().clone()
    tracked.assign(torch.tensor([7.0, 8.0]))
    torch.testing.assert_close(net[2].bias.detach(), torch.tensor([7.0, 8.0]))
    torch.testing.assert_close(net[0].weight.detach(), before)


def test_unknown_parameter_name_lists_the_available_ones() -> None:
    with pytest.raises(ik.UnknownParameterError, match=r"No parameter is named 'fc'.*'0.weight'"):
        TrackedParameters(_net(), ["fc"])


def test_model_without_trainable_parameters_is_refused() -> None:
    net = _net().requires_grad_(False)
    with pytest.raises(ik.UnknownParameterError, match="requires_grad=True"):
        TrackedParameters(net)
