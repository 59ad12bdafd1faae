"""Random projections of per-example gradients: the training side of the scores in k ≪ p numbers.

Scores are inner products sᵀg_i of a preconditioned query s = A⁻¹∇L_test with training
gradients g_i. A random linear map P: ℝᵖ → ℝᵏ with E[PᵀP] = I keeps them on average,
⟨Ps, Pg⟩ ≈ ⟨s, g⟩, with an error of order ‖s‖‖g‖/√k (Johnson-Lindenstrauss); a gradient store
keeps Pg_i and scores a query as ⟨Ps, Pg_i⟩. Two maps, both pure PyTorch and seeded:

- :class:`RandomProjection` (any parameters): a subsampled randomized Fourier transform,
  Pg = √(p/k)·S·F·D·g, with D random signs, F the real orthonormal form of the FFT (Parseval:
  ‖Fx‖ = ‖x‖) and S a random choice of k of its p coordinates. It costs O(p log p) per example
  and no p × k matrix is ever stored.
- :class:`KroneckerProjection` (LoGra, Choe et al. 2024, "What is your data worth to GPT?"): for a
  Linear or Conv2d layer the per-example gradient of its weights is G = Σ_t s_t a_tᵀ (output
  gradients s, inputs a with the bias folded in as a trailing 1). With Gaussian P_out (k_out ×
  out) and P_in (k_in × in), entries N(0, 1/k), the projection P_out G P_inᵀ = Σ_t (P_out s_t)
  (P_in a_t)ᵀ is formed from the projected s and a alone, never from G. Tracked parameters outside
  such layers get a :class:`RandomProjection` of ``rest_dim`` coordinates (or stay as they are
  when there are fewer).

Both report the distortion they introduce on the data they project (see
:func:`measure_distortion`), and both apply to queries the same way as to training gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import arguments


def _real_fourier(x: Tensor) -> Tensor:
    """The real orthonormal Fourier transform of each row of x (b, p): Parseval holds."""
    p = x.shape[-1]
    f = torch.fft.rfft(x, dim=-1, norm="ortho")
    parts = [f[..., :1].real]
    last = p // 2 if p % 2 == 0 else None  # the Nyquist term of even p is real
    middle = f[..., 1:last] if last is not None else f[..., 1:]
    parts.append(math.sqrt(2.0) * torch.stack([middle.real, middle.imag], dim=-1).flatten(-2))
    if last is not None and p > 1:
        parts.append(f[..., last:last + 1].real)
    return torch.cat(parts, dim=-1)[..., :p]


@dataclass(frozen=True)
class RandomProjection:
    """Pg = √(p/k)·S·F·D·g to ``dim`` = k coordinates (module docstring).

    Args:
        dim: k, the projected dimension.
        seed: seeds the signs D and the choice S.
    """

    dim: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        arguments.positive_integer("dim", self.dim)
        arguments.seed("seed", self.seed)

    def settings(self) -> dict[str, Any]:
        return {"projection": "random", "dim": self.dim, "seed": self.seed}

    def output_dim(self, p: int) -> int:
        return min(self.dim, p)

    def _draws(self, p: int, device: torch.device) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        signs = torch.randint(0, 2, (p,), generator=generator).mul_(2).sub_(1)
        chosen = torch.randperm(p, generator=generator)[: self.output_dim(p)].sort().values
        return signs.to(device), chosen.to(device)

    def project(self, rows: Tensor) -> Tensor:
        """(b, p) → (b, k); the identity when k ≥ p."""
        p = rows.shape[-1]
        if self.dim >= p:
            return rows
        signs, chosen = self._draws(p, rows.device)
        transformed = _real_fourier(rows * signs.to(rows.dtype))
        return transformed[..., chosen] * math.sqrt(p / self.dim)


@dataclass(frozen=True)
class KroneckerProjection:
    """P_out G P_inᵀ per Linear/Conv2d layer, a random projection for the rest (module
    docstring).

    Args:
        input_dim: k_in, rows of P_in (at most the layer's inputs, bias column included).
        output_dim: k_out, rows of P_out (at most the layer's outputs).
        rest_dim: coordinates kept of the parameters outside Linear/Conv2d layers.
        seed: seeds every random matrix.
    """

    input_dim: int = 16
    output_dim: int = 16
    rest_dim: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("input_dim", "output_dim", "rest_dim"):
            arguments.positive_integer(name, getattr(self, name))
        arguments.seed("seed", self.seed)

    def settings(self) -> dict[str, Any]:
        return {"projection": "kronecker", "input_dim": self.input_dim,
                "output_dim": self.output_dim, "rest_dim": self.rest_dim, "seed": self.seed}

    def factors(self, index: int, out_features: int, in_features: int, dtype: torch.dtype,
                device: torch.device) -> tuple[Tensor, Tensor]:
        """(P_out, P_in) of the ``index``-th layer: Gaussian entries of variance 1/k, or the
        identity where k is not smaller than the size."""
        generator = torch.Generator().manual_seed(self.seed + 1 + 2 * index)

        def draw(k: int, size: int) -> Tensor:
            if k >= size:
                return torch.eye(size, dtype=torch.float64)
            return torch.randn(k, size, generator=generator, dtype=torch.float64) / math.sqrt(k)

        P_out = draw(self.output_dim, out_features)
        P_in = draw(self.input_dim, in_features)
        return P_out.to(device, dtype), P_in.to(device, dtype)

    def rest(self) -> RandomProjection:
        return RandomProjection(self.rest_dim, self.seed)


@dataclass(frozen=True)
class Distortion:
    """How a projection changed a sample of gradients: squared norms ‖Pg‖²/‖g‖² (mean and the
    largest deviation from 1), and inner products, |⟨Pg_i, Pg_j⟩ − ⟨g_i, g_j⟩| / (‖g_i‖‖g_j‖)
    (mean and largest) over the pairs of the sample."""

    sample: int
    norm_ratio_mean: float
    norm_ratio_max_deviation: float
    inner_product_error_mean: float
    inner_product_error_max: float


def gram(rows: Tensor, block: int = 1 << 20) -> Tensor:
    """rows·rowsᵀ (b, b) in float64, a block of columns at a time (no float64 copy of rows)."""
    out = torch.zeros(rows.shape[0], rows.shape[0], dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[1], block):
        part = rows[:, start : start + block].double()
        out += part @ part.T
    return out


def measure_distortion(full: Tensor, projected: Tensor) -> Distortion:
    """Distortion of ``projected`` (b, k) against ``full`` (b, p), the same rows."""
    full_gram, projected_gram = gram(full), gram(projected)
    norms = full_gram.diagonal().clamp_min(0).sqrt()
    keep = norms > 0
    full_gram = full_gram[keep][:, keep]
    projected_gram, norms = projected_gram[keep][:, keep], norms[keep]
    ratio = projected_gram.diagonal() / norms.pow(2)
    scale = norms[:, None] * norms[None, :]
    error = (projected_gram - full_gram).abs() / scale
    pairs = ~torch.eye(len(norms), dtype=torch.bool, device=error.device)
    off = error[pairs] if len(norms) > 1 else error.reshape(-1)
    return Distortion(len(norms), float(ratio.mean()), float((ratio - 1).abs().max()),
                      float(off.mean()), float(off.max()))
