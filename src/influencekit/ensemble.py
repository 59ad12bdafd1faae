"""Scores averaged over several models: independently trained ones, or checkpoints of one run.

A single network's influence carries the noise of its own training (initialisation, batch
order): points that another seed would have ranked similarly come out differently. TRAK (Park
et al. 2023, §3) averages attributions over independently trained models for that reason;
:class:`Ensemble` does the same with any fitted :class:`~influencekit.Influence` objects:

    score_ens[j, i] = (1/M) Σ_k score_k[j, i]

for every score kind (``influence``, ``loo_change``, ``self_influence``). Each member keeps its
own solver, damping and reports; the cost is M times one member's. The members must attribute
to the same n training points in the same order (their models may differ in anything else).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from .errors import InputTypeError, InvalidSettingError, ShapeMismatchError
from .influence import Influence, TopK
from .objective import Objective


class Ensemble:
    """The mean of the scores of several fitted :class:`~influencekit.Influence` objects.

    Args:
        members: fitted ``Influence`` objects over the same n training points (one per model
            or checkpoint).

    Example:
        >>> ens = Ensemble.fit(models, CrossEntropyObjective(), (X, y), solver="ekfac")
        >>> ens.loo_change((X_test, y_test)).shape   # (m, n), the mean over the models
    """

    def __init__(self, members: Sequence[Influence]) -> None:
        members = list(members)
        if not members:
            raise InvalidSettingError("An ensemble needs at least one fitted Influence; got none.")
        for k, member in enumerate(members):
            if not isinstance(member, Influence):
                raise InputTypeError(f"members[{k}] must be an influencekit.Influence, got "
                                     f"{type(member).__name__}.")
            member._require_fitted()
        sizes = [member.num_train_ for member in members]
        if len(set(sizes)) != 1:
            raise ShapeMismatchError(f"The members attribute to different numbers of training "
                                     f"points ({sizes}); an ensemble averages scores of the same "
                                     "n points in the same order.")
        self.members = members

    @classmethod
    def fit(cls, models: Sequence[nn.Module], objective: Objective, train: Any,
            on_fitted: Callable[[int], None] | None = None, **settings: Any) -> Ensemble:
        """Fit one ``Influence(model, objective, train, **settings)`` per model.

        ``on_fitted``: called with each member's number after it is fitted (optional).
        """
        members = []
        for k, model in enumerate(models):
            members.append(Influence(model, objective, train, **settings).fit())
            if on_fitted is not None:
                on_fitted(k)
        return cls(members)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def num_train_(self) -> int:
        return self.members[0].num_train_

    def _mean(self, scores: Callable[[Influence], Tensor]) -> Tensor:
        total = None
        for member in self.members:
            values = scores(member).double()
            total = values if total is None else total + values.to(total.device)
        assert total is not None
        return total / len(self.members)

    def influence(self, test: Any) -> Tensor:
        """Mean I_up,loss over the members, ``(m, n)`` (float64)."""
        return self._mean(lambda member: member.influence(test))

    def loo_change(self, test: Any) -> Tensor:
        """Mean predicted change of each test loss when each training point is removed, ``(m, n)``
        (= −influence / n; positive: helpful)."""
        return self._mean(lambda member: member.loo_change(test))

    def self_influence(self) -> Tensor:
        """Mean I_up,loss(z_i, z_i) over the members, ``(n,)``."""
        return self._mean(lambda member: member.self_influence())

    def top_k(self, test: Any, k: int = 10) -> TopK:
        """The k most helpful and most harmful training points per test point by the mean
        ``loo_change`` (:class:`~influencekit.TopK`)."""
        scores = self.loo_change(test)
        if not 1 <= k <= scores.shape[1]:
            raise InvalidSettingError(f"k must be between 1 and the {scores.shape[1]} training "
                                      f"points, got {k}.")
        helpful_scores, helpful = scores.topk(k, dim=1, largest=True)
        harmful_scores, harmful = scores.topk(k, dim=1, largest=False)
        return TopK(helpful, helpful_scores, harmful, harmful_scores)

