"""Generated data: seeded jittered copies of images (random affine/elastic warps and pixel noise).

Used where an experiment needs more training points than a bundled set has (e.g. Fig. 3 on
scikit-learn's digits, whose 1s and 7s number 252 where MNIST has ~13,000). Only the images
given are copied, so augmenting a training split never touches its test split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates


@dataclass(frozen=True)
class Jitter:
    """How far each copy is warped and perturbed (every draw is uniform in ±the value).

    A copy samples the source at u = c + A(p − c) + d + e(p), for output pixel p and image centre
    c, and adds noise: x'(p) = clip(bilinear(x, u) + σ·ε(p), lo, hi) with ε ~ N(0, 1). Here
    A = R(φ)·[[1 + s₁, h], [0, 1 + s₂]] with φ ~ U(±``rotation`` degrees), s₁, s₂ ~ U(±``scale``),
    h ~ U(±``shear``); d ~ U(±``shift``)² pixels (sub-pixel: bilinear interpolation); e is an
    elastic field (Simard et al. 2003): uniform noise in ±1 per pixel and axis, smoothed by a
    Gaussian of width ``elastic_sigma`` and scaled to a largest displacement of ``elastic``
    pixels (0 turns it off). Pixels sampled from outside the image read as ``lo``.

    Attributes:
        shift: largest translation per axis, pixels.
        rotation: largest rotation, degrees.
        scale: largest relative change of size per axis.
        shear: largest shear coefficient.
        elastic: largest elastic displacement, pixels.
        elastic_sigma: smoothing width of the elastic field, pixels.
        noise: σ of the additive Gaussian pixel noise.
        clip: ``(lo, hi)`` range of the pixels.
    """

    shift: float = 0.5
    rotation: float = 5.0
    scale: float = 0.05
    shear: float = 0.05
    elastic: float = 0.0
    elastic_sigma: float = 1.5
    noise: float = 0.02
    clip: tuple[float, float] = (0.0, 1.0)

    def describe(self) -> str:
        """One line for reports: "random shifts ≤ 0.5 px (bilinear), rotations ≤ 5°, …"."""
        parts = [f"random shifts ≤ {self.shift:g} px (bilinear)",
                 f"rotations ≤ {self.rotation:g}°", f"scaling ≤ {100 * self.scale:g}%",
                 f"shear ≤ {self.shear:g}"]
        if self.elastic > 0:
            parts.append(f"elastic warps ≤ {self.elastic:g} px (σ = {self.elastic_sigma:g})")
        parts.append(f"Gaussian pixel noise σ = {self.noise:g}, "
                     f"clipped to [{self.clip[0]:g}, {self.clip[1]:g}]")
        return ", ".join(parts)


def jitter_images(images: np.ndarray, copies: int, shape: tuple[int, int] | None = None,
                  jitter: Jitter | None = None, seed: int = 0,
                  keep_originals: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Seeded jittered copies of ``images``, ``copies`` per image (see :class:`Jitter`).

    Args:
        images: ``(n, h, w)``, or flat ``(n, h·w)`` with ``shape = (h, w)`` (square if omitted).
        copies: K ≥ 1, rows per source image in the result. With ``keep_originals`` the first is
            the untouched image and K − 1 are jittered; otherwise all K are jittered.
        jitter: the warp and noise sizes; ``Jitter()`` by default.
        seed: the same seed gives the same copies.
        keep_originals: whether each source image appears itself among its K rows.

    Returns:
        ``(augmented, source)``: ``augmented`` is ``(n·K, …)`` in the input's layout and dtype
        float64, rows grouped by source image (image i's K rows at i·K, …, i·K + K − 1);
        ``source`` ``(n·K,)`` int64 gives each row's source index, so labels follow as
        ``labels[source]``.
    """
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    jitter = jitter or Jitter()
    flat = images.ndim == 2
    if flat:
        if shape is None:
            side = round(images.shape[1] ** 0.5)
            if side * side != images.shape[1]:
                raise ValueError(f"rows of length {images.shape[1]} are not square images; "
                                 "pass shape=(h, w)")
            shape = (side, side)
        stack = images.reshape(-1, *shape).astype(np.float64)
    elif images.ndim == 3:
        stack = images.astype(np.float64)
    else:
        raise ValueError(f"images must be (n, h, w) or (n, h·w), got shape {images.shape}")
    n, h, w = stack.shape
    source = np.repeat(np.arange(n), copies)
    m = len(source)
    rng = np.random.default_rng(seed)
    warped = np.repeat(stack, copies, axis=0)
    moved = np.ones(m, bool)
    if keep_originals:
        moved[::copies] = False
    k = int(moved.sum())
    if k:
        phi = np.deg2rad(rng.uniform(-jitter.rotation, jitter.rotation, k))
        s1, s2 = (1.0 + rng.uniform(-jitter.scale, jitter.scale, (2, k)))
        shear = rng.uniform(-jitter.shear, jitter.shear, k)
        shift = rng.uniform(-jitter.shift, jitter.shift, (k, 2))
        cos, sin = np.cos(phi), np.sin(phi)
        # A = R(φ) · [[s1, shear], [0, s2]], acting on (row, col) offsets from the centre.
        A = np.stack([np.stack([cos * s1, cos * shear - sin * s2], -1),
                      np.stack([sin * s1, sin * shear + cos * s2], -1)], -2)  # (k, 2, 2)
        rows, cols = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float),
                                 indexing="ij")
        centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
        offsets = np.stack([rows, cols], -1) - centre                          # (h, w, 2)
        coords = np.einsum("kab,hwb->khwa", A, offsets) + centre + shift[:, None, None, :]
        if jitter.elastic > 0:
            field = gaussian_filter(rng.uniform(-1.0, 1.0, (k, h, w, 2)),
                                    sigma=(0, jitter.elastic_sigma, jitter.elastic_sigma, 0))
            largest = np.abs(field).max(axis=(1, 2, 3), keepdims=True)
            coords = coords + jitter.elastic * field / np.maximum(largest, 1e-12)
        batch = np.broadcast_to(source[moved][:, None, None], (k, h, w)).astype(float)
        sampled = map_coordinates(stack,
                                  [batch, coords[..., 0], coords[..., 1]],
                                  order=1, mode="constant", cval=jitter.clip[0])
        noise = jitter.noise * rng.standard_normal((k, h, w))
        warped[moved] = np.clip(sampled + noise, *jitter.clip)
    out = warped.reshape(m, h * w) if flat else warped
    return out, source.astype(np.int64)
