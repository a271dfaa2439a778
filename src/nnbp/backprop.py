"""Full-batch backpropagation for a sigmoid network, as in TP 5 (section 4.4).

Conventions are the lab's:

* ``X`` is features x examples, shape ``(d, n)``; a one-hot target ``Y`` is ``(K, n)``.
* Layer sizes are ``sizes = [n_1, ..., n_L]`` with ``n_1 = d`` and ``n_L = K``.
* ``W^l`` (``W[l - 1]``) has shape ``(n_{l+1}, n_l + 1)``; column 0 is the bias,
  so ``y^{l+1} = sigma(W^l [1; y^l])``.
* ``delta^l``, shape ``(n_l, n)``, holds the derivative of each example's cross-entropy with
  respect to ``z^l`` (layer l's input to sigma), a column per example, and
  nabla_{W^l} = delta^{l+1} [1; y^l]^T / n + 2 lamb W^l.
* Class indices are ``0..K-1`` here (files store ``1..K``).

Everything here is math: no I/O, no logging, no global state.

The examples run block by block (``nnbp.parallel``): the ``n`` examples are split into ``blocks``
contiguous column blocks, each phase of an iteration runs once per block, possibly on several
threads at once (``map_blocks``), and the blocks' parts of a gradient or of the cost are summed in
block order. So the result depends on ``blocks`` and on nothing else: not on how many threads
ran the blocks, nor in which order they finished.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Literal, NamedTuple

import numpy as np

from .parallel import ONE_BLOCK, Blocks, MapBlocks, Schedule, in_order

EPS = 1e-10  # the lab's guard inside log()
DTYPES = ("float64", "float32")

Array = np.ndarray  # of the shape the docstring gives
Weights = list[np.ndarray]
Callback = Callable[[int, Weights], None]


def sigmoid(z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``1 / (1 + exp(-z))`` elementwise, written into ``out`` when given (it may be ``z``).

    Within about 2 ulp of the true value over the normal range, like ``scipy.special.expit``.
    Where ``exp(-z)`` overflows (z < -709 in float64) the result is 0 (the true value is below
    1e-308), so that overflow is expected and silenced here, not globally. The ``exp`` is NumPy's,
    whose bits the golden digests pin (another library's rounds differently); in float64 under
    the pinned AVX2 loops it is not vectorised (about 4 ns an element, most of a sigmoid's time,
    and as fast as ``scipy.special.expit`` on a (100, 1000) array).
    """
    with np.errstate(over="ignore"):
        return _sigmoid(z, out)


def _sigmoid(z: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``sigmoid`` under the caller's errstate (training silences overflow once, not per call)."""
    out = np.negative(z, out=out)
    np.exp(out, out=out)
    out += 1
    # 1 / x is one correctly rounded division either way; NumPy's divide loop is SIMD, its
    # reciprocal loop for floats is not (2x slower on a (100, 250) block, same bits).
    return np.divide(1, out, out=out)


def _quiet() -> np.errstate:
    """Overflow and invalid values silenced: on the way to a divergence, which is reported."""
    return np.errstate(over="ignore", invalid="ignore")


class DivergenceError(ArithmeticError):
    """Training produced a non-finite value; ``iteration`` is the number of updates done."""

    def __init__(self, iteration: int) -> None:
        super().__init__(f"non-finite loss after {iteration} iterations")
        self.iteration = iteration


def init_weights(sizes: Sequence[int], rng: np.random.Generator, dtype: str = "float64") -> Weights:
    """The lab's rule ``W^l ~ U[-2/sqrt(n_l), 2/sqrt(n_l)]``, shape ``(n_{l+1}, n_l + 1)``."""
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must list at least two layer sizes >= 1, got {list(sizes)}")
    weights = []
    for n_l, n_next in pairwise(sizes):
        a = 2 / np.sqrt(n_l)
        weights.append(rng.uniform(-a, a, (n_next, n_l + 1)).astype(dtype))
    return weights


def accuracy(y_pred: np.ndarray, y_true: np.ndarray) -> float:
    """Percentage of equal entries of two ``(n,)`` label arrays."""
    y_pred, y_true = np.ravel(y_pred), np.ravel(y_true)
    return 100.0 * float(np.count_nonzero(y_pred == y_true)) / y_true.size


class Block:
    """One block of ``m`` examples and its buffers, and views of them made once (every pass of
    the loop writes into these, so an iteration allocates nothing).

    ``A[l]`` is ``[1; y^{l+1}]``, ``(n_{l+1} + 1, m)``, for every layer but the output one (``A[0]``
    holds the block's ``X``); ``out`` is ``y^L``, ``(K, m)``; ``Y`` its one-hot targets ``(K, m)``;
    ``z[l]`` is where ``W[l]``'s product goes (``y^{l+2}``: ``A[l + 1][1:]``, or ``out``).
    Given ``Y``, the buffers of its gradient too: ``delta[l]`` is delta^{l+1}, ``(n_{l+1}, m)``,
    for l = 1..L-1 (``delta[0]`` is empty); ``G[l]`` this block's part of nabla_{W^{l+1}}, summed
    over its examples, not yet scaled; ``s[l]`` a scratch like ``delta[l]`` for sigma'.
    """

    def __init__(self, W: Weights, X: np.ndarray, Y: np.ndarray | None) -> None:
        m, dtype = X.shape[1], X.dtype
        self.A = [np.empty((W_l.shape[1], m), dtype) for W_l in W]
        for a in self.A:
            a[0] = 1.0
        self.A[0][1:] = X
        self.out = np.empty((W[-1].shape[0], m), dtype)
        self.z = [a[1:] for a in self.A[1:]] + [self.out]
        self.AT = [a.T for a in self.A]
        self.Y = Y
        self.finite = True
        if Y is None:  # outputs only: no gradient
            return
        sizes = [0] + [a.shape[0] - 1 for a in self.A[1:]] + [self.out.shape[0]]
        self.delta = [np.empty((k, m), dtype) for k in sizes]
        self.s = [np.empty((k, m), dtype) for k in sizes]
        self.G = [np.empty_like(W_l) for W_l in W]


def _blocks(
    W: Weights, X: np.ndarray, Y: np.ndarray | None, blocks: int, map_blocks: MapBlocks
) -> Blocks[Block]:
    X = np.asarray(X, dtype=W[0].dtype)

    def make(a: int, b: int) -> Block:
        return Block(W, X[:, a:b], None if Y is None else np.ascontiguousarray(Y[:, a:b]))

    return Blocks.split(X.shape[1], blocks, make, map_blocks)


def _forward(block: Block, W: Weights) -> None:
    """y^2, ..., y^L of the block from its X, in place: y^{l+1} = sigma(W^l [1; y^l])."""
    for W_l, a, z in zip(W, block.A, block.z, strict=True):
        np.matmul(W_l, a, out=z)
        _sigmoid(z, out=z)
    # The guarded cross-entropy is finite exactly when the outputs are, and an infinite weight
    # turns the outputs into NaN one update later: this check is 30x cheaper than the cost.
    block.finite = bool(np.isfinite(block.out).all())


def _output_delta(block: Block) -> None:
    """delta^L = y^L - Y (sigmoid outputs, cross-entropy) and the block's nabla_{W^{L-1}}."""
    assert block.Y is not None
    delta = block.delta[-1]
    np.subtract(block.out, block.Y, out=delta)
    np.matmul(delta, block.AT[-1], out=block.G[-1])


def _y(y: np.ndarray, out: np.ndarray) -> np.ndarray:
    """sigma'(z^l) = s (1 - s) with s = y^l = sigma(z^l): the true derivative takes y^l."""
    return y


def _sigmoid_of_y(y: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The lab applies its sigma' to the activation y^l itself: s = sigma(y^l)."""
    return _sigmoid(y, out)


SigmaInput = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _hidden_delta(block: Block, Wbar: Weights, l: int, s_of: SigmaInput) -> None:
    """With k = l + 1 the lab's number of layer ``l`` (``Wbar[l]`` is W^k without its bias
    column, transposed, ``(n_k, n_{k+1})``): delta^k = Wbar[l] delta^{k+1} * s (1 - s),
    ``(n_k, m)``, and the block's part of nabla_{W^{k-1}} = delta^k [1; y^{k-1}]^T, where
    ``s = s_of(y^k)`` (``_y`` or the lab's)."""
    delta, scratch = block.delta[l], block.s[l]
    np.matmul(Wbar[l], block.delta[l + 1], out=delta)
    s = s_of(block.z[l - 1], scratch)
    delta *= s
    np.subtract(1, s, out=scratch)
    delta *= scratch
    np.matmul(delta, block.AT[l - 1], out=block.G[l - 1])


def _backward(block: Block, Wbar: Weights) -> None:
    """Every delta and every nabla part of the block from the weights as they are."""
    _output_delta(block)
    for l in reversed(range(1, len(Wbar))):
        _hidden_delta(block, Wbar, l, _y)


class Net:
    """The weights ``W`` being trained on ``n`` examples, views of them made once (``Wbar[l]``,
    ``W[l]`` without its bias column, transposed: the updates are in place, so the views stay
    true), and the summed nablas ``G`` (with a scratch each), so that a step allocates nothing."""

    def __init__(self, W: Weights, n: int) -> None:
        self.W, self.n = W, n
        self.Wbar = [W_l[:, 1:].T for W_l in W]
        self.G = [np.empty_like(W_l) for W_l in W]
        self.scratch = [np.empty_like(W_l) for W_l in W]

    def gradient(self, blocks: Blocks[Block], l: int, lamb: float) -> np.ndarray:
        """nabla_{W^{l+1}} = (the blocks' parts, summed in block order) / n + 2 lamb W^{l+1}."""
        G = self.G[l]
        parts = blocks.parts
        np.copyto(G, parts[0].G[l])
        for p in parts[1:]:
            G += p.G[l]
        G *= 1 / self.n
        if lamb:
            G += np.multiply(self.W[l], 2 * lamb, out=self.scratch[l])
        return G

    def step(self, blocks: Blocks[Block], l: int, tau: float, lamb: float) -> None:
        """W^{l+1} -= tau nabla_{W^{l+1}}, in place."""
        G = self.gradient(blocks, l, lamb)
        G *= tau
        self.W[l] -= G


# --- the two update rules ----------------------------------------------------------------------


def lab_first_phase(block: Block, net: Net) -> None:
    """A block's forward pass and delta^L: the rest waits for W^{L-1}'s update."""
    _forward(block, net.W)
    _output_delta(block)


def lab_update(net: Net, blocks: Blocks[Block], tau: float, lamb: float) -> None:
    """The lab's loop as written: W^{L-1} is updated first, and delta^{L-1} is computed from the
    updated W^{L-1}, and so on down to W^1; sigma' is applied to the activation y^l itself."""
    L = len(net.W)
    for l in reversed(range(L)):
        if l < L - 1:  # W[l] is W^{l+1}: delta^{l+2} from W^{l+2}, updated a moment ago
            blocks.run(lambda p, l=l: _hidden_delta(p, net.Wbar, l + 1, _sigmoid_of_y))
        net.step(blocks, l, tau, lamb)


def exact_first_phase(block: Block, net: Net) -> None:
    """A block's forward pass and every gradient part, all from the weights as they are."""
    _forward(block, net.W)
    _backward(block, net.Wbar)


def exact_update(net: Net, blocks: Blocks[Block], tau: float, lamb: float) -> None:
    """Plain gradient descent on ``loss``: every nabla_{W^l} from the weights before the step
    (the blocks' parts were all computed in the first phase; the lamb term of W^l is taken
    before W^l's own step)."""
    for l in range(len(net.W)):
        net.step(blocks, l, tau, lamb)


class Rule(NamedTuple):
    """An update rule: what each block computes in the forward pass (``first_phase``), then the
    update of the weights from it (``update``, which may run more phases)."""

    first_phase: Callable[[Block, Net], None]
    update: Callable[[Net, Blocks[Block], float, float], None]


RULES = {"lab": Rule(lab_first_phase, lab_update), "exact": Rule(exact_first_phase, exact_update)}
GRADIENT_RULES = tuple(RULES)  # the lab's loop as written, and plain gradient descent


# --- the public functions ----------------------------------------------------------------------


def forward(weights: Weights, X: np.ndarray) -> list[np.ndarray]:
    """Activations ``[y^1 = X, y^2, ..., y^L]``, each ``(n_l, n)`` (in one block)."""
    W = list(weights)
    (block,) = _blocks(W, X, None, 1, in_order)
    with _quiet():
        _forward(block, W)
    return [a[1:] for a in block.A] + [block.out]


class Outputs:
    """A network's outputs on one ``X`` ``(d, n)`` (with one-hot ``Y`` ``(K, n)``, for the
    cost), in ``schedule``'s blocks, for weights that change (a training's log points): ``X`` is
    copied into the blocks' buffers once. ``weights`` gives the shapes."""

    def __init__(
        self, weights: Weights, X: Array, Y: Array | None = None, schedule: Schedule = ONE_BLOCK
    ) -> None:
        W = list(weights)
        Y = None if Y is None else np.asarray(Y, dtype=W[0].dtype)
        self.parts = _blocks(W, np.asarray(X), Y, schedule.blocks, schedule.map_blocks)

    def forward(self, weights: Weights) -> Outputs:
        """The blocks' outputs for ``weights``, in place."""
        W = list(weights)
        with _quiet():
            self.parts.run(lambda p: _forward(p, W))
        return self

    def cost(self, weights: Weights, lamb: float = 0.0) -> float:
        """``loss`` of the last ``forward`` (its ``weights``)."""
        return _cost(self.parts, weights, lamb)

    def predictions(self) -> np.ndarray:
        """``predict`` of the last ``forward``, shape ``(n,)``."""
        return _predictions(self.parts)


def _outputs(
    weights: Weights, X: np.ndarray, Y: np.ndarray | None, schedule: Schedule
) -> Blocks[Block]:
    return Outputs(weights, X, Y, schedule).forward(weights).parts


def _predictions(parts: Blocks[Block]) -> np.ndarray:
    return np.concatenate([np.argmax(p.out, axis=0) for p in parts])


def _cost(parts: Blocks[Block], weights: Weights, lamb: float) -> float:
    """The lab's cost from the blocks' outputs and targets, their terms summed in block order."""
    terms = [
        (np.sum(p.Y * np.log(p.out + EPS)), np.sum((1 - p.Y) * np.log(1 - p.out + EPS)))
        for p in parts
    ]
    ones, zeros = terms[0]
    for a, b in terms[1:]:
        ones, zeros = ones + a, zeros + b
    cross_entropy = -(ones + zeros) / sum(p.out.shape[1] for p in parts)
    return float(cross_entropy + lamb * sum(np.sum(W * W) for W in weights))


def predict(weights: Weights, X: np.ndarray, schedule: Schedule = ONE_BLOCK) -> np.ndarray:
    """Predicted class indices ``0..K-1`` of ``X`` ``(d, n)``, shape ``(n,)``."""
    return _predictions(_outputs(weights, X, None, schedule))


def loss(
    weights: Weights, X: Array, Y: Array, lamb: float = 0.0, schedule: Schedule = ONE_BLOCK
) -> float:
    """The lab's cost: mean over examples of the binary cross-entropy summed over the K outputs
    (with its ``1e-10`` guard) plus ``lamb`` times the sum of all squared weights, biases included.
    ``X`` is ``(d, n)``, ``Y`` one-hot ``(K, n)``; the blocks' terms are summed in block order."""
    Y = np.asarray(Y, dtype=weights[0].dtype)
    return _cost(_outputs(weights, X, Y, schedule), weights, lamb)


def loss_and_predictions(
    weights: Weights, X: Array, Y: Array, lamb: float = 0.0, schedule: Schedule = ONE_BLOCK
) -> tuple[float, np.ndarray]:
    """``loss(...)`` and ``predict(weights, X, ...)`` (same bits) from one forward pass."""
    outputs = Outputs(weights, X, Y, schedule).forward(weights)
    return outputs.cost(weights, lamb), outputs.predictions()


def gradients(
    weights: Weights, X: Array, Y: Array, lamb: float = 0.0, schedule: Schedule = ONE_BLOCK
) -> Weights:
    """nabla_{W^l} of ``loss(weights, X, Y, lamb)``, same shapes as ``weights``.

    Exact for the cross-entropy; the ``1e-10`` guard inside ``loss`` moves the true derivative by
    a relative ``1e-10 / min(y, 1 - y)`` at most, far below what a finite difference resolves.
    """
    net = Net(list(weights), np.shape(X)[1])
    Y = np.asarray(Y, dtype=net.W[0].dtype)
    parts = _blocks(net.W, X, Y, schedule.blocks, schedule.map_blocks)
    with _quiet():
        parts.run(lambda p: exact_first_phase(p, net))
    return [net.gradient(parts, l, lamb).copy() for l in range(len(net.W))]


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
    blocks: int = 1,
    map_blocks: MapBlocks = in_order,
    callback: Callback | None = None,
) -> Weights:
    """Train by full-batch gradient descent; returns new weights (``dtype``), same layout.

    ``X`` is ``(d, n)``, ``Y`` one-hot ``(K, n)``; ``weights`` are not modified.
    ``gradient="exact"`` is plain gradient descent on ``loss``: every nabla_{W^l} is taken from the
    weights before any of them changes. ``gradient="lab"`` is the lab's loop as written: W^l is
    updated before delta^l is computed from it, and sigma' is applied to the activation y^l itself.

    ``callback(t, W)`` is called for t = 0, 1, ..., ``iters`` with the weights after t updates
    (before update t + 1): the live arrays, to read (copy them to keep them), never to modify.
    It may raise to stop the training; the exception reaches the caller. A non-finite output
    raises ``DivergenceError(t)`` before ``callback(t, ...)`` is called.

    The examples run in ``blocks`` blocks, through ``map_blocks`` (``nnbp.parallel``): the result
    depends on ``blocks``, not on how the blocks are run. The defaults run one block in the
    caller's thread, where only the matrix products use several cores (OpenBLAS's own threads);
    the training stage's speed, its blocks on every core, is two lines away (the bits of 4 blocks,
    whatever the number of threads)::

        with Pool(thread_count("auto", 4)) as pool:  # from nnbp.parallel
            W = fit(X, Y, W0, tau=0.2, iters=5000, blocks=4, map_blocks=pool.map)
    """
    if gradient not in RULES:
        raise ValueError(f"gradient must be one of {GRADIENT_RULES}, got {gradient!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    rule = RULES[gradient]
    net = Net([np.array(W_l, dtype=dtype) for W_l in weights], np.shape(X)[1])
    parts = _blocks(net.W, X, np.asarray(Y, dtype=dtype), blocks, map_blocks)

    def first_phase(p: Block) -> None:
        rule.first_phase(p, net)

    def last_phase(p: Block) -> None:  # after the last update: the outputs, for the check
        _forward(p, net.W)

    for t in range(iters + 1):
        with _quiet():
            parts.run(first_phase if t < iters else last_phase)
        if not all(p.finite for p in parts):
            raise DivergenceError(t)
        if callback is not None:
            callback(t, net.W)  # outside _quiet: the caller's own warnings are the caller's
        if t < iters:
            with _quiet():
                rule.update(net, parts, tau, lamb)
    return net.W
