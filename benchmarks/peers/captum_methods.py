"""captum 0.9.0 (``captum.influence.ArnoldiInfluenceFunction``) on the shared benchmark.

Conventions, read from captum 0.9.0's source and docstrings
(``captum/influence/_core/arnoldi_influence_function.py``, ``_utils/common.py``):

- ``loss_fn`` must be a ``reduction='none'`` loss; for the Hessian, captum SUMS the
  per-example losses of each batch and sums the HVPs over the batches of
  ``hessian_dataset`` (default: the training set). Its Hessian is therefore the Hessian
  of the SUMMED training loss, n × ours.
- ``hessian_reg`` is added to the diagonal of the Hessian restricted to the Krylov
  subspace, i.e. on that summed scale; our λ_d on the mean scale becomes
  ``hessian_reg = n × λ_d`` (1,257 × 1e-3 = 1.257).
- Eigenpairs of the regularised restriction above ``hessian_inverse_tol`` are kept, the top
  ``projection_dim`` by value; each example's embedding is ∇ℓᵀ V diag(1/√λ), and
  ``influence((x_test, y_test))`` returns their dot products, (m test, n train), with a
  PLUS sign: g_testᵀ V (n·Λ + n·λ_d)⁻¹ Vᵀ g_train = (1/n) g_testᵀ V (Λ + λ_d)⁻¹ Vᵀ g_train.
- Ours = −n × captum (orientation already (m, n)).
- The per-example gradients use the same ``loss_fn`` per example (test_loss_fn defaults
  to loss_fn), i.e. each example's own cross-entropy.
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

VERSION = importlib.metadata.version("captum")


def arnoldi(problem, *, projection_dim: int = 50, **overrides) -> Tensor:
    try:
        from captum.influence import ArnoldiInfluenceFunction
    except ImportError:  # captum 0.9.0 does not re-export it from captum.influence
        from captum.influence._core.arnoldi_influence_function import (
            ArnoldiInfluenceFunction,
        )

    n = len(problem.y_train)
    # Batches as large as memory allows, as captum's documentation recommends: one batch.
    train = DataLoader(TensorDataset(problem.X_train, problem.y_train), batch_size=n,
                       shuffle=False)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "model.pt")
        torch.save(problem.model.state_dict(), checkpoint)
        influence = ArnoldiInfluenceFunction(
            problem.model, train, checkpoint,
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            projection_dim=projection_dim,
            hessian_reg=n * problem.damping,  # summed-loss scale
            **overrides,
        )
        scores = influence.influence((problem.X_test, problem.y_test))  # (m, n)
    return -n * scores.detach().to(torch.float64)


METHODS: dict[str, Callable] = {"captum-arnoldi": arnoldi}

SETTINGS: dict[str, dict] = {
    "captum-arnoldi": {
        "class": "captum.influence._core.arnoldi_influence_function.ArnoldiInfluenceFunction "
                 "(captum 0.9.0 does not export it from captum.influence)",
        "api": "ArnoldiInfluenceFunction(model, train_loader, checkpoint, "
               "loss_fn=nn.CrossEntropyLoss(reduction='none'), projection_dim=50, "
               "hessian_reg=n*damping).influence((X_test, y_test))",
        "projection_dim": 50, "arnoldi_dim": 200, "arnoldi_tol": 0.1, "seed": 0,
        "hessian_inverse_tol": 1e-4, "sample_wise_grads_per_batch": False,
        "hessian_reg": "n * damping = 1.257 (captum's Hessian is of the summed loss)",
        "train_loader": "one batch of all 1,257 points (also the Hessian data set)",
        "checkpoint": "the model's state_dict saved to a temporary file (captum loads it)",
        "curvature": "Hessian of the summed training loss = n x ours",
        "orientation": "(m test, n train), as returned",
        "sign": "captum returns +g_test^T V (L_sum + reg)^-1 V^T g_train; ours = -n x captum",
        "conversion": "scores = -n * captum_scores.double()",
        "note": "library defaults except hessian_reg (converted to the summed scale)",
    },
}
