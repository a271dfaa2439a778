"""Training one configuration: its initial weights, the fit, and the model it gives."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .artifacts import Prepared, TrainedModel
from .backprop import DivergenceError, LogPoint, fit, init_weights
from .config import Training
from .errors import UserError
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
    bit); ``on_point`` gets every log point (iteration 0, every ``log_every`` and the last).
    ``Diverged`` (one line) if the loss stops being finite."""
    sizes = [data.features, *config.hidden, data.classes]
    weights = init_weights(sizes, np.random.default_rng(config.seed))
    try:
        with Pool(thread_count(threads, config.blocks)) as pool:
            weights = fit(
                data.X_train,
                data.Y_train,
                weights,
                tau=config.tau,
                lamb=config.lamb,
                iters=config.iters,
                gradient=config.gradient,
                dtype=config.dtype,
                log_every=config.log_every,
                X_test=data.X_test,
                y_test=data.y_test,
                callback=on_point,
                blocks=config.blocks,
                map_blocks=pool.map,
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
