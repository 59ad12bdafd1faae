"""A fitted Influence on disk: safetensors for the tensors, a JSON manifest for the rest.

``Influence.save(folder)`` writes two files:

- ``fitted.safetensors``: θ̂ and every tensor the solver's ``prepare`` computed that is costly to
  recompute (Direct's eigendecomposition, K-FAC/EK-FAC factors, eigenbases and eigenvalues,
  Arnoldi's and Deflated's Ritz pairs, a preconditioner's state), named ``theta`` and
  ``solver/...``;
- ``manifest.json``: the format and its version, the influencekit and torch versions, every
  setting of the Influence and of its solver, the solver's scalar state (LiSSA's scale), the
  damping chosen and why, how Hessian-vector products are formed, the stationarity figures,
  the SHA-256 of ``fitted.safetensors``, and the fingerprint of what the fit depends on (the
  same fields as the gradient cache: θ̂, the model's other parameters, buffers and structure,
  the objective's settings and weight decay, the dtype, the training data).

Both are written atomically, the manifest last: it is the commit point, and the SHA-256 it
holds ties it to the tensors it was written with. ``Influence.load(folder, model, objective,
train)`` rebuilds the fit from them without a pass of the model over the data; it recomputes
the fingerprint (reading the training examples to hash them unless a ``data_id`` is given) and
refuses any difference with :class:`~influencekit.errors.CacheMismatchError` naming the fields.
No pickle is read or written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from .. import cache, distributed
from ..curvature import HessianOperator
from ..damping import DampingChoice
from ..errors import CacheMismatchError
from ..gradients import GradientComputer
from ..io import atomic_write_bytes, atomic_write_json
from ..objective import Objective
from ..parameters import TrackedParameters
from ..solvers import solver_from_settings
from ..solvers.base import prefixed, unprefixed
from ..spectrum import SpectrumEstimate
from ..stationarity import Stationarity
from ..version import __version__

if TYPE_CHECKING:
    from ..influence import Influence

FORMAT = "influencekit-fitted-state"
VERSION = 1
STATE = "fitted.safetensors"
MANIFEST = "manifest.json"


def save(influence: Influence, folder: Path, data_id: str | None = None) -> Path:
    """Write ``influence``'s fitted state to ``folder`` (see the module docstring)."""
    solver_tensors, solver_values = influence.solver.fitted_state()
    tensors = {"theta": influence.theta_, **prefixed("solver", solver_tensors)}
    payload = save_tensors({name: tensor.detach().cpu().contiguous().clone()
                            for name, tensor in tensors.items()})
    fingerprint = cache.fingerprint(influence.tracked_, influence.theta_, influence.objective,
                                    influence.gradients_.decay, influence.train_data, data_id)
    choice, check = influence.damping_choice_, influence.stationarity_
    manifest = {
        "format": FORMAT, "version": VERSION, "influencekit": __version__,
        "torch": torch.__version__,
        "settings": {"damping": influence.damping, "params": influence.params,
                     "chunk_size": influence._requested_chunk_size,
                     "max_memory": influence.max_memory, "hvp_mode": influence.hvp_mode,
                     "vectorize": influence.vectorize, "curvature": influence.curvature,
                     "stationarity_tol": influence.stationarity_tol,
                     "scoring": influence.scoring, "query_rank": influence.query_rank},
        "solver": {"solver": type(influence.solver).__name__,
                   "settings": influence.solver.settings()},
        "solver_state": solver_values,
        "operator": {"damping": influence.operator_.damping,
                     "modes": influence.operator_.mode_state()},
        "damping_choice": None if choice is None else {
            "value": choice.value, "reason": choice.reason,
            "estimate": vars(choice.estimate)},
        "stationarity": {"gradient_norm": check.gradient_norm,
                         "example_gradient_rms": check.example_gradient_rms,
                         "sample": check.sample, "tol": check.tol},
        "train_gradient_norm": influence.train_gradient_norm_,
        "tracked": influence.tracked_.names, "dtype": str(influence.theta_.dtype),
        "indirect_layers": sorted(influence.tracked_.indirect_layers),
        "num_train": influence.num_train_,
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype)}
                    for name, t in tensors.items()},
        "sha256": hashlib.sha256(payload).hexdigest(),
        "fingerprint": fingerprint,
    }
    if distributed.rank() == 0:  # every process holds the same fit; one writes it
        atomic_write_bytes(folder / STATE, payload)
        atomic_write_json(folder / MANIFEST, manifest)
    distributed.barrier()
    return folder


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a saved fit, checked for its format and version."""
    path = folder / MANIFEST
    if not path.exists():
        raise CacheMismatchError(f"{folder} holds no saved fit ({MANIFEST} is missing); write "
                                 "one with Influence(...).fit().save(folder).")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CacheMismatchError(f"{path} cannot be read as a manifest ({error}).") from error
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheMismatchError(
            f"{path} is {manifest.get('format')!r} version {manifest.get('version')!r}; this "
            f"influencekit reads {FORMAT!r} version {VERSION}. Refit and save again.")
    return manifest


def read_tensors(folder: Path, manifest: dict[str, Any]) -> dict[str, Tensor]:
    """The saved tensors, checked against the manifest's SHA-256."""
    payload = (folder / STATE).read_bytes()
    if hashlib.sha256(payload).hexdigest() != manifest["sha256"]:
        raise CacheMismatchError(
            f"{folder / STATE} does not match its manifest (SHA-256 differs): the two files come "
            "from different saves. Save again.")
    return load_tensors(payload)


def load(folder: Path, model: nn.Module, objective: Objective, train: Any,
         data_id: str | None = None, progress: bool = False,
         batch_fn: Any = None) -> Influence:
    """A fitted Influence rebuilt from ``folder`` without a pass of the model over the data."""
    from ..influence import Influence

    manifest = read_manifest(folder)
    tensors = read_tensors(folder, manifest)
    settings = manifest["settings"]
    influence = Influence(model, objective, train,
                          solver=solver_from_settings(manifest["solver"]),
                          progress=progress, batch_fn=batch_fn, **settings)
    influence._size_for_budget()  # with max_memory: one forward of one example
    tracked = TrackedParameters(model, influence.params)
    tracked.indirect_layers = frozenset(manifest.get("indirect_layers", []))
    theta = tracked.flat()
    gradients = GradientComputer(tracked, objective, influence.vectorize)
    now = cache.fingerprint(tracked, theta, objective, gradients.decay, influence.train_data,
                            data_id)
    saved = manifest["fingerprint"]
    differing = sorted(key for key in set(now) | set(saved) if now.get(key) != saved.get(key))
    if differing:
        hint = (" The fit was saved with a data_id; pass the same data_id."
                if str(saved.get("data", "")).startswith("data_id") and data_id is None else "")
        raise CacheMismatchError(
            f"The fit saved in {folder} was made for something else: {', '.join(differing)} "
            f"differ{'s' if len(differing) == 1 else ''}.{hint} Refit (Influence(...).fit()) or "
            "load with the model, objective and training data it was saved with.")
    sizes = influence.sizes_
    operator = HessianOperator(gradients, influence.train_data, theta,
                               manifest["operator"]["damping"], influence.chunk_size,
                               influence.hvp_mode, progress, influence.curvature,
                               sizes.max_vectors if sizes else 128)
    operator.restore_modes(manifest["operator"]["modes"])
    influence.solver.progress = progress
    influence.solver.restore(operator, unprefixed("solver", tensors), manifest["solver_state"])
    choice = manifest["damping_choice"]
    influence.damping_choice_ = None if choice is None else DampingChoice(
        choice["value"], choice["reason"], SpectrumEstimate(**choice["estimate"]))
    influence.stationarity_ = Stationarity(**manifest["stationarity"])
    influence._bind(theta, gradients, operator, manifest["train_gradient_norm"])
    return influence
