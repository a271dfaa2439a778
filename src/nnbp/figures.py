"""The figures: image grids (the lab's ``display_data``), feature grids and curves.

Figures are drawn with matplotlib's Agg backend and saved atomically; PNGs carry no timestamp,
so the same inputs give the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .artifacts import METRICS, History, TrainedModel
from .files import atomic_path

if TYPE_CHECKING:  # the run's own figures (the train stage's) need no data file
    from .labdata import Dataset

SHOWN = 100  # images per grid of section 2


def tile(
    X: np.ndarray, shape: tuple[int, int], ncols: int, *, normalise: bool = False
) -> np.ndarray:
    """Columns of ``X`` (d, n), images of ``shape`` (h, w) stored column-major as in the lab,
    laid out row by row in a grid ``ncols`` wide; gaps are NaN (drawn blank). ``normalise``
    scales each image to [0, 1] on its own, so weak and strong features both show."""
    h, w = shape
    n = X.shape[1]
    nrows = -(-n // ncols)
    big = np.full((nrows * (h + 1) - 1, ncols * (w + 1) - 1), np.nan)
    for i in range(n):
        img = X[:, i].reshape(w, h).T
        if normalise:
            lo, hi = img.min(), img.max()
            img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        r, c = divmod(i, ncols)
        big[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = img
    return big


def _image(ax: plt.Axes, big: np.ndarray, title: str) -> None:
    ax.imshow(big, cmap="Greys_r", interpolation="nearest")
    ax.set_title(title)
    ax.set_axis_off()


def image_grid(X: np.ndarray, shape: tuple[int, int], title: str, ncols: int = 10) -> Figure:
    """A figure of the images in the columns of ``X`` (the lab's section 2)."""
    fig, ax = plt.subplots(figsize=(6, 6))
    _image(ax, tile(X, shape, ncols), title)
    return fig


def feature_grids(W1s: Mapping[str, np.ndarray], shape: tuple[int, int]) -> Figure:
    """First-layer features, one panel per named ``W^1`` (hidden x (d + 1)), side by side.

    Each hidden unit's incoming weights (bias dropped) are drawn as an image (the lab's section 7).
    """
    fig, axes = plt.subplots(1, len(W1s), figsize=(5.5 * len(W1s), 6), squeeze=False)
    for ax, (name, W1) in zip(axes[0], W1s.items(), strict=True):
        features = W1[:, 1:].T
        ncols = int(np.ceil(np.sqrt(features.shape[1])))
        _image(ax, tile(features, shape, ncols, normalise=True), f"Learned features: {name}")
    fig.tight_layout()
    return fig


def curves(histories: Mapping[str, History]) -> Figure:
    """Every metric against iterations, a panel each, one line per named run."""
    fig, axes = plt.subplots(1, len(METRICS), figsize=(15, 4))
    for name, history in histories.items():
        h = history.columns()
        for ax, metric in zip(axes, METRICS, strict=True):
            if any(v is not None for v in h[metric]):  # no test set, no test accuracy
                ax.plot(h["step"], h[metric], label=name)
    for ax, metric in zip(axes, METRICS, strict=True):
        ax.set_title(METRICS[metric]["title"])
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def save(fig: Figure, path: str | Path) -> None:
    """Save ``fig`` as PNG, atomically, without a timestamp or version in its metadata."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def lab_figures(
    ds: Dataset,
    shape: tuple[int, int],
    models: Mapping[str, TrainedModel],
    histories: Mapping[str, History],
    seed: int,
) -> dict[str, Figure]:
    """The lab's figures by file name: ``train_images.png`` and ``test_images.png`` (100 images
    each, picked with ``seed``; section 2), ``features.png`` (every model's first-layer
    features side by side; section 7) and ``curves.png`` (every history on one chart)."""
    rng = np.random.default_rng(seed)
    figures = {}
    for split, X in (("train", ds.X_train), ("test", ds.X_test)):
        shown = rng.choice(X.shape[1], size=min(SHOWN, X.shape[1]), replace=False)
        figures[f"{split}_images.png"] = image_grid(
            X[:, shown], shape, f"{split.capitalize()} data"
        )
    figures["features.png"] = feature_grids({n: m.weights[0] for n, m in models.items()}, shape)
    figures["curves.png"] = curves(histories)
    return figures


def run_figures(
    name: str, model: TrainedModel, history: History, shape: tuple[int, int]
) -> dict[str, Figure]:
    """One training run's ``features.png`` and ``curves.png``."""
    return {
        "features.png": feature_grids({name: model.weights[0]}, shape),
        "curves.png": curves({name: history}),
    }
