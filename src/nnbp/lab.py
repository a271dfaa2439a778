"""The lab itself (TP 5): its published results, and its training loop as written.

The results are the final log line of each of its three runs. They hold for the lab's own
problem only: 400 input pixels, 1,000 training and 4,000 test examples, 10 classes, tau 0.2,
5,000 iterations, and the configuration's hidden size and lamb. A configuration that differs in
any of these has no published counterpart.

``lab_train`` is a faithful transcription of the lab's loop (section 4.4), the reference that
``backprop.fit(gradient="lab")`` is tested and timed against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Published:
    """One of the lab's runs: what it trained, and what its last log line printed."""

    title: str
    sizes: tuple[int, ...]
    lamb: float
    train_acc: float
    test_acc: float
    loss: float


# The lab's loop logs every 500 iterations, so its last line repeats iteration 4,500's values.
PUBLISHED = (
    Published("25 hidden units", (400, 25, 10), 0.0, 94.5, 83.0, 0.45070168537842387),
    Published("100 hidden units", (400, 100, 10), 0.0, 98.9, 86.725, 0.20045271104588352),
    Published("100 hidden, lamb 0.005", (400, 100, 10), 0.005, 95.8, 88.475, 1.5716333351535627),
)
TAU, ITERS, N_TRAIN, N_TEST = 0.2, 5000, 1000, 4000


def published_for(
    sizes: Sequence[int], lamb: float, tau: float, iters: int, n_train: int, n_test: int
) -> Published | None:
    """The lab's run of this very configuration on this very problem, if the lab made one."""
    if (tau, iters, n_train, n_test) != (TAU, ITERS, N_TRAIN, N_TEST):
        return None
    for run in PUBLISHED:
        if run.sizes == tuple(sizes) and run.lamb == lamb:
            return run
    return None


def _sigmoid(z):
    sigmoid_f = 1 / (1 + np.exp(-z))
    return sigmoid_f


def _sigmoid_derivate(z):
    sigm = _sigmoid(z)
    return sigm * (1 - sigm)


def lab_train(X_train, Yhat, W1, W2, tau=0.2, lamb=0.0, iters=5000):
    """The lab's training loop, line for line: only the two weight matrices come in as arguments,
    the number of iterations is a parameter, and nothing is printed. Returns ``W1, W2``."""
    n = X_train.shape[1]
    n2 = W1.shape[0]
    with np.errstate(over="ignore"):  # the lab silences these warnings globally
        for _ in range(iters):
            # forward pass
            Y1 = X_train
            Y1bias = np.insert(Y1, 0, 1, axis=0)
            Y2 = _sigmoid(W1.dot(Y1bias))
            Y2bias = np.insert(Y2, 0, 1, axis=0)
            Y3 = _sigmoid(W2.dot(Y2bias))

            # backward pass
            Delta3 = Y3 - Yhat
            Grad2 = 1 / n * Delta3.dot(Y2bias.T)
            Grad2 += 2 * lamb * W2
            W2 = W2 - tau * Grad2
            W2bar = W2[:, 1 : n2 + 1]
            Delta2 = (W2bar.T.dot(Delta3)) * _sigmoid_derivate(Y2)
            Grad1 = 1 / n * Delta2.dot(Y1bias.T)
            Grad1 += 2 * lamb * W1
            W1 = W1 - tau * Grad1
    return W1, W2
