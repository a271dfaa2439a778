"""Full-batch backpropagation for a sigmoid network, as in TP 5 (section 4.4).

Conventions are the lab's:

* ``X`` is features x examples, shape ``(d, n)``; a one-hot target ``Y`` is ``(K, n)``.
* Layer sizes are ``sizes = [n_1, ..., n_L]`` with ``n_1 = d`` and ``n_L = K``.
* ``W^l`` (``weights[l - 1]``) has shape ``(n_{l+1}, n_l + 1)``; column 0 is the bias,
  so ``y^{l+1} = sigma(W^l [1; y^l])``.
* Class indices are ``0..K-1`` here (files store ``1..K``).

Everything here is pure: no I/O, no logging, no global state.

Training and evaluation run block by block: the ``n`` examples are split into ``blocks``
contiguous column blocks, each phase of an iteration (the forward pass, the output layer's
gradient, each hidden layer's) runs once per block, possibly on several threads at once
(``map_blocks``, see ``nnbp.parallel``), and the blocks' parts of a gradient, of the cost or of
an accuracy are summed in block order. So the result depends on ``blocks`` and on nothing else:
not on how many threads ran the blocks, nor in which order they finished.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

import numpy as np

EPS = 1e-10  # the lab's guard inside log()
GRADIENT_RULES = ("lab", "exact")  # the lab's loop as written, and plain gradient descent
DTYPES = ("float64", "float32")

Weights = list[np.ndarray]
MapBlocks = Callable[[Callable[[int], object], int], None]  # calls fn(0), ..., fn(count - 1)


def in_order(fn: Callable[[int], object], count: int) -> None:
    """The blocks one after the other, in the caller's thread."""
    for i in range(count):
        fn(i)


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
    """Activations ``[y^1 = X, y^2, ..., y^L]``, each ``(n_l, n)`` (in one block)."""
    X = np.asarray(X, dtype=weights[0].dtype)
    A = _augmented(weights, X)
    out = _forward_into(weights, A, np.empty((weights[-1].shape[0], X.shape[1]), X.dtype))
    return [a[1:] for a in A] + [out]


def accuracy(y_pred: np.ndarray, y_true: np.ndarray) -> float:
    """Percentage of equal entries of two ``(n,)`` label arrays."""
    y_pred, y_true = np.ravel(y_pred), np.ravel(y_true)
    return 100.0 * float(np.count_nonzero(y_pred == y_true)) / y_true.size


def block_bounds(n: int, blocks: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` columns of ``blocks`` contiguous blocks of ``n`` examples, sizes
    differing by one at most (larger first); fewer blocks when ``n < blocks``."""
    count = max(1, min(blocks, n))
    q, r = divmod(n, count)
    stops = np.cumsum([q + 1] * r + [q] * (count - r))
    return [(int(a), int(b)) for a, b in zip([0, *stops[:-1]], stops, strict=True)]


class _Block:
    """One block of examples and its buffers: ``A`` the layers' ``[1; y^l]``, ``out`` the
    output layer, ``G`` its part of every nabla (summed over its examples, not yet scaled)."""

    def __init__(
        self, weights: Weights, X: np.ndarray, Y: np.ndarray | None, y: np.ndarray | None
    ) -> None:
        self.A = _augmented(weights, X)
        self.out = np.empty((weights[-1].shape[0], X.shape[1]), X.dtype)
        self.Y, self.y = Y, y
        self.G = [np.empty_like(W) for W in weights]
        self.delta: np.ndarray | None = None
        self.finite = True
        self.cost: tuple[Any, Any] = (0.0, 0.0)
        self.correct = 0

    def forward(self, weights: Weights, scores: bool) -> None:
        """The outputs; with ``scores``, this block's cross-entropy terms and correct answers."""
        out = _forward_into(weights, self.A, self.out)
        # The guarded cross-entropy is finite exactly when the outputs are, and an infinite
        # weight turns the outputs into NaN one update later: this check is 30x cheaper than
        # computing the cost at every iteration.
        self.finite = bool(np.isfinite(out).all())
        if scores and self.Y is not None:
            Y = self.Y
            self.cost = (np.sum(Y * np.log(out + EPS)), np.sum((1 - Y) * np.log(1 - out + EPS)))
        if scores and self.y is not None:
            self.correct = int(np.count_nonzero(np.argmax(out, axis=0) == self.y))

    def output_gradient(self) -> None:
        """delta^L = y^L - Y (sigmoid outputs, cross-entropy) and its part of nabla_{W^{L-1}}."""
        assert self.Y is not None
        self.delta = self.out - self.Y
        np.matmul(self.delta, self.A[-1].T, out=self.G[-1])

    def hidden_gradient(self, weights: Weights, l: int, lab: bool) -> None:
        """delta^l = (W^l without its bias column)^T delta^{l+1} * s (1 - s) and its part of
        nabla_{W^{l-1}}, where sigma'(z) = y (1 - y) takes s = y^l; the lab applies sigma' to
        y^l itself, s = sigma(y^l)."""
        y = self.A[l][1:]
        s = sigmoid(y) if lab else y
        delta = weights[l][:, 1:].T @ self.delta
        delta *= s
        delta *= 1 - s
        self.delta = delta
        np.matmul(delta, self.A[l - 1].T, out=self.G[l - 1])


def _split(
    weights: Weights, X: np.ndarray, Y: np.ndarray | None, y: np.ndarray | None, blocks: int
) -> list[_Block]:
    return [
        _Block(
            weights,
            X[:, a:b],
            None if Y is None else np.ascontiguousarray(Y[:, a:b]),
            None if y is None else y[a:b],
        )
        for a, b in block_bounds(X.shape[1], blocks)
    ]


def _in_blocks(map_blocks: MapBlocks, parts: list[_Block], step: Callable[[_Block], None]) -> None:
    """``step`` on every block, overflow silenced in whichever thread runs it (a divergence is
    reported, not warned about)."""

    def run(i: int) -> None:
        with np.errstate(over="ignore", invalid="ignore"):
            step(parts[i])

    map_blocks(run, len(parts))


def _cost(parts: list[_Block], n: int, weights: Weights, lamb: float) -> float:
    """The lab's cost from the blocks' cross-entropy terms, summed in block order."""
    ones, zeros = parts[0].cost
    for p in parts[1:]:
        ones, zeros = ones + p.cost[0], zeros + p.cost[1]
    cross_entropy = -(ones + zeros) / n
    return float(cross_entropy + lamb * sum(np.sum(W * W) for W in weights))


def _gradient(parts: list[_Block], l: int, n: int, W: np.ndarray, lamb: float, grad: np.ndarray):
    """nabla_{W^l} = (sum of the blocks' parts, in block order) / n + 2 lamb W^l, into ``grad``."""
    np.copyto(grad, parts[0].G[l])
    for p in parts[1:]:
        grad += p.G[l]
    grad *= 1 / n
    if lamb:
        grad += 2 * lamb * W


def _scored(
    weights: Weights,
    X: np.ndarray,
    Y: np.ndarray | None,
    y: np.ndarray | None,
    blocks: int,
    map_blocks: MapBlocks,
) -> list[_Block]:
    X = np.asarray(X, dtype=weights[0].dtype)
    parts = _split(weights, X, Y, y, blocks)
    _in_blocks(map_blocks, parts, lambda p: p.forward(weights, True))
    return parts


def predict(
    weights: Weights, X: np.ndarray, *, blocks: int = 1, map_blocks: MapBlocks = in_order
) -> np.ndarray:
    """Predicted class indices ``0..K-1``, shape ``(n,)``."""
    parts = _scored(weights, X, None, None, blocks, map_blocks)
    return np.concatenate([np.argmax(p.out, axis=0) for p in parts])


def loss(
    weights: Weights,
    X: np.ndarray,
    Y: np.ndarray,
    lamb: float = 0.0,
    *,
    blocks: int = 1,
    map_blocks: MapBlocks = in_order,
) -> float:
    """The lab's cost: mean over examples of the binary cross-entropy summed over the K outputs
    (with its ``1e-10`` guard) plus ``lamb`` times the sum of all squared weights, biases included.
    ``X`` is ``(d, n)``, ``Y`` one-hot ``(K, n)``."""
    Y = np.asarray(Y, dtype=weights[0].dtype)
    return _cost(_scored(weights, X, Y, None, blocks, map_blocks), Y.shape[1], weights, lamb)


def _backward(weights: Weights, part: _Block, lab: bool) -> None:
    part.output_gradient()
    for l in reversed(range(1, len(weights))):
        part.hidden_gradient(weights, l, lab)


def gradients(
    weights: Weights,
    X: np.ndarray,
    Y: np.ndarray,
    lamb: float = 0.0,
    *,
    blocks: int = 1,
    map_blocks: MapBlocks = in_order,
) -> Weights:
    """nabla_{W^l} of ``loss(weights, X, Y, lamb)``, same shapes as ``weights``.

    Exact for the cross-entropy; the ``1e-10`` guard inside ``loss`` moves the true derivative by
    a relative ``1e-10 / min(y, 1 - y)`` at most, far below what a finite difference resolves.
    """
    X = np.asarray(X, dtype=weights[0].dtype)
    parts = _split(weights, X, np.asarray(Y, dtype=X.dtype), None, blocks)
    _in_blocks(
        map_blocks, parts, lambda p: (p.forward(weights, False), _backward(weights, p, False))
    )
    G = [np.empty_like(W) for W in weights]
    for l, W in enumerate(weights):
        _gradient(parts, l, X.shape[1], W, lamb, G[l])
    return G


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
    blocks: int = 1,
    map_blocks: MapBlocks = in_order,
) -> Weights:
    """Train by full-batch gradient descent; returns new weights (``dtype``), same layout.

    ``X`` is ``(d, n)``, ``Y`` one-hot ``(K, n)``; ``weights`` are not modified.
    ``gradient="exact"`` is plain gradient descent on ``loss``: every nabla_{W^l} is taken from the
    weights before any of them changes. ``gradient="lab"`` is the lab's loop as written: W^l is
    updated before delta^l is computed from it, and sigma' is applied to the activation y^l itself.
    At iteration 0, every ``log_every`` updates and after the last, ``callback`` gets a
    ``LogPoint`` with the loss, training accuracy and, given ``X_test`` ``(d, m)`` and ``y_test``
    ``(m,)``, test accuracy. A non-finite output or loss raises ``DivergenceError`` as soon as it
    is seen. The examples (and the test examples) run in ``blocks`` blocks, through
    ``map_blocks``: the result depends on ``blocks``, not on how the blocks are run.
    """
    if gradient not in GRADIENT_RULES:
        raise ValueError(f"gradient must be one of {GRADIENT_RULES}, got {gradient!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    weights = [np.array(W, dtype=dtype) for W in weights]
    X = np.asarray(X, dtype=dtype)
    Y = np.asarray(Y, dtype=dtype)
    n, L, lab = X.shape[1], len(weights), gradient == "lab"
    train = _split(weights, X, Y, np.argmax(Y, axis=0), blocks)
    test = None
    if X_test is not None and y_test is not None:
        test = _split(weights, np.asarray(X_test, dtype=dtype), None, np.ravel(y_test), blocks)
    G = [np.empty_like(W) for W in weights]

    def first_phase(part: _Block, scores: bool) -> None:
        part.forward(weights, scores)
        if lab:
            part.output_gradient()  # the rest waits for W^{L-1}'s update
        else:
            _backward(weights, part, lab=False)  # every gradient from the weights as they are

    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(iters + 1):
            logging = callback is not None and log_every and (t % log_every == 0 or t == iters)
            _in_blocks(map_blocks, train, lambda p, scores=bool(logging): first_phase(p, scores))
            if not all(p.finite for p in train):
                raise DivergenceError(t)
            if logging:
                cost = _cost(train, n, weights, lamb)
                if not np.isfinite(cost):
                    raise DivergenceError(t)
                test_acc = None
                if test is not None:
                    _in_blocks(map_blocks, test, lambda p: p.forward(weights, True))
                    test_acc = 100.0 * float(sum(p.correct for p in test)) / X_test.shape[1]
                train_acc = 100.0 * float(sum(p.correct for p in train)) / n
                callback(LogPoint(t, cost, train_acc, test_acc))
            if t == iters:
                break
            if lab:
                for l in reversed(range(L)):
                    if l < L - 1:  # delta^{l+1} from W^{l+1}, updated a moment ago
                        _in_blocks(
                            map_blocks,
                            train,
                            lambda p, l=l: p.hidden_gradient(weights, l + 1, True),
                        )
                    _gradient(train, l, n, weights[l], lamb, G[l])
                    weights[l] -= tau * G[l]  # the lab updates W^l before delta^l is computed
            else:
                for l in range(L):
                    _gradient(train, l, n, weights[l], lamb, G[l])
                for W, grad in zip(weights, G, strict=True):
                    W -= tau * grad
    return weights
