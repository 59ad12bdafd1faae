"""dattri 0.3.0 (``dattri.algorithm.influence_function``) on the shared benchmark problem.

Conventions, read from dattri 0.3.0's source and docstrings
(``dattri/algorithm/base.py``, ``influence_function.py``, ``func/hessian.py``,
``func/projection.py``, ``func/fisher.py``, ``task.py``):

- ``attribute(train_loader, test_loader)`` returns a (n train, m test) tensor of
  g_trainᵀ T(g_test) with T ≈ (H + r·I)⁻¹ and a PLUS sign. Ours = −(dattri result)ᵀ.
- The Hessian is that of the task's ``loss_func(params, data)`` evaluated on each batch
  of the cached ``full_train_dataloader``. Our loss_func is the batch-MEAN cross-entropy,
  and the loader holds all n points in one batch, so H is the Hessian of the mean
  training loss. (CG and LiSSA SUM the inverse-HVPs over the loader's batches, so a
  single batch is required for them to mean anything.)
- Per-example gradients: ``vmap(grad(loss_func))`` over single examples (the mean over a
  batch of one = the example's own loss).
- CG and Arnoldi: ``regularization`` is added as r·v in the HVP of the mean loss, so
  r = λ_d = problem.damping.
- LiSSA: h ← v + (1 − damping)·h − H_batch·h / scaling, returning h / scaling; the fixed
  point is (H + scaling·damping·I)⁻¹ v, so the library's ``damping`` must be
  λ_d / scaling (= 1e-3 / 50 = 2e-5 with the default scaling 50).
- Arnoldi: eigenpairs of (H + r·I) from ``max_iter`` Arnoldi steps, the top ``proj_dim`` by
  magnitude kept; score = g_trainᵀ V diag(1/λ) Vᵀ g_test (complement dropped).
- EK-FAC: Fisher of the task's target function (= our loss with the TRUE labels, i.e. the
  empirical Fisher), covariances as per-example means (loss × batch size, divided by the
  number of examples), ``damping`` added to the corrected eigenvalues: r = λ_d.
  Known defect of dattri 0.3.0's EK-FAC (verified numerically, see SETTINGS): the
  eigenvector matrices from ``torch.linalg.eigh`` (eigenvectors in COLUMNS) are applied as
  if the eigenvectors were rows, and the bias entries are mis-laid-out; its scores are
  used as shipped.
- CG runs exactly ``max_iter`` iterations (``tol`` is unused). (With grad mode on, i.e.
  without the torch.no_grad() below, a tiny check even turned NaN past convergence.)
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

VERSION = importlib.metadata.version("dattri")


def _task(problem):
    from dattri.task import AttributionTask

    model = problem.model

    def loss_func(params, data):
        x, y = data
        outputs = torch.func.functional_call(model, params, (x,))
        # dattri's LiSSA collate function casts labels to float; cross-entropy needs long.
        return F.cross_entropy(outputs, y.long())

    checkpoint = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return AttributionTask(loss_func=loss_func, model=model, checkpoints=checkpoint)


def _loaders(problem) -> tuple[DataLoader, DataLoader]:
    n, m = len(problem.y_train), len(problem.y_test)
    train = DataLoader(TensorDataset(problem.X_train, problem.y_train), batch_size=n,
                       shuffle=False)
    test = DataLoader(TensorDataset(problem.X_test, problem.y_test), batch_size=m,
                      shuffle=False)
    return train, test


def _attribute(attributor, problem) -> Tensor:
    train, test = _loaders(problem)
    attributor.cache(train)
    # As dattri's own examples do (examples/noisy_label_detection/..., pretrained_benchmark/
    # influence_function_lds.py): attribute() under torch.no_grad(). The torch.func
    # transforms inside still differentiate; without it the parameters' requires_grad makes
    # every HVP keep an outer autograd graph (dattri-cg peaked at 17 GB, dattri-lissa was
    # OOM-killed at 21 GB on the benchmark problem).
    with torch.no_grad():
        scores = attributor.attribute(train, test)  # (n train, m test)
    return -scores.detach().T.to(torch.float64)


def cg(problem, **overrides) -> Tensor:
    from dattri.algorithm.influence_function import IFAttributorCG

    attributor = IFAttributorCG(_task(problem), device="cpu",
                                regularization=problem.damping, **overrides)
    return _attribute(attributor, problem)


LISSA_SCALING = 50.0  # dattri default


def lissa(problem, *, scaling: float = LISSA_SCALING, **overrides) -> Tensor:
    from dattri.algorithm.influence_function import IFAttributorLiSSA

    torch.manual_seed(0)  # LiSSA samples with torch.randperm: make the draw reproducible
    attributor = IFAttributorLiSSA(_task(problem), device="cpu", scaling=scaling,
                                   damping=problem.damping / scaling, **overrides)
    return _attribute(attributor, problem)


def arnoldi(problem, *, proj_dim: int = 50, **overrides) -> Tensor:
    from dattri.algorithm.influence_function import IFAttributorArnoldi

    attributor = IFAttributorArnoldi(_task(problem), device="cpu", proj_dim=proj_dim,
                                     regularization=problem.damping, **overrides)
    return _attribute(attributor, problem)


def ekfac(problem, **overrides) -> Tensor:
    from dattri.algorithm.influence_function import IFAttributorEKFAC

    attributor = IFAttributorEKFAC(_task(problem), device="cpu", damping=problem.damping,
                                   **overrides)
    return _attribute(attributor, problem)


def trak(problem, checkpoints: list[dict] | None = None, proj_dim: int = 512) -> Tensor:
    """TRAK (dattri.algorithm.trak.TRAKAttributor) over ``checkpoints`` (state dicts of
    independently trained models; default: the problem's one model), configured as dattri's
    own example (examples/pretrained_benchmark/trak_lds.py): the per-example margin
    log(p / (1 − p)) as the loss, the probability of the true label as
    ``correct_probability_func``, the default projection to 512 dimensions (dattri 0.3.0's
    projector has no ``use_half_precision`` option, which the example passes; it computes in
    the input's dtype, float32 here).

    TRAK scores how much a training point raises the test point's margin (helpful > 0); the
    margin falls as the test loss −log p rises, so in influencekit's orientation (positive =
    raises the test loss) the scores are negated: ours = −dattriᵀ (scale is irrelevant to LDS).
    """
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    model = problem.model

    def margin(params, pair):
        x, y = pair
        log_p = -F.cross_entropy(torch.func.functional_call(model, params, (x.unsqueeze(0),)),
                                 y.unsqueeze(0).long())
        return log_p - torch.log(1 - torch.exp(log_p))

    def probability(params, pair):
        x, y = pair
        return torch.exp(-F.cross_entropy(
            torch.func.functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0).long()))

    states = checkpoints or [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    task = AttributionTask(loss_func=margin, model=model, checkpoints=states)
    attributor = TRAKAttributor(task=task, correct_probability_func=probability, device="cpu",
                                projector_kwargs={"device": "cpu", "proj_dim": proj_dim})
    train, test = _loaders(problem)
    with torch.no_grad():
        attributor.cache(train)
        scores = attributor.attribute(test)  # (n train, m test)
    return -scores.detach().T.to(torch.float64)


METHODS: dict[str, Callable] = {
    "dattri-trak": trak,
    "dattri-cg": cg,
    "dattri-lissa": lissa,
    "dattri-arnoldi": arnoldi,
    "dattri-ekfac": ekfac,
}

_COMMON = {
    "api": "dattri.algorithm.influence_function.IFAttributor<X>(task, ...); "
           "cache(train_loader); attribute(train_loader, test_loader)",
    "task": "AttributionTask(loss_func=mean cross-entropy via torch.func.functional_call, "
            "model, checkpoints=state_dict)",
    "loaders": "train: one batch of all 1,257 points; test: one batch of 100; no shuffling",
    "no_grad": "cache() as is, attribute() inside torch.no_grad() (as in dattri's examples)",
    "curvature": "Hessian of the batch-mean loss on the single full training batch "
                 "(= Hessian of the mean training loss)",
    "orientation": "dattri returns (n train, m test); transposed",
    "sign": "dattri returns +g_train^T (H+rI)^-1 g_test; ours = -dattri^T",
    "conversion": "scores = -dattri_scores.T.double()",
}

SETTINGS: dict[str, dict] = {
    "dattri-trak": {"class": "TRAKAttributor", "loss_func": "per-example margin "
                    "log(p/(1-p)) (dattri's example trak_lds.py)", "correct_probability_func":
                    "p of the true label", "proj_dim": 512,
                    "checkpoints": "one model (dattri-trak) or the independently trained "
                                   "models of the ensemble (TRAK-M in lds_mlp.py)",
                    "sign": "TRAK scores raise the margin; ours = -dattri^T"},
    "dattri-cg": {**_COMMON, "class": "IFAttributorCG", "regularization": "damping (1e-3)",
                  "max_iter": 10, "tol": "1e-7 (documented, but unused by ihvp_at_x_cg: "
                  "exactly max_iter iterations are run)", "mode": "rev-rev",
                  "note": "library defaults; 10 CG iterations do not converge on this problem"},
    "dattri-lissa": {**_COMMON, "class": "IFAttributorLiSSA", "batch_size": 1,
                     "num_repeat": 1, "recursion_depth": 5000, "scaling": LISSA_SCALING,
                     "damping": "damping / scaling = 2e-5 (effective damping scaling*damping "
                                "= 1e-3 on the mean-loss Hessian)",
                     "mode": "rev-rev", "seed": "torch.manual_seed(0) before the call",
                     "note": "library defaults except damping (converted)"},
    "dattri-arnoldi": {**_COMMON, "class": "IFAttributorArnoldi", "proj_dim": 50,
                       "max_iter": 100, "tol": 1e-7, "norm_constant": 1.0, "seed": 0,
                       "precompute_data_ratio": 1.0, "regularization": "damping (1e-3), "
                       "added in the HVP before the eigen-decomposition",
                       "note": "score = g_train^T V diag(1/(lambda_i)) V^T g_test over the "
                               "top-50 (by |lambda|) eigenpairs of H + damping*I"},
    "dattri-ekfac": {**_COMMON, "class": "IFAttributorEKFAC",
                     "module_name": "None (all nn.Linear)", "damping": "damping (1e-3), mean "
                     "scale, added to the corrected eigenvalues",
                     "curvature": "EK-FAC of the empirical Fisher (true labels, the task's "
                                  "loss), per-example means",
                     "note": "library as shipped. Verified on a case where EK-FAC is exact "
                             "(one nn.Linear layer, identical training points): dattri 0.3.0's "
                             "result is wrong there (Pearson -0.35 with bias, -0.18 without) "
                             "because (1) it uses the columns of torch.linalg.eigh's eigenvector "
                             "matrices as rows (q @ v @ q.T instead of q.T @ v @ q) in "
                             "estimate_lambda and transform_test_rep, and (2) "
                             "transform_test_rep reshapes [W.flatten(), b] to (out, in+1), "
                             "which scrambles weight and bias entries. With both patched "
                             "(diagnostic only, not used here) it matches the dense "
                             "empirical-Fisher reference to 2e-3 with this conversion."},
}
