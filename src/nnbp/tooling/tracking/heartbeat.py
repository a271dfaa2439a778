"""A run's heartbeat: the sign of life that any machine can read. A training process refreshes
the tag ``nnbp.heartbeat`` (its wall clock, in ms since the epoch) every ``NNBP_HEARTBEAT_SECONDS``
(30 s) from a thread of its own, off the training loop; a RUNNING run whose heartbeat is older
than ``NNBP_HEARTBEAT_TIMEOUT`` (600 s) lost its process, whichever machine looks at it
(``orphans`` closes it). A process on the run's own host asks the kernel instead, which is exact.

The machine a run names (tag ``nnbp.machine``) is ``NNBP_MACHINE``, by default the host name: two
workers on one host, or a host whose name says nothing, can tell themselves apart with it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from ...errors import UserError

HEARTBEAT_TAG = "nnbp.heartbeat"
MACHINE_TAG = "nnbp.machine"
MACHINE_ENV = "NNBP_MACHINE"
INTERVAL_ENV, INTERVAL = "NNBP_HEARTBEAT_SECONDS", 30.0
TIMEOUT_ENV, TIMEOUT = "NNBP_HEARTBEAT_TIMEOUT", 600.0
JOIN_SECONDS = 1.0  # a beat in flight to a store that does not answer is not waited for


def _seconds(env: str, default: float) -> float:
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UserError(f"{env} = {text!r}: must be a positive number of seconds")
    return value


def interval() -> float:
    """Seconds between two heartbeats of a run (``NNBP_HEARTBEAT_SECONDS``, default 30)."""
    return _seconds(INTERVAL_ENV, INTERVAL)


def timeout() -> float:
    """Seconds without a heartbeat after which a run is taken for dead
    (``NNBP_HEARTBEAT_TIMEOUT``, default 600)."""
    return _seconds(TIMEOUT_ENV, TIMEOUT)


def machine() -> str:
    """The machine runs are tagged with: ``NNBP_MACHINE``, else the host name."""
    return os.environ.get(MACHINE_ENV, "").strip() or socket.gethostname()


def now_ms() -> int:
    return int(time.time() * 1000)


def last_beat(tags: Mapping[str, str]) -> int | None:
    """The run's last heartbeat (ms since the epoch); None for a run that never had one (made
    before heartbeats existed)."""
    value = tags.get(HEARTBEAT_TAG, "")
    return int(value) if value.isdigit() else None


class Heartbeat:
    """Refreshes a run's heartbeat tag every ``seconds`` from a daemon thread until ``stop``.
    The thread sleeps between beats and sends one small request, so training loses no time and
    no bit; a failed beat is ignored (the run's own logging reports a broken store)."""

    def __init__(self, client: Any, run_id: str, seconds: float) -> None:
        self._client, self._run_id, self._seconds = client, run_id, seconds
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="nnbp-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stopped.wait(self._seconds):
            with contextlib.suppress(Exception):
                self._client.set_tag(self._run_id, HEARTBEAT_TAG, str(now_ms()))

    def stop(self) -> None:
        """No beat after the run ends (a beat in flight is waited for only briefly: a dead
        store must not hold the process)."""
        self._stopped.set()
        self._thread.join(timeout=JOIN_SECONDS)
