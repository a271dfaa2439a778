"""Training one configuration: its initial weights, the fit, its log points, and the model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .artifacts import LogPoint, Prepared, Scores, TrainedModel
from .backprop import Callback, DivergenceError, Weights, fit, init_weights
from .config import FIT, RECORDED, Training
from .errors import UserError
from .evaluation import scorer
from .kernels import check as check_kernels
from .parallel import MapBlocks, Pool, Schedule, in_order, thread_count


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
    ``log_every`` and the last: the network scored (``evaluation.scorer``) on the training set
    ``X`` ``(d, n)``, ``Y`` one-hot ``(K, n)`` and, if given, the test set ``X_test`` ``(d, m)``,
    ``y_test`` ``(m,)``, in the training's ``blocks``. A non-finite cost raises
    ``DivergenceError`` at that iteration."""
    schedule = Schedule(blocks, map_blocks)
    score: Callable[[Weights], Scores] | None = None  # made at the first log point (its shapes)

    def callback(t: int, W: Weights) -> None:
        nonlocal score
        if t % log_every and t != iters:
            return
        if score is None:
            score = scorer(W, X, Y, lamb, X_test, y_test, schedule)
        scores = score(W)
        if not np.isfinite(scores.loss):
            raise DivergenceError(t)
        on_point(LogPoint(t, scores))

    return callback


def train(
    config: Training,
    data: Prepared,
    on_point: Callable[[LogPoint], None] | None = None,
    threads: int | str = "auto",
    stop_check: Callable[[], None] | None = None,
) -> TrainedModel:
    """Train ``config`` on ``data`` by full-batch backprop from the lab's initial weights (seeded
    by ``config.seed``), its ``config.blocks`` blocks run by ``threads`` threads (which change no
    bit); ``on_point`` gets every log point (iteration 0, every ``log_every`` and the last).
    ``Diverged`` (one line) if the loss stops being finite; an exception raised by ``on_point``
    stops the training there, and so does one raised by ``stop_check``, called before every
    iteration (a stage's signal path: ``nnbp.tooling.cli.stop_point``).

    The model records the kernel family that trained it (``nnbp.kernels``); when it is not the
    pinned one, a ``KernelWarning`` says so, once."""
    kernels = check_kernels()
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
                **config.values(FIT),
                map_blocks=pool.map,
                callback=_stopping(callback, stop_check),
            )
    except DivergenceError as e:
        raise Diverged(
            f"configuration {config.name} diverged: non-finite loss at iteration {e.iteration} "
            f"(tau={config.tau}, lamb={config.lamb}); nothing was written"
        ) from None
    return TrainedModel(tuple(weights), config.values(RECORDED), kernels)


def _stopping(callback: Callback | None, stop_check: Callable[[], None] | None) -> Callback | None:
    """``callback``, after ``stop_check()`` at every iteration (which may raise to stop there)."""
    if stop_check is None:
        return callback

    def checked(t: int, W: Weights) -> None:
        stop_check()
        if callback is not None:
            callback(t, W)

    return checked
