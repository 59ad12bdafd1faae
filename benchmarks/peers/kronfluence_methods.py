"""kronfluence 1.0.1 (EK-FAC, K-FAC) on the shared benchmark problem.

Conventions, read from kronfluence 1.0.1's source and docstrings (``kronfluence/task.py``,
``arguments.py``, ``factor/config.py``, ``factor/covariance.py``, ``factor/eigen.py``):

- The user's ``Task.compute_train_loss(batch, model, sample)`` returns the SUMMED loss of
  the batch; ``sample=True`` must draw labels from the model's predictive distribution
  (the true Fisher, the default ``use_empirical_fisher=False``). ``compute_measurement``
  is the query function f; we use the summed cross-entropy of the query batch, so each
  query's gradient is that of its own loss.
- Covariance and Lambda matrices are divided by the number of examples processed, so the
  curvature is a per-example MEAN (mean-scale Fisher/GGN, the same scale as our H).
  ``damping_factor`` is added to the (corrected) eigenvalues: λ_d = problem.damping, unchanged.
- ``compute_pairwise_scores`` returns {"all_modules": (m query, n train)} holding
  ∇f(z_query)ᵀ (F + λ·I)⁻¹ ∇L(z_train) with a PLUS sign; ours = −kronfluence.
- Only nn.Linear / nn.Conv2d are tracked (here: all three Linear layers, all parameters).
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import logging
import tempfile
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import TensorDataset

VERSION = importlib.metadata.version("kronfluence")
SEED = 0  # label sampling for the true Fisher


def _task_class():
    from kronfluence.task import Task

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:  # true Fisher: labels drawn from the model's predictive distribution
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), dim=-1)
                    labels = torch.multinomial(probs, num_samples=1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

    return ClassificationTask


def _scores(problem, strategy: str, use_empirical_fisher: bool = False,
            heuristic_damping: bool = False) -> Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    torch.manual_seed(SEED)
    n, m = len(problem.y_train), len(problem.y_test)
    train = TensorDataset(problem.X_train, problem.y_train)
    query = TensorDataset(problem.X_test, problem.y_test)
    task = _task_class()()
    # prepare_model wraps the Linear modules in place and freezes the parameters; work on
    # a copy so the Problem's model stays usable (a second wrap would double-count).
    model = prepare_model(copy.deepcopy(problem.model), task)
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer(analysis_name="bench", model=model, task=task, cpu=True,
                            disable_tqdm=True, output_dir=folder,
                            log_level=logging.WARNING)
        analyzer.fit_all_factors(
            factors_name=strategy, dataset=train, per_device_batch_size=n,
            factor_args=FactorArguments(strategy=strategy,
                                        use_empirical_fisher=use_empirical_fisher),
            overwrite_output_dir=True)
        analyzer.compute_pairwise_scores(
            scores_name=strategy, factors_name=strategy, query_dataset=query,
            train_dataset=train, per_device_query_batch_size=m,
            per_device_train_batch_size=n,
            score_args=ScoreArguments(
                damping_factor=None if heuristic_damping else problem.damping),
            overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores(scores_name=strategy)["all_modules"]
    return -scores.detach().to(torch.float64)  # (m, n); ours = −kronfluence


METHODS: dict[str, Callable] = {
    "kronfluence-ekfac": functools.partial(_scores, strategy="ekfac"),
    "kronfluence-kfac": functools.partial(_scores, strategy="kfac"),
    # its other documented curvature: the empirical Fisher, from the true labels
    "kronfluence-ekfac-empirical": functools.partial(_scores, strategy="ekfac",
                                                     use_empirical_fisher=True),
    # its documented alternative to a fixed damping: 0.1 x each module's mean eigenvalue
    "kronfluence-ekfac-heuristic-damping": functools.partial(_scores, strategy="ekfac",
                                                             heuristic_damping=True),
}

_COMMON = {
    "api": "Analyzer(model=prepare_model(model, task), task, cpu=True).fit_all_factors(...); "
           "compute_pairwise_scores(...); load_pairwise_scores(...)['all_modules']",
    "task": "compute_train_loss: summed cross-entropy, labels sampled from softmax when "
            "sample=True; compute_measurement: summed cross-entropy of the query batch",
    "use_empirical_fisher": False,
    "curvature": "true Fisher (= GGN for cross-entropy), Monte-Carlo with one sampled label "
                 "per example (torch.manual_seed(0)), per-example mean scale",
    "damping_factor": "damping (1e-3), unchanged (mean scale)",
    "batch_sizes": "factors: 1,257 (one batch); scores: query 100, train 1,257 "
                   "(set explicitly to skip kronfluence's batch-size search)",
    "dtypes": "library defaults (float32 covariances and scores, float64 eigendecomposition)",
    "model": "copy.deepcopy(problem.model) wrapped by prepare_model (in-place wrapping "
             "would otherwise freeze / double-wrap the shared model)",
    "output_dir": "a temporary directory (factors and scores are written as safetensors)",
    "orientation": "(m query, n train), as returned",
    "sign": "kronfluence returns +grad f(query)^T (F + damping I)^-1 grad L(train); "
            "ours = -kronfluence",
    "conversion": "scores = -kronfluence_scores.double()",
}

SETTINGS: dict[str, dict] = {
    "kronfluence-ekfac": {**_COMMON, "strategy": "ekfac"},
    "kronfluence-kfac": {**_COMMON, "strategy": "kfac"},
    "kronfluence-ekfac-heuristic-damping": {**_COMMON, "strategy": "ekfac",
                                            "damping_factor": "None: kronfluence's heuristic, "
                                            "0.1 x the mean corrected eigenvalue of each "
                                            "module (not the problem's damping)"},
    "kronfluence-ekfac-empirical": {**_COMMON, "strategy": "ekfac", "use_empirical_fisher": True,
                                    "curvature": "empirical Fisher: gradients at the true "
                                                 "labels, per-example mean scale"},
}
