"""Training one configuration: its initial weights, the fit, and the model it gives."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from .artifacts import Prepared, TrainedModel
from .backprop import DivergenceError, LogPoint, fit, init_weights
from .config import Training
from .errors import UserError


class Diverged(UserError):
    """Training produced a non-finite loss: nothing is written."""


def train(
    config: Training, data: Prepared, on_point: Callable[[LogPoint], None] | None = None
) -> TrainedModel:
    """Train ``config`` on ``data`` by full-batch backprop from the lab's initial weights (seeded
    by ``config.seed``); ``on_point`` gets every log point (every ``log_every`` iterations and
    the last). ``Diverged`` (one line) if the loss stops being finite."""
    sizes = [data.features, *config.hidden, data.classes]
    weights = init_weights(sizes, np.random.default_rng(config.seed))
    try:
        with threadpool_limits(config.threads, user_api="blas"):  # the bits depend on it
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
        threads=config.threads,
    )
