"""Scoring a network: the lab's cost and the accuracies (``artifacts.Scores``), at a log point of
training and once trained, and the test confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .artifacts import Prepared, Scores, TrainedModel
from .backprop import Weights, accuracy, loss, predict
from .parallel import MapBlocks, in_order


def score(
    weights: Weights,
    data: Prepared,
    lamb: float,
    blocks: int,
    map_blocks: MapBlocks = in_order,
    *,
    test: bool = True,
) -> Scores:
    """``weights`` on ``data`` in ``blocks`` blocks (the sums training makes): the cost on the
    training set with ``lamb``, the training accuracy and, unless ``test`` is False, the test
    accuracy."""
    run = {"blocks": blocks, "map_blocks": map_blocks}
    train_acc = accuracy(predict(weights, data.X_train, **run), data.y_train)
    test_acc = accuracy(predict(weights, data.X_test, **run), data.y_test) if test else None
    return Scores(loss(weights, data.X_train, data.Y_train, lamb, **run), train_acc, test_acc)


@dataclass(frozen=True)
class Evaluation:
    """``scores`` of a trained model and ``confusion``, its (K, K) test counts, rows the true
    class."""

    scores: Scores
    confusion: np.ndarray


def evaluate(model: TrainedModel, data: Prepared, map_blocks: MapBlocks = in_order) -> Evaluation:
    """``model`` on ``data``, in the blocks it was trained in, run through ``map_blocks``."""
    weights, blocks = list(model.weights), model.hyper["blocks"]
    y_pred = predict(weights, data.X_test, blocks=blocks, map_blocks=map_blocks)
    K = data.classes
    confusion = np.zeros((K, K), dtype=np.int64)
    np.add.at(confusion, (data.y_test, y_pred), 1)
    return Evaluation(score(weights, data, model.hyper["lamb"], blocks, map_blocks), confusion)
