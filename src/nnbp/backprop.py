"""Full-batch backpropagation for a sigmoid network, as in TP 5 (section 4.4).

Conventions are the lab's:

* ``X`` is features x examples, shape ``(d, n)``; a one-hot target ``Y`` is ``(K, n)``.
* Layer sizes are ``sizes = [n_1, ..., n_L]`` with ``n_1 = d`` and ``n_L = K``.
* ``W^l`` (``weights[l - 1]``) has shape ``(n_{l+1}, n_l + 1)``; column 0 is the bias,
  so ``y^{l+1} = sigma(W^l [1; y^l])``.
* Class indices are ``0..K-1`` here (files store ``1..K``).

Everything here is pure: no I/O, no logging, no global state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import numpy as np

EPS = 1e-10  # the lab's guard inside log()
GRADIENT_RULES = ("lab", "exact")  # the lab's loop as written, and plain gradient descent
DTYPES = ("float64", "float32")
ZSCORE_MODES = ("per_example", "per_feature")

Weights = list[np.ndarray]


def sigmoid(z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``1 / (1 + exp(-z))`` elementwise, written into ``out`` when given (it may be ``z``).

    Within about 2 ulp of the true value over the normal range, like ``scipy.special.expit``.
    Where ``exp(-z)`` overflows (z < -709 in float64) the result is 0 (the true value is below
    1e-308), so that overflow is expected and silenced here, not globally. NumPy's vectorised
    ``exp`` makes this 3x faster than ``expit`` on a (100, 1000) array.
    """
    with np.errstate(over="ignore"):
        out = np.negative(z, out=out)
        np.exp(out, out=out)
    out += 1
    return np.reciprocal(out, out=out)


class DivergenceError(ArithmeticError):
    """Training produced a non-finite value; ``iteration`` is the number of updates done."""

    def __init__(self, iteration: int) -> None:
        super().__init__(f"non-finite loss after {iteration} iterations")
        self.iteration = iteration


@dataclass(frozen=True)
class LogPoint:
    """Progress after ``iteration`` updates: the cost, and accuracies in percent."""

    iteration: int
    loss: float
    train_acc: float
    test_acc: float | None


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


def init_weights(sizes: Sequence[int], rng: np.random.Generator, dtype: str = "float64") -> Weights:
    """The lab's rule ``W^l ~ U[-2/sqrt(n_l), 2/sqrt(n_l)]``, shape ``(n_{l+1}, n_l + 1)``."""
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must list at least two layer sizes >= 1, got {list(sizes)}")
    weights = []
    for n_l, n_next in pairwise(sizes):
        a = 2 / np.sqrt(n_l)
        weights.append(rng.uniform(-a, a, (n_next, n_l + 1)).astype(dtype))
    return weights


def _augmented(weights: Weights, X: np.ndarray) -> list[np.ndarray]:
    """Buffers ``[1; y^l]`` of shape ``(n_l + 1, n)`` for every layer but the output one."""
    A = [np.empty((W.shape[1], X.shape[1]), X.dtype) for W in weights]
    for a in A:
        a[0] = 1.0
    A[0][1:] = X
    return A


def _forward_into(weights: Weights, A: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    """Fill ``A[1:]`` and ``out`` (the output layer, ``(K, n)``) from ``A[0]``, in place."""
    for l, W in enumerate(weights):
        z = A[l + 1][1:] if l + 1 < len(A) else out
        np.matmul(W, A[l], out=z)
        sigmoid(z, out=z)
    return out


def forward(weights: Weights, X: np.ndarray) -> list[np.ndarray]:
    """Activations ``[y^1 = X, y^2, ..., y^L]``, each ``(n_l, n)``."""
    X = np.asarray(X, dtype=weights[0].dtype)
    A = _augmented(weights, X)
    out = _forward_into(weights, A, np.empty((weights[-1].shape[0], X.shape[1]), X.dtype))
    return [a[1:] for a in A] + [out]


def predict(weights: Weights, X: np.ndarray) -> np.ndarray:
    """Predicted class indices ``0..K-1``, shape ``(n,)``."""
    return np.argmax(forward(weights, X)[-1], axis=0)


def accuracy(y_pred: np.ndarray, y_true: np.ndarray) -> float:
    """Percentage of equal entries of two ``(n,)`` label arrays."""
    y_pred, y_true = np.ravel(y_pred), np.ravel(y_true)
    return 100.0 * float(np.count_nonzero(y_pred == y_true)) / y_true.size


def _cost(Y_L: np.ndarray, Y: np.ndarray, weights: Weights, lamb: float) -> float:
    n = Y.shape[1]
    cross_entropy = -(np.sum(Y * np.log(Y_L + EPS)) + np.sum((1 - Y) * np.log(1 - Y_L + EPS))) / n
    return float(cross_entropy + lamb * sum(np.sum(W * W) for W in weights))


def loss(weights: Weights, X: np.ndarray, Y: np.ndarray, lamb: float = 0.0) -> float:
    """The lab's cost: mean over examples of the binary cross-entropy summed over the K outputs
    (with its ``1e-10`` guard) plus ``lamb`` times the sum of all squared weights, biases included.
    ``X`` is ``(d, n)``, ``Y`` one-hot ``(K, n)``."""
    return _cost(forward(weights, X)[-1], Y, weights, lamb)


def _layer_gradient(
    grad: np.ndarray, delta: np.ndarray, a: np.ndarray, W: np.ndarray, lamb: float
) -> None:
    """nabla_{W^l} = delta^{l+1} [1; y^l]^T / n + 2 lamb W^l, written into ``grad``."""
    np.matmul(delta, a.T, out=grad)
    grad *= 1 / delta.shape[1]
    if lamb:
        grad += 2 * lamb * W


def _hidden_delta(W: np.ndarray, delta: np.ndarray, s: np.ndarray) -> np.ndarray:
    """delta^l = (W^l without its bias column)^T delta^{l+1} * s (1 - s), with s = y^l for
    sigma'(z) = y (1 - y)."""
    delta = W[:, 1:].T @ delta
    delta *= s
    delta *= 1 - s
    return delta


def _exact_gradients(
    weights: Weights, A: list[np.ndarray], Y_L: np.ndarray, Y: np.ndarray, lamb: float, G: Weights
) -> Weights:
    """Fill ``G`` with every nabla_{W^l}, all taken from the weights as they are."""
    delta = Y_L - Y  # delta^L for sigmoid outputs and cross-entropy
    for l in reversed(range(len(weights))):
        _layer_gradient(G[l], delta, A[l], weights[l], lamb)
        if l:
            delta = _hidden_delta(weights[l], delta, A[l][1:])
    return G


def _lab_step(
    weights: Weights,
    A: list[np.ndarray],
    Y_L: np.ndarray,
    Y: np.ndarray,
    lamb: float,
    tau: float,
    G: Weights,
) -> None:
    """One iteration of the lab's loop, in place: W^l is updated before delta^l is computed
    from it, and sigma' is applied to the activation y^l itself (``sigmoid(y)`` for ``y``)."""
    delta = Y_L - Y
    for l in reversed(range(len(weights))):
        _layer_gradient(G[l], delta, A[l], weights[l], lamb)
        weights[l] -= tau * G[l]
        if l:
            delta = _hidden_delta(weights[l], delta, sigmoid(A[l][1:]))


def gradients(weights: Weights, X: np.ndarray, Y: np.ndarray, lamb: float = 0.0) -> Weights:
    """nabla_{W^l} of ``loss(weights, X, Y, lamb)``, same shapes as ``weights``.

    Exact for the cross-entropy; the ``1e-10`` guard inside ``loss`` moves the true derivative by
    a relative ``1e-10 / min(y, 1 - y)`` at most, far below what a finite difference resolves.
    """
    X = np.asarray(X, dtype=weights[0].dtype)
    A = _augmented(weights, X)
    Y_L = _forward_into(weights, A, np.empty((weights[-1].shape[0], X.shape[1]), X.dtype))
    return _exact_gradients(weights, A, Y_L, Y, lamb, [np.empty_like(W) for W in weights])


def fit(
    X: np.ndarray,
    Y: np.ndarray,
    weights: Weights,
    *,
    tau: float,
    lamb: float = 0.0,
    iters: int,
    gradient: Literal["lab", "exact"] = "lab",
    dtype: str = "float64",
    log_every: int = 0,
    X_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    callback: Callable[[LogPoint], None] | None = None,
) -> Weights:
    """Train by full-batch gradient descent; returns new weights (``dtype``), same layout.

    ``X`` is ``(d, n)``, ``Y`` one-hot ``(K, n)``; ``weights`` are not modified.
    ``gradient="exact"`` is plain gradient descent on ``loss``: every nabla_{W^l} is taken from the
    weights before any of them changes. ``gradient="lab"`` is the lab's loop as written: W^l is
    updated before delta^l is computed from it, and sigma' is applied to the activation y^l itself.
    Every ``log_every`` updates (and after the last), ``callback`` gets a ``LogPoint`` with the
    loss, training accuracy and, given ``X_test`` ``(d, m)`` and ``y_test`` ``(m,)``, test
    accuracy. A non-finite output or loss raises ``DivergenceError`` as soon as it is seen.
    """
    if gradient not in GRADIENT_RULES:
        raise ValueError(f"gradient must be one of {GRADIENT_RULES}, got {gradient!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    weights = [np.array(W, dtype=dtype) for W in weights]
    X = np.asarray(X, dtype=dtype)
    Y = np.asarray(Y, dtype=dtype)
    y_train = np.argmax(Y, axis=0)
    A = _augmented(weights, X)
    Y_L = np.empty((weights[-1].shape[0], X.shape[1]), dtype)
    G = [np.empty_like(W) for W in weights]

    # A diverging run overflows before it is caught below: that is reported, not warned about.
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(iters + 1):
            _forward_into(weights, A, Y_L)
            # The guarded cross-entropy is finite exactly when the outputs are, and an infinite
            # weight turns the outputs into NaN one update later: this check is 30x cheaper than
            # computing the cost at every iteration.
            if not np.isfinite(Y_L).all():
                raise DivergenceError(t)
            if callback is not None and log_every and (t % log_every == 0 or t == iters):
                cost = _cost(Y_L, Y, weights, lamb)
                if not np.isfinite(cost):
                    raise DivergenceError(t)
                test_acc = None
                if X_test is not None and y_test is not None:
                    test_acc = accuracy(predict(weights, X_test), y_test)
                train_acc = accuracy(np.argmax(Y_L, axis=0), y_train)
                callback(LogPoint(t, cost, train_acc, test_acc))
            if t == iters:
                break
            if gradient == "lab":
                _lab_step(weights, A, Y_L, Y, lamb, tau, G)
            else:
                _exact_gradients(weights, A, Y_L, Y, lamb, G)
                for W, grad in zip(weights, G, strict=True):
                    W -= tau * grad
    return weights
