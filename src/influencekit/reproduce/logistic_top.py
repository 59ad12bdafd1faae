"""An L2-regularised binary logistic regression on fixed features, refitted exactly and fast.

§5.2's attack retrains the top layer after every step of every attack (thousands of refits of a
1,281-parameter model on 1,800 points) and needs I_pert,loss at each new optimum. The objective is
the one :class:`~influencekit.BinaryLogisticObjective` and :class:`LogisticTop` define,

    R(θ) = (1/n) Σ_i log(1 + exp(−y_i·θᵀx̃_i)) + (λ/2)·‖θ‖²,   x̃_i = (f_i, 1), y_i ∈ {−1, +1},

(λ on the bias too), solved here in closed form per step instead of through autograd:

- gradient ∇R = −(1/n) X̃ᵀ(y ⊙ σ(−m)) + λθ and Hessian H = (1/n) X̃ᵀ diag(σ(m)σ(−m)) X̃ + λI, with
  margins m_i = y_i·θᵀx̃_i;
- a refit after a few rows of the features moved starts at the old optimum and takes steps
  θ ← θ − P⁻¹∇R(θ), P = H₀ corrected exactly (Woodbury, rank 2k) for the k moved rows, H₀⁻¹ taken
  once at the clean optimum (one Cholesky factorisation serves a whole attack); if a step does not
  halve ‖∇R‖, H is factorised afresh at the current θ (a damped Newton step); a refit ends at
  ‖∇R‖ ≤ ``tol`` or raises;
- solves H(θ)v = g by conjugate gradients on Hessian-vector products, preconditioned by the same
  P, to a relative (recursively updated) residual of 1e-12;
- the feature-space I_pert,loss of training point i on test loss L_t (Koh & Liang eq. 5, with
  v = H⁻¹∇_θL_t and a_i = σ(−m_i)):

      I_pert,loss(i) = −∇_f [∇_θL_tᵀ H⁻¹ ∇_θℓ_i] = y_i·a_i·v_w − a_i(1 − a_i)·(vᵀx̃_i)·w,   (d,)

  where w, v_w are the weight parts (the bias does not depend on f). Chained through the frozen
  extractor's Jacobian it gives the gradient with respect to the pixels.

The tests check all of it against :func:`~influencekit.training.minimize` and
:meth:`~influencekit.Influence.perturbation_influence` on the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def signed(labels: Tensor) -> Tensor:
    """{0, 1} (or {−1, +1}) labels → float64 {−1, +1}."""
    y = labels.to(torch.float64)
    return torch.where(y == 0, -torch.ones_like(y), y)


@dataclass
class LogisticState:
    """A fitted top layer and the inverse Hessian used near it.

    Attributes:
        theta: θ = (w, b), ``(d + 1,)``.
        inverse: H⁻¹ at ``inverse_theta`` on ``inverse_features`` (from its Cholesky factor; a
            dense inverse because applying it is one matrix product, several times faster on the
            CPU than two triangular solves; only a preconditioner: every result is checked against
            the true gradient and Hessian products).
        inverse_theta: where the inverse was taken.
        inverse_features: ``(n, d)`` the features it was taken on (rows moved since are corrected
            for exactly, see :meth:`LogisticTopLayer.preconditioner`).
    """

    theta: Tensor
    inverse: Tensor
    inverse_theta: Tensor
    inverse_features: Tensor


class Preconditioner:
    """P⁻¹ for P = H₀ + U·diag(c)·Uᵀ by the Woodbury identity, H₀⁻¹ the stored inverse:

        P⁻¹r = z − W·S⁻¹·(c ⊙ Uᵀz),   z = H₀⁻¹r,  W = H₀⁻¹U,  S = I + diag(c)·UᵀW.

    U holds the moved rows twice — (f_i, 1) now and as when H₀ was taken — with c their
    curvature σ(m)σ(−m)/n at the current θ and minus it at the inverse's θ, so P is H with those
    rows' contributions exact (only the other rows' curvature drift is left out).
    """

    def __init__(self, inverse: Tensor, U: Tensor | None = None, c: Tensor | None = None,
                 W: Tensor | None = None) -> None:
        self.inverse = inverse
        self.U = U
        if U is not None and c is not None:
            self.c = c
            self.W = inverse @ U if W is None else W
            S = torch.eye(len(c), dtype=U.dtype) + c[:, None] * (U.T @ self.W)
            self.S_lu = torch.linalg.lu_factor(S)

    def __call__(self, R: Tensor) -> Tensor:
        Z = self.inverse @ R
        if self.U is None:
            return Z
        inner = self.c[:, None] * (self.U.T @ Z)
        return Z - self.W @ torch.linalg.lu_solve(*self.S_lu, inner)


class LogisticTopLayer:
    """R(θ) of the module doc on features ``(n, d)`` (float64) and labels ``(n,)``.

    The features are held by reference and may be edited in place between refits (the attack
    moves a few rows); every method reads their current values. ``moved``, when set, names the
    rows that may differ from the features the stored inverse was taken on (saves comparing all
    of them); a wrong hint only weakens the preconditioner, never the result, since every refit and
    solve is checked against the true gradient and Hessian.
    """

    def __init__(self, features: Tensor, labels: Tensor, weight_decay: float,
                 tol: float = 1e-10, max_steps: int = 200) -> None:
        if features.ndim != 2 or features.dtype != torch.float64:
            raise ValueError(f"features must be a float64 (n, d) matrix, got {features.dtype} "
                             f"{tuple(features.shape)}")
        if labels.shape != (features.shape[0],):
            raise ValueError(f"labels must have shape ({features.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        self.features = features
        self.y = signed(labels)
        self.weight_decay = float(weight_decay)
        self.tol = tol
        self.max_steps = max_steps
        self.factorisations = 0
        self.moved: Tensor | None = None

    @property
    def n(self) -> int:
        return self.features.shape[0]

    def margins(self, theta: Tensor, features: Tensor | None = None,
                labels: Tensor | None = None) -> Tensor:
        """y·(wᵀf + b) for the training set, or for ``features``/``labels`` if given."""
        f = self.features if features is None else features
        y = self.y if labels is None else signed(labels)
        return y * (f @ theta[:-1] + theta[-1])

    def curvature(self, theta: Tensor, features: Tensor | None = None,
                  labels: Tensor | None = None) -> Tensor:
        """σ(m)σ(−m)/n per row: the weight of (f_i, 1)(f_i, 1)ᵀ in the Hessian."""
        m = self.margins(theta, features, labels)
        return torch.sigmoid(m) * torch.sigmoid(-m) / self.n

    def gradient(self, theta: Tensor) -> Tensor:
        """∇R(θ), ``(d + 1,)``."""
        coefficient = -(self.y * torch.sigmoid(-self.margins(theta))) / self.n
        return torch.cat([self.features.T @ coefficient, coefficient.sum().reshape(1)]) + \
            self.weight_decay * theta

    def hessian(self, theta: Tensor) -> Tensor:
        """∇²R(θ), ``(d + 1, d + 1)``."""
        X = torch.cat([self.features, self.features.new_ones(self.n, 1)], dim=1)
        H = X.T @ (self.curvature(theta)[:, None] * X)
        H.diagonal().add_(self.weight_decay)
        return H

    def hessian_product(self, theta: Tensor, V: Tensor,
                        curvature: Tensor | None = None) -> Tensor:
        """H(θ)·V without forming H: ``V`` ``(d + 1, q)`` → ``(d + 1, q)`` (``curvature``: the
        rows' σ(m)σ(−m)/n at θ, if already computed)."""
        weights = self.curvature(theta) if curvature is None else curvature
        projected = weights[:, None] * (self.features @ V[:-1] + V[-1])
        return torch.cat([self.features.T @ projected, projected.sum(0, keepdim=True)]) + \
            self.weight_decay * V

    def factorised(self, theta: Tensor) -> LogisticState:
        """θ with H(θ)⁻¹ taken afresh (by Cholesky) on the current features."""
        self.factorisations += 1
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(self.hessian(theta)))
        return LogisticState(theta, inverse, theta, self.features.clone())

    def preconditioner(self, state: LogisticState, theta: Tensor,
                       reuse: Preconditioner | None = None) -> Preconditioner:
        """P ≈ H(θ): the stored inverse, corrected exactly for the rows moved since it was taken.

        ``reuse``: a preconditioner built for the same features (only θ differs): its H₀⁻¹U is
        kept.
        """
        if self.moved is not None:
            moved = self.moved
        else:
            moved = torch.nonzero((self.features != state.inverse_features).any(dim=1)).flatten()
        if moved.numel() == 0:
            return Preconditioner(state.inverse)
        labels = self.y[moved]
        now, then = self.features[moved], state.inverse_features[moved]
        ones = now.new_ones(len(moved), 1)
        U = torch.cat([torch.cat([now, ones], 1), torch.cat([then, ones], 1)]).T
        c = torch.cat([self.curvature(theta, now, labels),
                       -self.curvature(state.inverse_theta, then, labels)])
        W = reuse.W if reuse is not None and reuse.U is not None and \
            reuse.inverse is state.inverse and torch.equal(reuse.U, U) else None
        return Preconditioner(state.inverse, U, c, W)

    def fit(self, start: LogisticState | None = None) -> LogisticState:
        """The optimum from ``start`` (or from zero) to ‖∇R‖ ≤ tol.

        Steps θ ← θ − P⁻¹∇R(θ) with P the corrected stored inverse (:meth:`preconditioner`);
        whenever a step does not halve ‖∇R‖, H is factorised afresh at the current θ (a Newton
        step, damped by halving until ‖∇R‖ decreases).
        """
        state = self.factorised(self.features.new_zeros(self.features.shape[1] + 1)) \
            if start is None else start
        theta = state.theta.clone()
        gradient = self.gradient(theta)
        norm = float(gradient.norm())
        apply: Preconditioner | None = None
        for _ in range(self.max_steps):
            if norm <= self.tol:
                if start is None:  # H⁻¹ at the optimum: what later refits start from
                    return self.factorised(theta)
                return LogisticState(theta, state.inverse, state.inverse_theta,
                                     state.inverse_features)
            apply = self.preconditioner(state, theta, apply)
            step = apply(gradient[:, None])[:, 0]
            candidate = theta - step
            new_gradient = self.gradient(candidate)
            new_norm = float(new_gradient.norm())
            if new_norm > 0.5 * norm:  # the inverse is stale: Newton from here
                state = self.factorised(theta)
                step = state.inverse @ gradient
                shrink = 1.0
                while True:
                    candidate = theta - shrink * step
                    new_gradient = self.gradient(candidate)
                    new_norm = float(new_gradient.norm())
                    if new_norm < norm or shrink < 1e-6:
                        break
                    shrink *= 0.5
            theta, gradient, norm = candidate, new_gradient, new_norm
        raise RuntimeError(f"the logistic top layer stopped at ‖∇R‖ = {norm:.2e} after "
                           f"{self.max_steps} steps (tol {self.tol:g})")

    def solve(self, state: LogisticState, rhs: Tensor, rtol: float = 1e-12) -> Tensor:
        """H(θ)⁻¹·rhs at θ = ``state.theta``, ``rhs`` ``(d + 1,)`` or ``(d + 1, q)``: conjugate
        gradients on Hessian-vector products (no H formed), preconditioned by
        :meth:`preconditioner`, until the (recursively updated) residual is ≤ rtol·‖rhs‖ in
        every column; converged columns (and zero ones) stop moving."""
        B = rhs[:, None] if rhs.ndim == 1 else rhs
        theta = state.theta
        apply = self.preconditioner(state, theta)
        curvature = self.curvature(theta)
        V = apply(B)
        R = B - self.hessian_product(theta, V, curvature)
        Z = apply(R)
        P = Z.clone()
        rz = (R * Z).sum(0)
        limit = rtol * B.norm(dim=0)
        for _ in range(self.max_steps):
            if bool((R.norm(dim=0) <= limit).all()):
                return V[:, 0] if rhs.ndim == 1 else V
            active = R.norm(dim=0) > limit
            HP = self.hessian_product(theta, P, curvature)
            curvature_along = (P * HP).sum(0)
            alpha = torch.where(active, rz / torch.where(active, curvature_along, 1.0), 0.0)
            V = V + alpha * P
            R = R - alpha * HP
            Z = apply(R)
            rz_new = (R * Z).sum(0)
            beta = torch.where(active, rz_new / torch.where(active, rz, 1.0), 0.0)
            P = Z + beta * P
            rz = rz_new
        worst = float((R.norm(dim=0) / B.norm(dim=0).clamp_min(1e-300)).max())
        raise RuntimeError(f"solving with the top layer's Hessian stopped at relative residual "
                           f"{worst:.2e} (rtol {rtol:g})")

    def test_gradient(self, theta: Tensor, features: Tensor, labels: Tensor) -> Tensor:
        """∇_θ of the test losses: ``features`` ``(m, d)`` → ``(d + 1, m)``."""
        a = torch.sigmoid(-self.margins(theta, features, labels))
        coefficient = -(signed(labels) * a)
        X = torch.cat([features, features.new_ones(len(features), 1)], dim=1)
        return (X * coefficient[:, None]).T

    def perturbation_influence(self, state: LogisticState, test_features: Tensor,
                               test_labels: Tensor, rows: Tensor) -> Tensor:
        """Feature-space I_pert,loss of training ``rows`` on each test loss, ``(m, k, d)``.

        Moving f_i by δ changes test loss j by about ⟨result[j, i], δ⟩/n (module doc).
        """
        theta = state.theta
        V = self.solve(state, self.test_gradient(theta, test_features, test_labels))  # (d+1, m)
        f = self.features[rows]
        y = self.y[rows]
        a = torch.sigmoid(-self.margins(theta)[rows])
        along_v = (y * a)[None, :, None] * V[:-1].T[:, None, :]
        inner = (f @ V[:-1] + V[-1]).T  # (m, k): vᵀx̃_i
        along_w = (a * (1 - a))[None, :, None] * inner[:, :, None] * theta[:-1][None, None, :]
        return along_v - along_w
