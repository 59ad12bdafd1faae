"""Figures in the style of Koh & Liang (2017): influential training images, predicted vs actual.

Figures are plain :class:`matplotlib.figure.Figure` objects rendered straight to PNG bytes: no
pyplot, no backend, nothing registered globally, so drawing here never changes the backend or
the open figures of a notebook or application that uses the library.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..io import atomic_write_bytes


def new_figure(rows: int = 1, columns: int = 1, figsize: tuple[float, float] | None = None,
               **subplots: Any) -> tuple[Figure, np.ndarray]:
    """A figure with a ``rows`` × ``columns`` grid of axes, ``(rows, columns)`` (never squeezed).

    ``figsize`` in inches (``None``: matplotlib's default); ``subplots``: further keywords of
    :meth:`~matplotlib.figure.Figure.subplots` (e.g. ``gridspec_kw``).
    """
    figure = Figure(figsize=figsize)
    axes = figure.subplots(rows, columns, squeeze=False, **subplots)
    return figure, axes


def save_figure(figure: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Render ``figure`` to PNG and write it atomically (no pyplot: nothing to close)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def influential_images(test_image: np.ndarray, test_caption: str,
                       rows: Sequence[tuple[str, np.ndarray, Sequence[str]]],
                       path: str | Path) -> Path:
    """The test image, then one row of training images per group (e.g. helpful, harmful).

    Args:
        test_image: ``(H, W)`` grey image.
        test_caption: text under the test image.
        rows: ``(title, images (k, H, W), captions)`` per row.
    """
    columns = max(len(images) for _, images, _ in rows)
    figure, axes = new_figure(len(rows) + 1, columns,
                              figsize=(1.6 * columns, 1.9 * (len(rows) + 1)))
    for axis in axes.ravel():
        axis.axis("off")
    axes[0, 0].imshow(test_image, cmap="gray_r")
    axes[0, 0].set_title("test image", fontsize=9)
    axes[0, 0].text(0.5, -0.12, test_caption, transform=axes[0, 0].transAxes, ha="center",
                    va="top", fontsize=8)
    for r, (title, images, captions) in enumerate(rows, start=1):
        for c, (image, caption) in enumerate(zip(images, captions, strict=True)):
            axes[r, c].imshow(image, cmap="gray_r")
            axes[r, c].text(0.5, -0.12, caption, transform=axes[r, c].transAxes, ha="center",
                            va="top", fontsize=7)
        axes[r, 0].set_title(title, fontsize=9, loc="left")
    figure.tight_layout()
    return save_figure(figure, path)


def draw_predicted_vs_actual(axis: Axes, predicted: np.ndarray, actual: np.ndarray,
                             title: str, pearson: float, spearman: float | None = None) -> None:
    """One Fig. 2-style panel: x = actual change after retraining, y = predicted −I_up,loss/n."""
    predicted = np.asarray(predicted, dtype=float).ravel()
    actual = np.asarray(actual, dtype=float).ravel()
    low = float(min(predicted.min(), actual.min()))
    high = float(max(predicted.max(), actual.max()))
    pad = 0.05 * (high - low or 1.0)
    axis.plot([low - pad, high + pad], [low - pad, high + pad], color="0.6", lw=1, zorder=0)
    axis.scatter(actual, predicted, s=14, color="#1f77b4", alpha=0.85, edgecolors="none")
    axis.set_xlim(low - pad, high + pad)
    axis.set_ylim(low - pad, high + pad)
    axis.set_xlabel("Actual diff in loss")
    axis.set_ylabel("Predicted diff in loss  (−I_up,loss / n)")
    label = f"Pearson R = {pearson:.4f}"
    if spearman is not None:
        label += f"\nSpearman R = {spearman:.4f}"
    axis.text(0.04, 0.96, label, transform=axis.transAxes, va="top", fontsize=9)
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.25)


def predicted_vs_actual(predicted: np.ndarray, actual: np.ndarray, path: str | Path,
                        title: str, pearson: float, spearman: float | None = None) -> Path:
    """A single predicted-vs-actual panel saved as PNG (see :func:`draw_predicted_vs_actual`)."""
    figure, axes = new_figure(figsize=(4.2, 4.0))
    draw_predicted_vs_actual(axes[0, 0], predicted, actual, title, pearson, spearman)
    figure.tight_layout()
    return save_figure(figure, path)


def predicted_vs_actual_panels(panels: Sequence[tuple[np.ndarray, np.ndarray, str, float]],
                               path: str | Path) -> Path:
    """Several panels side by side, each ``(predicted, actual, title, pearson)``."""
    figure, axes = new_figure(1, len(panels), figsize=(4.2 * len(panels), 4.0))
    for axis, (predicted, actual, title, pearson) in zip(axes[0], panels, strict=True):
        draw_predicted_vs_actual(axis, predicted, actual, title, pearson)
    figure.tight_layout()
    return save_figure(figure, path)
