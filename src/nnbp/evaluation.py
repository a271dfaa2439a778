"""Evaluating trained models: accuracies, the lab's cost and the test confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .artifacts import Prepared, TrainedModel
from .backprop import MapBlocks, accuracy, in_order, loss, predict


@dataclass(frozen=True)
class Evaluation:
    """``metrics``: ``train_acc``, ``test_acc`` (percent, 4 decimals) and ``loss`` (the lab's
    training cost, regularization included, 6 decimals); ``confusion``: (K, K) test counts, rows
    the true class."""

    metrics: dict[str, float]
    confusion: np.ndarray


def evaluate(model: TrainedModel, data: Prepared, map_blocks: MapBlocks = in_order) -> Evaluation:
    """``model`` on ``data``, in the blocks it was trained in (``model.blocks``), run through
    ``map_blocks``: the same sums as training's, whatever runs them."""
    weights, blocks = list(model.weights), {"blocks": model.blocks, "map_blocks": map_blocks}
    y_pred = predict(weights, data.X_test, **blocks)
    metrics = {
        "train_acc": round(accuracy(predict(weights, data.X_train, **blocks), data.y_train), 4),
        "test_acc": round(accuracy(y_pred, data.y_test), 4),
        "loss": round(loss(weights, data.X_train, data.Y_train, model.lamb, **blocks), 6),
    }
    K = data.classes
    confusion = np.zeros((K, K), dtype=np.int64)
    np.add.at(confusion, (data.y_test, y_pred), 1)
    return Evaluation(metrics, confusion)
