"""Scoring a network: the lab's cost and the accuracies (``artifacts.Scores``), at a log point of
training and once trained, and the test confusion matrix."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .artifacts import Prepared, Scores, TrainedModel
from .backprop import Outputs, Weights, accuracy, predict
from .parallel import ONE_BLOCK, MapBlocks, Schedule, in_order


def scorer(
    weights: Weights,
    X: np.ndarray,
    Y: np.ndarray,
    lamb: float,
    X_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    schedule: Schedule = ONE_BLOCK,
) -> Callable[[Weights], Scores]:
    """A function scoring any weights of ``weights``' shapes on the training set ``X``
    ``(d, n)``, ``Y`` one-hot ``(K, n)``: the lab's cost with ``lamb`` and the accuracy; and the
    accuracy on the test set ``X_test`` ``(d, m)``, ``y_test`` ``(m,)`` class indices, if given.
    In training's blocks (``schedule``), so that the cost has the bits of the sums training
    makes; the data are copied into the blocks once, not at every log point of a training."""
    train = Outputs(weights, X, Y, schedule)
    truth = np.argmax(Y, axis=0)
    test = None if X_test is None or y_test is None else Outputs(weights, X_test, None, schedule)

    def scores(W: Weights) -> Scores:
        cost = train.forward(W).cost(W, lamb)  # one forward pass: the cost and the predictions
        train_acc = accuracy(train.predictions(), truth)
        test_acc = None if test is None else accuracy(test.forward(W).predictions(), y_test)
        return Scores(cost, train_acc, test_acc)

    return scores


@dataclass(frozen=True)
class Evaluation:
    """``scores`` of a trained model and ``confusion``, its (K, K) test counts, rows the true
    class."""

    scores: Scores
    confusion: np.ndarray


def evaluate(model: TrainedModel, data: Prepared, map_blocks: MapBlocks = in_order) -> Evaluation:
    """``model`` on ``data``, in the blocks it was trained in, run through ``map_blocks``."""
    weights, schedule = list(model.weights), Schedule(model.hyper["blocks"], map_blocks)
    lamb = model.hyper["lamb"]
    train = scorer(weights, data.X_train, data.Y_train, lamb, schedule=schedule)(weights)
    y_pred = predict(weights, data.X_test, schedule)  # one pass: the accuracy and the confusion
    scores = Scores(train.loss, train.train_acc, accuracy(y_pred, data.y_test))
    K = data.classes
    confusion = np.zeros((K, K), dtype=np.int64)
    np.add.at(confusion, (data.y_test, y_pred), 1)
    return Evaluation(scores, confusion)
