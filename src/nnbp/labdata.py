"""The lab's data: the layout of its ``nn_train_test_sets.npz`` (or Coursera's ``ex4data1.mat``),
read through the safe reader (``nnbp.archive``) and checked, then z-scored as its section 3 does.

Every problem with a file is a ``DataError`` whose message is one line naming the file. An
archive whose arrays do not fit together, or cannot fit in memory with what ``prepare`` makes of
them, is refused on its headers, before a byte of data is inflated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .archive import ArrayHeader, check_memory, mat_headers, npz_headers, read_mat, read_npz
from .errors import DataError

LAB_KEYS = ("X_train", "y_train", "X_test", "y_test")
ZSCORE_MODES = ("per_example", "per_feature")
MAT_KEYS = ("X", "y")


@dataclass(frozen=True)
class Dataset:
    """The lab's layout: ``X_*`` are (d, n) features x examples, ``y_*`` are (n,) labels 1..K."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def split(n: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded shuffle of ``n`` examples: the first ``n_train``, and the rest."""
    order = np.random.default_rng(seed).permutation(n)
    return order[:n_train], order[n_train:]


def _features(path: Path, name: str, X: np.ndarray) -> np.ndarray:
    if X.dtype == object or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise DataError(f"{path}: {name} must be numeric, got dtype {X.dtype}")
    if X.ndim != 2:
        raise DataError(f"{path}: {name} must be 2-D (features x examples), got shape {X.shape}")
    if X.size == 0:
        raise DataError(f"{path}: {name} is empty (shape {X.shape})")
    if np.iscomplexobj(X):
        raise DataError(f"{path}: {name} must be real, got dtype {X.dtype}")
    X = X.astype(np.float64)
    if not np.isfinite(X).all():
        bad = int(np.count_nonzero(~np.isfinite(X)))
        raise DataError(f"{path}: {name} has {bad} NaN or infinite value(s)")
    return X


def _labels(path: Path, name: str, y: np.ndarray, n: int, classes: int) -> np.ndarray:
    if y.dtype == object or not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise DataError(f"{path}: {name} must be numeric, got dtype {y.dtype}")
    _check_label_shape(path, name, y.shape, n)
    if np.iscomplexobj(y):
        raise DataError(f"{path}: {name} must be real, got dtype {y.dtype}")
    y = y.reshape(-1)
    if not np.isfinite(y).all():
        bad = int(np.count_nonzero(~np.isfinite(y)))
        raise DataError(f"{path}: {name} has {bad} NaN or infinite value(s)")
    if not np.array_equal(y, np.round(y)):
        raise DataError(f"{path}: {name} must hold whole numbers (class labels 1..{classes})")
    if y.min() < 1 or y.max() > classes:
        raise DataError(
            f"{path}: {name} has labels {int(y.min())}..{int(y.max())}, expected 1..{classes}"
        )
    return y.astype(np.int64)


def _check_label_shape(path: Path, name: str, shape: tuple[int, ...], n: int) -> None:
    if len(shape) > 2 or (len(shape) == 2 and 1 not in shape):
        raise DataError(f"{path}: {name} must be a vector (n,) or (n, 1), got shape {shape}")
    if math.prod(shape) != n:
        raise DataError(f"{path}: {name} has {math.prod(shape)} labels for {n} examples")


def _check_features_shape(path: Path, name: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise DataError(f"{path}: {name} must be 2-D (features x examples), got shape {shape}")


def _check_same_features(path: Path, d_train: int, d_test: int) -> None:
    if d_train != d_test:
        raise DataError(f"{path}: X_train has {d_train} features but X_test has {d_test}")


def _check_headers(path: Path, headers: dict[str, ArrayHeader]) -> None:
    """The checks of ``_features`` and ``_labels`` that need only the shapes, made on the
    headers (same messages): a file whose arrays do not fit together is refused unread."""
    if "X" in headers:  # a .mat: X (N, d) examples x features, y (N, 1)
        _check_features_shape(path, "X", headers["X"].shape)
        _check_label_shape(path, "y", headers["y"].shape, headers["X"].shape[0])
    else:
        for name in ("X_train", "X_test"):
            _check_features_shape(path, name, headers[name].shape)
        for name, X in (("y_train", "X_train"), ("y_test", "X_test")):
            _check_label_shape(path, name, headers[name].shape, headers[X].shape[1])
        _check_same_features(path, headers["X_train"].shape[0], headers["X_test"].shape[0])
    # Besides the arrays: a float64 copy of the features, then their z-scored values.
    features = sum(math.prod(headers[k].shape) for k in ("X", "X_train", "X_test") if k in headers)
    check_memory(path, headers, extra=2 * 8 * features)


def load_dataset(
    path: str | Path, *, classes: int = 10, n_train: int = 1000, split_seed: int = 0
) -> Dataset:
    """Read and validate a data set in the lab's layout.

    ``.npz``: arrays ``X_train`` (d, n), ``y_train`` (n, 1), ``X_test`` (d, m), ``y_test`` (m, 1),
    the lab's ``nn_train_test_sets.npz``. ``.mat``: Coursera's ``ex4data1.mat``, ``X`` (N, d)
    examples x features and ``y`` (N, 1); it is shuffled with ``split_seed`` and its first
    ``n_train`` examples train, the rest test (5,000 -> 1,000 / 4,000 as in the lab).
    Labels are 1..``classes`` in files (10 stands for the digit 0, as in the lab).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".mat"):
        raise DataError(f"{path}: not an .npz or .mat file (expected one of those suffixes)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if suffix == ".npz":
        _check_headers(path, npz_headers(path, LAB_KEYS))  # before a byte of data is inflated
        arrays = read_npz(path, LAB_KEYS)
        X_train = _features(path, "X_train", arrays["X_train"])
        X_test = _features(path, "X_test", arrays["X_test"])
        y_train = _labels(path, "y_train", arrays["y_train"], X_train.shape[1], classes)
        y_test = _labels(path, "y_test", arrays["y_test"], X_test.shape[1], classes)
    else:
        headers = mat_headers(path, MAT_KEYS)
        _check_headers(path, {k: headers[k] for k in MAT_KEYS})
        arrays = read_mat(path, MAT_KEYS)
        X = _features(path, "X", np.asarray(arrays["X"])).T  # examples x features -> (d, N)
        y = _labels(path, "y", np.asarray(arrays["y"]), X.shape[1], classes)
        if not 1 <= n_train < X.shape[1]:
            raise DataError(
                f"{path}: cannot split {X.shape[1]} examples into {n_train} for training "
                "and at least one for testing (data.n_train)"
            )
        train, test = split(X.shape[1], n_train, split_seed)
        X_train, y_train, X_test, y_test = X[:, train], y[train], X[:, test], y[test]
    _check_same_features(path, X_train.shape[0], X_test.shape[0])
    return Dataset(X_train, y_train, X_test, y_test)


def one_hot(y: np.ndarray, K: int) -> np.ndarray:
    """Class indices ``y`` in ``0..K-1``, shape ``(n,)`` or ``(n, 1)`` -> one-hot ``(K, n)`` floats.

    Classes absent from ``y`` give all-zero rows; any index outside ``0..K-1`` is a ValueError.
    """
    y = np.asarray(y).reshape(-1)
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"class indices must be integers, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= K):
        raise ValueError(f"class indices must lie in 0..{K - 1}, got {y.min()}..{y.max()}")
    Y = np.zeros((K, y.size))
    Y[y, np.arange(y.size)] = 1.0
    return Y


def zscore(
    X: np.ndarray,
    mode: Literal["per_example", "per_feature"] = "per_example",
    *,
    reference: np.ndarray | None = None,
) -> np.ndarray:
    """Standardise ``X`` of shape ``(d, n)``; returns a new float64 ``(d, n)`` array.

    ``per_example`` is the lab's section 3: each column (image) by its own mean and std.
    ``per_feature`` standardises each row (pixel) with the mean and std of ``reference``
    (the training set; ``X`` itself when omitted), so the test set reuses training statistics.
    A zero std (constant image, constant pixel, a single example) divides by 1 instead of 0:
    the values are only centred, so a constant image or feature becomes all zeros, never NaN.
    """
    if mode not in ZSCORE_MODES:
        raise ValueError(f"zscore mode must be one of {ZSCORE_MODES}, got {mode!r}")
    X = np.asarray(X, dtype=np.float64)
    axis = 0 if mode == "per_example" else 1
    ref = X if reference is None or mode == "per_example" else np.asarray(reference, np.float64)
    mean = ref.mean(axis=axis, keepdims=True)
    std = ref.std(axis=axis, keepdims=True)
    # A constant row or column can have a mean off by an ulp and a std of 1e-16 instead of 0.
    constant = np.ptp(ref, axis=axis, keepdims=True) == 0
    mean = np.where(constant, ref.take([0], axis=axis), mean)
    std[constant | (std == 0)] = 1.0
    return (X - mean) / std


def standardise(ds: Dataset, mode: str, *, source: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The z-scored ``(X_train, X_test)`` of ``ds`` (``backprop.zscore``; the test set with the
    training statistics in ``per_feature`` mode), checked to be finite.

    Finite data can still overflow: a mean or a variance beyond the float64 range, or a tiny
    training spread that blows a test value up. That is a ``DataError`` naming ``source``.
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # checked below
        X_train = zscore(ds.X_train, mode)
        X_test = zscore(ds.X_test, mode, reference=ds.X_train)
    for name, X in (("X_train", X_train), ("X_test", X_test)):
        if not np.isfinite(X).all():
            raise DataError(
                f"{source}: {name} cannot be z-scored ({mode}): its values overflow float64; "
                "rescale the data"
            )
    return X_train, X_test


def image_shape(
    d: int, given: tuple[int, int] | None = None, *, source: str | Path = "data"
) -> tuple[int, int]:
    """The (height, width) of the images whose ``d`` pixels are stored column-major: ``given``
    (``data.image_shape``), or square images when it is None (``auto``)."""
    if d < 1:
        raise DataError(f"{source}: no features, so no image")
    if given is None:
        side = math.isqrt(d)
        if side * side != d:
            raise DataError(
                f"{source}: {d} features is not a square image; set data.image_shape to HxW"
            )
        return side, side
    h, w = given
    if h * w != d:
        raise DataError(f"data.image_shape: {h}x{w} does not hold the {d} features of {source}")
    return h, w
