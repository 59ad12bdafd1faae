"""The shared benchmark problem and its exact reference, built once and cached on disk.

Model: MLP 64-256-256-10 with tanh (85,002 parameters) on scikit-learn's digits, 70/30 stratified
split (seed 0): 1,257 training / 540 test images, float32. Trained with Adam (lr 1e-3, weight
decay 1e-4, batch 64, 200 epochs), then polished with full-batch L-BFGS in float64 on
mean cross-entropy + (1e-4/2)‖θ‖² until ‖∇‖ ≤ 3e-6 (without the polish the Hessian is
indefinite). Influence is taken with the Hessian of the mean cross-entropy (no regulariser, as the
peers compute it) plus damping 1e-3, for the first 100 test points against all training points.

Reference: I_up,loss (100 × 1,257) from the float64 model, block CG to relative residual 1e-10.

Only torch and scikit-learn are needed to *load* the problem (peer environments import this file
too); building it uses influencekit.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

SETTINGS = {
    "model": "MLP 64-256-256-10, tanh, 85,002 parameters",
    "data": "scikit-learn digits, 70/30 stratified split (seed 0): 1,257 train / 540 test",
    "training": "Adam lr 1e-3, weight decay 1e-4, batch 64, 200 epochs; full-batch L-BFGS polish "
                "(float64) to gradient norm <= 3e-6",
    "curvature": "Hessian of the mean cross-entropy (no regulariser) + damping",
    "damping": 1e-3,
    "num_test": 100,
    "dtype": "float32",
    "reference": "float64 block CG, relative residual 1e-10",
}
VERSION = "1"  # bump when the recipe changes: the cache is keyed on it


def build_model() -> nn.Module:
    """The architecture (weights come from the cache)."""
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                         nn.Linear(256, 10))


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

    def loss_fn(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy: the objective whose Hessian every method inverts."""
        return nn.functional.cross_entropy(outputs, targets)


def _digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    X = torch.tensor(bunch.data, dtype=torch.float64) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0,
                                                        stratify=y)
    return X_train, y_train, X_test, y_test


def atomic_save(payload: dict, path: Path) -> None:
    """torch.save through influencekit's one atomic writer (temporary file, fsync, rename)."""
    from influencekit.io import atomic_write_bytes

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _train(seed: int = 0) -> tuple[nn.Module, dict]:
    X_train, y_train, _, _ = _digits()
    return train_model(X_train, y_train, seed)


def train_model(X_train: Tensor, y_train: Tensor, seed: int = 0,
                polish_iterations: int = 20_000) -> tuple[nn.Module, dict]:
    """The recipe of SETTINGS["training"] on the given points (float64 X): Adam then the
    L-BFGS polish (at most ``polish_iterations``); returns the float64 model and a record of
    the polish."""
    import influencekit as ik
    from influencekit.training import minimize

    torch.manual_seed(seed)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    X32 = X_train.float()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(200):
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


def _reference(model64: nn.Module, damping: float, num_test: int) -> Tensor:
    import influencekit as ik

    X_train, y_train, X_test, y_test = _digits()
    inf = ik.Influence(model64, ik.CrossEntropyObjective(), (X_train, y_train),
                       solver=ik.CG(tol=1e-10, max_iter=5000), damping=damping).fit()
    scores = inf.influence((X_test[:num_test], y_test[:num_test]))
    report = inf.last_solve_report
    if report.relative_residual > 1e-9:
        raise RuntimeError(f"reference solve reached only {report.relative_residual:.2e}")
    return scores


def cache_path(folder: Path, seed: int = 0) -> Path:
    recipe = VERSION + repr(sorted(SETTINGS.items())) + (f"seed {seed}" if seed else "")
    key = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    return Path(folder) / f"problem-{key}.pt"


def prepare(folder: Path, seed: int = 0) -> Path:
    """Build (or reuse) the cached problem and reference; returns the cache file. ``seed``
    draws another instance of the same recipe (initialisation and batch order; 0 is the
    instance of the README's table)."""
    path = cache_path(folder, seed)
    if path.exists():
        return path
    model64, training = _train(seed)
    reference = _reference(model64, SETTINGS["damping"], SETTINGS["num_test"])
    atomic_save({"state": {k: v.float() for k, v in model64.state_dict().items()},
                  "state64": model64.state_dict(), "reference": reference,
                  "training": training, "settings": SETTINGS}, path)
    return path


def load(path: Path, dtype: torch.dtype = torch.float32) -> Problem:
    """The cached problem in ``dtype`` (the reference stays float64)."""
    payload = torch.load(path, weights_only=True)
    model = build_model().to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in payload["state64"].items()})
    model.eval()
    X_train, y_train, X_test, y_test = _digits()
    m = SETTINGS["num_test"]
    return Problem(model, X_train.to(dtype), y_train, X_test[:m].to(dtype), y_test[:m],
                   SETTINGS["damping"], payload["reference"])


def training_info(path: Path) -> dict:
    return torch.load(path, weights_only=True)["training"]
