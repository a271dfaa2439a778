"""Training one configuration: its initial weights, the fit, its log points, and the model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .artifacts import LogPoint, Prepared, TrainedModel
from .backprop import DivergenceError, Weights, fit, init_weights
from .config import FIT, RECORDED, Training
from .errors import UserError
from .evaluation import score
from .parallel import Pool, thread_count


class Diverged(UserError):
    """Training produced a non-finite loss: nothing is written."""


def train(
    config: Training,
    data: Prepared,
    on_point: Callable[[LogPoint], None] | None = None,
    threads: int | str = "auto",
) -> TrainedModel:
    """Train ``config`` on ``data`` by full-batch backprop from the lab's initial weights (seeded
    by ``config.seed``), its ``config.blocks`` blocks run by ``threads`` threads (which change no
    bit); ``on_point`` gets every log point (iteration 0, every ``log_every`` and the last),
    scored in the same blocks. ``Diverged`` (one line) if the loss stops being finite; an
    exception raised by ``on_point`` stops training there."""
    sizes = [data.features, *config.hidden, data.classes]
    weights = init_weights(sizes, np.random.default_rng(config.seed))
    try:
        with Pool(thread_count(threads, config.blocks)) as pool:

            def log(t: int, W: Weights) -> None:
                if on_point is not None and (t % config.log_every == 0 or t == config.iters):
                    scores = score(W, data, config.lamb, config.blocks, pool.map)
                    if not np.isfinite(scores.loss):
                        raise DivergenceError(t)
                    on_point(LogPoint(t, scores))

            weights = fit(
                data.X_train,
                data.Y_train,
                weights,
                **config.values(FIT),
                map_blocks=pool.map,
                callback=log,
            )
    except DivergenceError as e:
        raise Diverged(
            f"configuration {config.name} diverged: non-finite loss at iteration {e.iteration} "
            f"(tau={config.tau}, lamb={config.lamb}); nothing was written"
        ) from None
    return TrainedModel(tuple(weights), config.values(RECORDED))
