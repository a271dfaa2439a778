"""Training one configuration: its initial weights, the fit, its log points and its model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .artifacts import Prepared, TrainedModel
from .backprop import (
    Callback,
    DivergenceError,
    LogPoint,  # its home is here; defined in backprop until nnbp.artifacts imports it from here
    Weights,
    accuracy,
    fit,
    init_weights,
    predict,
    scores,
)
from .config import Training
from .errors import UserError
from .parallel import MapBlocks, Pool, in_order, thread_count

__all__ = ["Diverged", "LogPoint", "log_points", "train"]


class Diverged(UserError):
    """Training produced a non-finite loss: nothing is written."""


def log_points(
    on_point: Callable[[LogPoint], None],
    X: np.ndarray,
    Y: np.ndarray,
    X_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    *,
    lamb: float,
    iters: int,
    log_every: int,
    blocks: int = 1,
    map_blocks: MapBlocks = in_order,
) -> Callback:
    """The ``fit`` callback that hands ``on_point`` a ``LogPoint`` at iteration 0, every
    ``log_every`` and the last (none if ``log_every`` is 0): the lab's cost and the accuracy on
    the training set ``X`` ``(d, n)``, ``Y`` one-hot ``(K, n)``, and the accuracy on the test set
    ``X_test`` ``(d, m)``, ``y_test`` ``(m,)`` class indices, if given. Scored in the training's
    ``blocks``, so that the cost has the bits of the sums the training makes (``backprop.loss``'s
    and ``predict``'s, from one forward pass: ``backprop.scores``). A non-finite cost raises
    ``DivergenceError`` at that iteration."""
    y = np.argmax(Y, axis=0)
    kw = {"blocks": blocks, "map_blocks": map_blocks}

    def callback(t: int, weights: Weights) -> None:
        if not (log_every > 0 and (t % log_every == 0 or t == iters)):
            return
        cost, predicted = scores(weights, X, Y, lamb, **kw)  # one forward pass for both
        if not np.isfinite(cost):
            raise DivergenceError(t)
        train_acc = accuracy(predicted, y)
        test_acc = None
        if X_test is not None and y_test is not None:
            test_acc = accuracy(predict(weights, X_test, **kw), y_test)
        on_point(LogPoint(t, cost, train_acc, test_acc))

    return callback


def train(
    config: Training,
    data: Prepared,
    on_point: Callable[[LogPoint], None] | None = None,
    threads: int | str = "auto",
) -> TrainedModel:
    """Train ``config`` on ``data`` by full-batch backprop from the lab's initial weights (seeded
    by ``config.seed``), its ``config.blocks`` blocks run by ``threads`` threads (which change no
    bit); ``on_point`` gets every log point (iteration 0, every ``log_every`` and the last).
    ``Diverged`` (one line) if the loss stops being finite."""
    sizes = [data.features, *config.hidden, data.classes]
    weights = init_weights(sizes, np.random.default_rng(config.seed))
    try:
        with Pool(thread_count(threads, config.blocks)) as pool:
            callback = None
            if on_point is not None:
                callback = log_points(
                    on_point,
                    data.X_train,
                    data.Y_train,
                    data.X_test,
                    data.y_test,
                    lamb=config.lamb,
                    iters=config.iters,
                    log_every=config.log_every,
                    blocks=config.blocks,
                    map_blocks=pool.map,
                )
            weights = fit(
                data.X_train,
                data.Y_train,
                weights,
                tau=config.tau,
                lamb=config.lamb,
                iters=config.iters,
                gradient=config.gradient,
                dtype=config.dtype,
                blocks=config.blocks,
                map_blocks=pool.map,
                callback=callback,
            )
    except DivergenceError as e:
        raise Diverged(
            f"configuration {config.name} diverged: non-finite loss at iteration {e.iteration} "
            f"(tau={config.tau}, lamb={config.lamb}); nothing was written"
        ) from None
    return TrainedModel(
        tuple(weights),
        lamb=config.lamb,
        tau=config.tau,
        iters=config.iters,
        gradient=config.gradient,
        blocks=config.blocks,
    )
