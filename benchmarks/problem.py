"""The shared benchmark problems and their exact references, built once and cached on disk.

``mlp-digits`` (the README's main table): MLP 64-256-256-10 with tanh (85,002 parameters) on
scikit-learn's digits, 70/30 stratified split (seed 0): 1,257 training / 540 test images,
float32. Trained with Adam (lr 1e-3, weight decay 1e-4, batch 64, 200 epochs), then polished
with full-batch L-BFGS in float64 on mean cross-entropy + (1e-4/2)‖θ‖² until ‖∇‖ ≤ 3e-6
(without the polish the Hessian is indefinite). Influence is taken with the Hessian of the mean
cross-entropy (no regulariser, as the peers compute it) plus damping 1e-3, for the first 100
test points against all training points.

Three more problems (``PROBLEMS``), chosen to differ in architecture, activation, data and size
from the one the methods were tuned on, trained and scored by the same recipe (their epochs and
polish cap are in their settings):

- ``gelu-mlp-cancer``: MLP 30-192-256-2, GELU (55,874 parameters), on scikit-learn's breast
  cancer data (standardised with the training split's mean and deviation), 398 / 171;
- ``cnn-digits``: a ReLU CNN on the 8×8 digit images (conv 3×3 1→16, 2×2 average pooling,
  conv 3×3 16→32, 2×2 average pooling, linear 128→64→10; 13,706 parameters), 1,257 / 540 (small
  enough that its float64 polish and reference take minutes on two cores; a CNN 13× the
  multiply-adds did not finish in 20 minutes);
- ``silu-mlp-generated``: MLP 40-256-256-8, SiLU (78,344 parameters), on 5,000 points of
  ``make_classification`` (8 classes, 20 informative of 40 features, 2% flipped labels,
  seed 0; standardised), 3,500 / 1,500.

Reference: I_up,loss (100 × n) from the float64 model, block CG preconditioned by EK-FAC to
relative residual 1e-10 (the residual is measured, not the recurrence's estimate).
Where CG meets negative curvature at the problem's damping (a network the polish left away
from its minimum: the Adam phase runs in float32, so the weights differ between CPUs), the
damping is raised threefold until it does not, and the cache records the damping used.

Only torch and scikit-learn are needed to *load* a problem (peer environments import this file
too); building one uses influencekit.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

DEFAULT = "mlp-digits"
SETTINGS = {
    "model": "MLP 64-256-256-10, tanh, 85,002 parameters",
    "data": "scikit-learn digits, 70/30 stratified split (seed 0): 1,257 train / 540 test",
    "training": "Adam lr 1e-3, weight decay 1e-4, batch 64, 200 epochs; full-batch L-BFGS polish "
                "(float64) to gradient norm <= 3e-6",
    "curvature": "Hessian of the mean cross-entropy (no regulariser) + damping",
    "damping": 1e-3,
    "num_test": 100,
    "dtype": "float32",
    "reference": "float64 block CG, EK-FAC preconditioner, relative residual 1e-10",
}
VERSION = "1"  # bump when a training recipe changes: the caches are keyed on it (and on
#                SETTINGS, which names the reference solve)

Data = tuple[Tensor, Tensor, Tensor, Tensor]  # X_train, y_train, X_test, y_test (X float64)


def build_model() -> nn.Module:
    """The architecture of ``mlp-digits`` (weights come from the cache)."""
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                         nn.Linear(256, 10))


def _gelu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(30, 192), nn.GELU(), nn.Linear(192, 256), nn.GELU(),
                         nn.Linear(256, 2))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10))


def _silu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(40, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(),
                         nn.Linear(256, 8))


@dataclass(frozen=True)
class ProblemSpec:
    """How one problem is made: its data (float64 inputs), architecture and training recipe."""

    settings: dict
    data: Callable[[], Data]
    build_model: Callable[[], nn.Module]
    epochs: int = 200
    polish_iterations: int = 20_000


@dataclass
class Problem:
    """Everything a method needs: model (float32, eval mode), data, damping, reference."""

    model: nn.Module
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    damping: float
    reference: Tensor  # (num_test, n) I_up,loss, float64
    name: str = DEFAULT

    def loss_fn(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy: the objective whose Hessian every method inverts."""
        return nn.functional.cross_entropy(outputs, targets)


def _split(X: Tensor, y: Tensor, standardise: bool) -> Data:
    from sklearn.model_selection import train_test_split

    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0,
                                                        stratify=y)
    if standardise:
        mean, std = X_train.mean(0), X_train.std(0).clamp_min(1e-12)
        X_train, X_test = (X_train - mean) / std, (X_test - mean) / std
    return X_train, y_train, X_test, y_test


def _digits() -> Data:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X = torch.tensor(bunch.data, dtype=torch.float64) / 16.0
    return _split(X, torch.tensor(bunch.target, dtype=torch.long), standardise=False)


def _digit_images() -> Data:
    X_train, y_train, X_test, y_test = _digits()
    return X_train.reshape(-1, 1, 8, 8), y_train, X_test.reshape(-1, 1, 8, 8), y_test


def _cancer() -> Data:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    X = torch.tensor(bunch.data, dtype=torch.float64)
    return _split(X, torch.tensor(bunch.target, dtype=torch.long), standardise=True)


def _generated() -> Data:
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=5000, n_features=40, n_informative=20, n_redundant=10,
                               n_classes=8, n_clusters_per_class=1, flip_y=0.02,
                               random_state=0)
    return _split(torch.tensor(X, dtype=torch.float64), torch.tensor(y, dtype=torch.long),
                  standardise=True)


def _problem(model: str, data_text: str, data: Callable[[], Data],
             build: Callable[[], nn.Module], epochs: int, polish: int) -> ProblemSpec:
    """A problem trained by the recipe of ``mlp-digits`` for ``epochs`` and at most ``polish``
    L-BFGS iterations; its settings (the cache key) say so."""
    settings = {**SETTINGS, "model": model, "data": data_text,
                "training": f"Adam lr 1e-3, weight decay 1e-4, batch 64, {epochs} epochs; "
                            "full-batch L-BFGS polish (float64) to gradient norm <= 3e-6, at "
                            f"most {polish:,} iterations"}
    return ProblemSpec(settings, data, build, epochs, polish)


PROBLEMS: dict[str, ProblemSpec] = {
    DEFAULT: ProblemSpec(SETTINGS, _digits, build_model),
    "gelu-mlp-cancer": _problem(
        "MLP 30-192-256-2, GELU, 55,874 parameters",
        "scikit-learn breast cancer, standardised, 70/30 stratified split (seed 0): 398 train / "
        "171 test", _cancer, _gelu_mlp, 200, 5000),
    "cnn-digits": _problem(
        "CNN conv3x3 1-16, ReLU, avgpool 2, conv3x3 16-32, ReLU, avgpool 2, linear 128-64, ReLU, "
        "linear 64-10; 13,706 parameters", "scikit-learn digits as 1x8x8 images, 70/30 "
        "stratified split (seed 0): 1,257 train / 540 test", _digit_images, _cnn, 100, 2000),
    "silu-mlp-generated": _problem(
        "MLP 40-256-256-8, SiLU, 78,344 parameters",
        "make_classification(5000, 40 features, 20 informative, 10 redundant, 8 classes, flip_y "
        "0.02, seed 0), standardised, 70/30 stratified split (seed 0): 3,500 train / 1,500 test",
        _generated, _silu_mlp, 60, 5000),
}


def spec(name: str) -> ProblemSpec:
    if name not in PROBLEMS:
        raise KeyError(f"unknown benchmark problem {name!r}; expected one of {list(PROBLEMS)}")
    return PROBLEMS[name]


def atomic_save(payload: dict, path: Path) -> None:
    """torch.save through influencekit's one atomic writer (temporary file, fsync, rename)."""
    from influencekit.io import atomic_write_bytes

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def train_model(X_train: Tensor, y_train: Tensor, seed: int = 0,
                polish_iterations: int = 20_000,
                build: Callable[[], nn.Module] = build_model,
                epochs: int = 200) -> tuple[nn.Module, dict]:
    """The recipe of SETTINGS["training"] on the given points (float64 X): Adam then the
    L-BFGS polish (at most ``polish_iterations``); returns the float64 model and a record of
    the polish."""
    import influencekit as ik
    from influencekit.training import minimize

    torch.manual_seed(seed)
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    X32 = X_train.float()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X32[batch]), y_train[batch]).backward()
            optimizer.step()
    model = model.double()
    report = minimize(model, ik.CrossEntropyObjective(weight_decay=1e-4), (X_train, y_train),
                      method="lbfgs", tol=3e-6, max_iter=polish_iterations)
    return model, {"polish_gradient_norm": report.gradient_norm,
                   "polish_iterations": report.iterations, "seed": seed}


#: how far a problem's damping is raised, in factors of 3, where its Hessian + damping is
#: indefinite (a network the polish left away from its minimum; the trained weights differ
#: between CPUs because Adam runs in float32)
MAX_DAMPING_RAISES = 6


def _reference(model64: nn.Module, data: Data, damping: float, num_test: int
               ) -> tuple[float, Tensor]:
    """The float64 reference I_up,loss at ``damping``, or at the least of damping × 3^j
    (j ≤ ``MAX_DAMPING_RAISES``) at which CG meets no negative curvature; returns that damping
    and the scores."""
    import influencekit as ik

    X_train, y_train, X_test, y_test = data
    for _ in range(MAX_DAMPING_RAISES + 1):
        inf = ik.Influence(model64, ik.CrossEntropyObjective(), (X_train, y_train),
                           solver=ik.CG(tol=1e-10, max_iter=5000, preconditioner="ekfac"),
                           damping=damping).fit()
        try:
            scores = inf.influence((X_test[:num_test], y_test[:num_test]))
        except ik.IndefiniteHessianError:
            damping = float(f"{3 * damping:.2g}")
            continue
        report = inf.last_solve_report
        if not report.relative_residual <= 1e-9:
            raise RuntimeError(f"reference solve reached only {report.relative_residual:.2e}")
        return damping, scores
    raise RuntimeError(f"the Hessian + damping stayed indefinite up to damping {damping:g}; "
                       "the model is far from a minimum: polish it longer")


def results_folder(out: Path, name: str = DEFAULT) -> Path:
    """Where the comparisons write problem ``name``'s results: ``out`` itself for the default
    problem (the README's main table), ``out/NAME`` for the others."""
    return Path(out) if name == DEFAULT else Path(out) / name


def cache_path(folder: Path, seed: int = 0, name: str = DEFAULT) -> Path:
    settings = spec(name).settings
    recipe = VERSION + repr(sorted(settings.items())) + (f"seed {seed}" if seed else "")
    key = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    prefix = "problem" if name == DEFAULT else f"problem-{name}"
    return Path(folder) / f"{prefix}-{key}.pt"


def prepare(folder: Path, seed: int = 0, name: str = DEFAULT) -> Path:
    """Build (or reuse) the cached problem ``name`` and its reference; returns the cache file.
    ``seed`` draws another instance of the same recipe (initialisation and batch order; 0 is
    the instance of the README's tables)."""
    path = cache_path(folder, seed, name)
    if path.exists():
        return path
    import time

    recipe = spec(name)
    data = recipe.data()
    start = time.perf_counter()
    model64, training = train_model(data[0], data[1], seed, recipe.polish_iterations,
                                    recipe.build_model, recipe.epochs)
    training["training_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    damping, reference = _reference(model64, data, recipe.settings["damping"],
                                    recipe.settings["num_test"])
    training["reference_seconds"] = time.perf_counter() - start
    training["damping"] = damping
    atomic_save({"name": name, "state64": model64.state_dict(), "reference": reference,
                 "training": training, "settings": {**recipe.settings, "damping": damping}},
                path)
    return path


def load(path: Path, dtype: torch.dtype = torch.float32) -> Problem:
    """The cached problem in ``dtype`` (the reference stays float64)."""
    payload = torch.load(path, weights_only=True)
    name = payload.get("name", DEFAULT)
    recipe = spec(name)
    model = recipe.build_model().to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in payload["state64"].items()})
    model.eval()
    X_train, y_train, X_test, y_test = recipe.data()
    m = recipe.settings["num_test"]
    return Problem(model, X_train.to(dtype), y_train, X_test[:m].to(dtype), y_test[:m],
                   payload["settings"]["damping"], payload["reference"], name)


def built_settings(path: Path) -> dict:
    """The settings a cached problem was built with (its damping may be raised, ``_reference``)."""
    return torch.load(path, weights_only=True)["settings"]


def training_info(path: Path) -> dict:
    return torch.load(path, weights_only=True)["training"]
