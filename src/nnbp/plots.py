"""The plotting module: image grids (the lab's ``display_data``), feature grids and curves;
and for ``dvc plots``, the curves' data and a page that renders them offline.

Figures are drawn with matplotlib's Agg backend and saved atomically; PNGs carry no timestamp,
so the same inputs give the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from nnbp.io import atomic_path

History = Mapping[str, Sequence[float]]  # columns: step, loss, train_acc, test_acc
METRICS = ("loss", "train_acc", "test_acc")


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
    """Loss, training and test accuracy against iterations, one line per named run."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, h in histories.items():
        axes[0].plot(h["step"], h["loss"], label=name)
        axes[1].plot(h["step"], h["train_acc"], label=name)
        if h.get("test_acc") is not None and len(h["test_acc"]):
            axes[2].plot(h["step"], h["test_acc"], label=name)
    for ax, title in zip(axes, ("loss", "train accuracy (%)", "test accuracy (%)"), strict=True):
        ax.set_title(title)
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


def curve_rows(histories: Mapping[str, History]) -> list[dict[str, float | str | None]]:
    """Every configuration's history in one table, a row per configuration and log point, for
    ``dvc plots``: one chart per metric with a line per configuration (a directory of history
    files gives a chart per file instead, with the loss on the accuracies' 0-100 axis)."""
    rows = []
    for name, h in histories.items():
        for i, step in enumerate(h["step"]):
            rows.append({"configuration": name, "step": step, **{k: h[k][i] for k in METRICS}})
    return rows


# Vega, Vega-Lite and vega-embed as a PyPI package ships them (django-js-lib-vega-embed: the
# upstream builds, no Django needed to read them); DVC's own page fetches them from a CDN.
VEGA_PACKAGE = "js_lib_vega_embed"
VEGA_SCRIPTS = ("vega5.js", "vega-lite5.js", "vega-embed6.js")
_PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Vega, Vega-Lite and vega-embed, inlined (nnbp.plots.offline_page): no network -->
{inlined}
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def offline_page() -> str:
    """DVC's HTML page (``dvc plots show --html-template``) with the Vega scripts inlined from the
    installed package instead of DVC's CDN links, so the charts render without internet.

    DVC fills ``{plot_divs}`` and ``{refresh_tag}``; the page leaves out ``{scripts}``, where
    DVC would put its CDN ``<script>`` tags. The same package version gives the same bytes.
    """
    from importlib.resources import files

    folder = files(VEGA_PACKAGE) / "static" / VEGA_PACKAGE
    scripts = []
    for name in VEGA_SCRIPTS:
        code = (folder / name).read_text(encoding="utf-8")
        if "</script" in code.lower():  # would end the inline element early
            raise ValueError(f"{name} cannot be inlined: it contains '</script'")
        scripts.append(f"    <script>/* {name} */\n{code}\n    </script>")
    return _PAGE.replace("{inlined}", "\n".join(scripts))
