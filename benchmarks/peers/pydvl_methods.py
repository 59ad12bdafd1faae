"""pyDVL 0.10 (``pydvl.influence.torch``) on the shared benchmark problem.

Conventions, read from pyDVL 0.10.0's source and docstrings
(``pydvl/influence/torch/influence_function_model.py``, ``operator.py``,
``batch_operation.py``, ``base_influence_function_model.py``):

- ``influences(x_test, y_test, x, y, mode=InfluenceMode.Up)`` returns
  ⟨(H + r·I)⁻¹ ∇ℓ(z_test), ∇ℓ(z)⟩ with shape (m test, n train) and a PLUS sign.
  Our I_up,loss carries a minus sign, so ours = −pyDVL (orientation already (m, n)).
- ``HessianOperator`` is the Hessian of the batch loss ``loss(model(x), y)`` (we pass
  ``F.cross_entropy``, reduction mean), averaged over the batches of the fit loader by
  ``ChunkAveraging`` (an unweighted mean over batches). One batch holding all n training
  points therefore gives exactly the Hessian of the MEAN training loss, our H.
- ``regularization`` r is added as r·I to that mean-scale operator (CG, Arnoldi, LiSSA),
  so r = our damping λ_d = problem.damping, unchanged.
- LiSSA iterates h ← v + (1 − dampen)·h − (H_batch + r·I)·h / scale and returns h/scale;
  with ``dampen = 0`` (default) the fixed point is (H + r·I)⁻¹ v, so r = λ_d again.
  Each iteration draws one batch from a shuffled loader with the fit loader's batch size.
- Arnoldi (``use_woodbury=False``, default) applies V (D + r)⁻¹ Vᵀ on the top-``rank``
  eigenpairs (by magnitude, scipy ARPACK) of the mean-loss Hessian: the complement of
  the Krylov subspace is dropped.
- EK-FAC (``EkfacInfluence``) only knows cross-entropy and nn.Linear. Its K-FAC blocks are
  per-sample means (hooks summed over the batch, divided by the number of points) of a
  pseudo-loss Σ_c √p_c·log p_c (``empirical_cross_entropy_loss_fn``), so its curvature
  is a mean-scale Fisher-type matrix; ``hessian_regularization`` is added to the
  (corrected) eigenvalues, i.e. r·I on the mean scale: r = λ_d. ``update_diagonal=False``
  (the default) is plain K-FAC in the Kronecker eigenbasis; ``True`` refits the diagonal
  (EK-FAC proper).
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import matched  # benchmarks/ is on the path (run_one.py)

VERSION = importlib.metadata.version("pydvl")

# Batch size of the loader LiSSA samples from (one batch per iteration). The problem's
# model was trained with mini-batches of 64; pyDVL has no LiSSA batch-size argument of its
# own: the loader passed to fit() decides it.
LISSA_BATCH_SIZE = 64
SEED = 0


def _full_batch_loader(problem) -> DataLoader:
    n = len(problem.y_train)
    return DataLoader(TensorDataset(problem.X_train, problem.y_train), batch_size=n,
                      shuffle=False)


def _influences(model_obj, problem) -> Tensor:
    from pydvl.influence import InfluenceMode

    values = model_obj.influences(problem.X_test, problem.y_test, problem.X_train,
                                  problem.y_train, mode=InfluenceMode.Up)
    return -values.detach().to(torch.float64)  # ours = −pyDVL, already (m, n)


def cg(problem, *, solve_simultaneously: bool, **overrides) -> Tensor:
    from pydvl.influence.torch import CgInfluence

    model = CgInfluence(problem.model, F.cross_entropy, regularization=problem.damping,
                        solve_simultaneously=solve_simultaneously, **overrides)
    model = model.fit(_full_batch_loader(problem))
    return _influences(model, problem)


def lissa(problem, *, batch_size: int = LISSA_BATCH_SIZE, **overrides) -> Tensor:
    from pydvl.influence.torch import LissaInfluence

    torch.manual_seed(SEED)  # LiSSA shuffles its own loader: make the draw reproducible
    loader = DataLoader(TensorDataset(problem.X_train, problem.y_train),
                        batch_size=batch_size, shuffle=False)
    model = LissaInfluence(problem.model, F.cross_entropy, regularization=problem.damping,
                           **overrides)
    model = model.fit(loader)
    return _influences(model, problem)


def arnoldi(problem, *, rank: int = 50, **overrides) -> Tensor:
    from pydvl.influence.torch import ArnoldiInfluence

    model = ArnoldiInfluence(problem.model, F.cross_entropy, regularization=problem.damping,
                             rank=rank, **overrides)
    model = model.fit(_full_batch_loader(problem))
    return _influences(model, problem)


def ekfac(problem, *, update_diagonal: bool, **overrides) -> Tensor:
    from pydvl.influence.torch import EkfacInfluence

    model = EkfacInfluence(problem.model, update_diagonal=update_diagonal,
                           hessian_regularization=problem.damping, **overrides)
    model = model.fit(_full_batch_loader(problem))
    return _influences(model, problem)


def with_retained_heap(method: Callable) -> Callable:
    """``method`` with glibc's allocator keeping freed memory, as influencekit sets it during
    its own calls (influencekit.heap; a user could get the same with MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_): what pyDVL's time would be without the page faults ours avoid."""
    from influencekit import heap

    def run(problem) -> Tensor:
        with heap.retained():
            return method(problem)

    return run


# Block CG at the looser tolerances of the comparison at matched accuracy (matched.py)

METHODS: dict[str, Callable] = {
    "pydvl-cg-block": functools.partial(cg, solve_simultaneously=True),
    **{f"pydvl-cg-block-rtol-{rtol:g}": functools.partial(cg, solve_simultaneously=True,
                                                          rtol=rtol)
       for rtol in matched.PYDVL_RTOLS},
    "pydvl-cg": functools.partial(cg, solve_simultaneously=False),
    "pydvl-lissa": lissa,
    "pydvl-arnoldi": arnoldi,
    "pydvl-ekfac": functools.partial(ekfac, update_diagonal=True),
    "pydvl-kfac": functools.partial(ekfac, update_diagonal=False),
}

_COMMON = {
    "api": "pydvl.influence.torch.<Class>(model, F.cross_entropy, regularization=damping)"
           ".fit(loader).influences(X_test, y_test, X_train, y_train, mode=InfluenceMode.Up)",
    "loss": "torch.nn.functional.cross_entropy (mean over the batch)",
    "curvature": "Hessian of the batch-mean loss, averaged over the fit loader's batches "
                 "(one batch of all 1,257 points = Hessian of the mean training loss)",
    "regularization": "damping (1e-3) unchanged: added as r*I to the mean-scale operator",
    "fit_loader": "one batch holding all training points, no shuffling",
    "orientation": "(m test, n train), as returned",
    "sign": "pyDVL returns +<(H+rI)^-1 g_test, g_train>; ours = -pyDVL",
    "conversion": "scores = -pydvl_influences.double()",
}

SETTINGS: dict[str, dict] = {
    "pydvl-cg-block": {**_COMMON, "class": "CgInfluence", "solve_simultaneously": True,
                       "rtol": 1e-4, "atol": 1e-6, "maxiter": "None (default: 10 x number "
                       "of right-hand sides = 1,000 block iterations)",
                       "note": "stopping rule per column: ||r|| < max(rtol^2 ||b||, atol^2)"},
    **{f"pydvl-cg-block-rtol-{rtol:g}": {
        **_COMMON, "class": "CgInfluence", "solve_simultaneously": True, "rtol": rtol,
        "atol": 1e-6, "note": f"stopping rule per column: ||r|| < max({rtol ** 2:g} ||b||, "
                              "1e-12); a looser tolerance than the default, for matched "
                              "accuracy"} for rtol in matched.PYDVL_RTOLS},
    "pydvl-cg": {**_COMMON, "class": "CgInfluence", "solve_simultaneously": False,
                 "rtol": 1e-4, "atol": 1e-6,
                 "maxiter": "None (default: 10 x number of parameters = 850,020 per test point)",
                 "note": "one right-hand side at a time; pyDVL's stopping level is "
                         "max(rtol^2 * c, atol^2) with c the norm of a COLUMN of the "
                         "right-hand-side matrix (indexing quirk), here about 1e-12 absolute on "
                         "the recursively updated residual; on this problem it is reached "
                         "after ~100-140 iterations per test point"},
    "pydvl-lissa": {**_COMMON, "class": "LissaInfluence", "maxiter": 1000, "dampen": 0.0,
                    "scale": 10.0, "rtol": 1e-4,
                    "fit_loader": f"batch_size={LISSA_BATCH_SIZE} (the problem's training "
                                  "batch size), LiSSA draws one shuffled batch per iteration; "
                                  "torch.manual_seed(0) first",
                    "note": "all library defaults; fixed point (H + damping I)^-1 v with "
                            "dampen=0, so regularization = damping unchanged"},
    "pydvl-arnoldi": {**_COMMON, "class": "ArnoldiInfluence", "rank": 50,
                      "krylov_dimension": "None (default: max(2*rank+1, 20) = 101)",
                      "tol": 1e-6, "use_woodbury": False,
                      "note": "x = V (D + r)^-1 V^T b on the top-50 eigenpairs by magnitude "
                              "(scipy eigsh); complement of the subspace dropped"},
    "pydvl-ekfac": {**_COMMON, "class": "EkfacInfluence", "update_diagonal": True,
                    "hessian_regularization": "damping (1e-3), mean scale",
                    "curvature": "EK-FAC of a mean-scale Fisher-type matrix built from "
                                 "pyDVL's pseudo-loss sum_c sqrt(p_c) log p_c (no labels); "
                                 "nn.Linear layers only",
                    "api": "EkfacInfluence(model, update_diagonal=True, "
                           "hessian_regularization=damping).fit(loader).influences(...)"},
    "pydvl-kfac": {**_COMMON, "class": "EkfacInfluence", "update_diagonal": False,
                   "hessian_regularization": "damping (1e-3), mean scale",
                   "curvature": "K-FAC (EkfacInfluence default update_diagonal=False) of the "
                                "same Fisher-type matrix",
                   "api": "EkfacInfluence(model, hessian_regularization=damping)"
                          ".fit(loader).influences(...)"},
}

# the block-CG rows of the matched comparison again, with glibc keeping freed memory
for _rtol in matched.PYDVL_RTOLS:
    _row = f"pydvl-cg-block-rtol-{_rtol:g}"
    METHODS[_row + matched.RETAINED_HEAP] = with_retained_heap(METHODS[_row])
    SETTINGS[_row + matched.RETAINED_HEAP] = {
        **SETTINGS[_row], "allocator": "glibc keeps freed memory during the call "
        "(influencekit.heap.retained: mmap threshold 1 GiB, trim threshold 2 GiB), as "
        "influencekit's own calls do"}
