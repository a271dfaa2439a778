"""System metrics of a training run: MLflow's CPU and memory figures for the machine, and how
many cores and how much memory the run's own process used, sampled in a thread while it trains
and logged as ``system/...`` metrics (the UI's *System metrics*).

They go through the run's own ``log_metrics``, which hands them to the run's thread without
waiting, so a store that fails or does not answer costs what any metric costs (one warning line,
sent again when the run ends), never the training, and the sampling thread ends as soon as it is
told to (it is waited for ``JOIN_SECONDS`` at most). The sampling interval
and how many samples make one logged point are MLflow's own settings
(``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``, ``MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING``).
The last point is logged when training ends, so even a run of a second has one. Sampling reads
``/proc``; it changes no bit of the training.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

PREFIX = "system/"
SAMPLING_SECONDS = 2.0  # MLflow's default is 10 s: a default run trains for 10 to 25 s
SAMPLES_PER_POINT = 1
MIN_STRETCH_SECONDS = 0.5
JOIN_SECONDS = 1.0  # a sample reads /proc: the thread is never busy for long


def _monitors() -> list[Any]:
    import psutil
    from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    class ProcessMonitor(BaseMetricsMonitor):
        """This process: the cores it kept busy (CPU seconds per second, all its threads) and
        its resident memory."""

        def __init__(self) -> None:
            super().__init__()
            self._process = psutil.Process()
            self._process.cpu_percent()  # the first reading only starts the clock

        def collect_metrics(self) -> None:
            self._metrics["process_cpu_cores"].append(self._process.cpu_percent() / 100)
            rss = self._process.memory_info().rss
            self._metrics["process_memory_rss_megabytes"].append(rss / 1e6)

        def aggregate_metrics(self) -> dict[str, float]:
            return {k: round(sum(v) / len(v), 2) for k, v in self._metrics.items()}

    machine = CPUMonitor()
    psutil.cpu_percent()  # likewise for the machine's
    return [machine, ProcessMonitor()]


def _setting(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


@contextlib.contextmanager
def sampling(
    log_metrics: Callable[[Mapping[str, float | None], int], None] | None,
) -> Iterator[None]:
    """Sample while the block runs and hand each point to ``log_metrics(metrics, step)`` (steps
    0, 1, ...); the last point when the block ends. ``None`` (tracking off): nothing."""
    if log_metrics is None:
        yield
        return
    monitors = _monitors()
    interval = _setting("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", SAMPLING_SECONDS)
    per_point = max(
        1, int(_setting("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", SAMPLES_PER_POINT))
    )
    done = threading.Event()
    step = 0
    samples = 0
    last = time.monotonic()  # of the last sample (or the priming reading)

    def publish() -> None:
        nonlocal step, samples
        if not samples:
            return
        point: dict[str, float | None] = {}
        for monitor in monitors:
            point.update({PREFIX + k: v for k, v in monitor.aggregate_metrics().items()})
            monitor.clear_metrics()
        log_metrics(point, step)
        step, samples = step + 1, 0

    def sample() -> None:
        nonlocal samples, last
        for monitor in monitors:
            monitor.collect_metrics()
        samples, last = samples + 1, time.monotonic()

    def loop() -> None:
        while not done.wait(interval):
            sample()
            if samples >= per_point:
                publish()

    thread = threading.Thread(target=loop, name="nnbp-system-metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(JOIN_SECONDS)
        # The stretch since the last sample, unless it is too short to measure a CPU share
        # (psutil reads 0 % over a few milliseconds).
        if time.monotonic() - last >= MIN_STRETCH_SECONDS or step + samples == 0:
            sample()
        publish()
