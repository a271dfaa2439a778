"""Retrying a tracking call that failed for a moment (a SQLite file locked by a parallel writer, a
server restarting or overloaded), and the time budgets that bound every tracking call.

What is transient is decided by the error's type and status code, never by words in its message
(a run id or a path can hold "503").

The budgets (docs/faults.md says what they mean for a stage):

- ``REQUEST_SECONDS``: one HTTP request to a tracking server (MLflow's
  ``MLFLOW_HTTP_REQUEST_TIMEOUT``; MLflow's own retries are off, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``
  0: ours below are the only ones). A SQLite store waits up to 20 s for a lock (MLflow's busy
  timeout) instead.
- ``CALL_SECONDS``: one call, its retries included: no attempt starts after it.
- ``START_SECONDS``: opening a run, all of its calls (the store's check, its experiment, the
  orphans, the run and its params), on a tracking server; ``LOCAL_START_SECONDS`` on a database
  the stage opens itself (``start_seconds``), where no server can freeze and the first run makes
  the store's tables while parallel writers wait for its lock.
- ``END_SECONDS``: all that a run still sends once training has ended (its model, artifacts,
  figures, the metrics live logging could not send, its status).
- ``KILL_SECONDS``: a run's KILLED status after a signal (the stage exits within 10 s).

An attempt in flight at a deadline may overrun it by one request; the caller who waits does not
wait for it (``nnbp.tooling.tracking.sender``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ...errors import first_line

# SQLite's "the database is busy / a table is locked": a parallel writer holds the lock.
SQLITE_TRANSIENT = ("SQLITE_BUSY", "SQLITE_LOCKED")
# HTTP statuses of a server restarting, overloaded or behind a restarting proxy (as MLflow's own
# client retries them), and of an MLflow store that reports a database error (503).
HTTP_TRANSIENT = frozenset({408, 429, 502, 503, 504})
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)  # seconds between attempts, while the call's budget lasts

REQUEST_SECONDS = 5
CALL_SECONDS = 30.0  # above a SQLite lock's 20 s, so that a second attempt fits
START_SECONDS = 30.0
# MLflow's migrations of a new SQLite store: 10 to 20 s each, one writer at a time (four writers
# on a loaded 2-core machine were seen to need more than 30 s).
LOCAL_START_SECONDS = 120.0
END_SECONDS = 10.0  # to a local server, a run's end takes 0.5 to 1.2 s (measured)
KILL_SECONDS = 2.0


def start_seconds(uri: str) -> float:
    """The budget of opening a run on the store ``uri``."""
    return START_SECONDS if uri.startswith(("http://", "https://")) else LOCAL_START_SECONDS


class OutOfTime(TimeoutError):
    """A tracking call's budget was used up before it could succeed."""


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _network_errors() -> tuple[type[BaseException], ...]:
    import requests

    return (
        ConnectionError,
        TimeoutError,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.RetryError,  # urllib3 gave up on transient statuses
    )


def is_transient(e: BaseException) -> bool:
    """Whether ``e``, from an MLflow call, is worth retrying: a locked SQLite store, a connection
    refused, reset or timed out, or an HTTP status of a server that is restarting or busy. A
    SQLite error decides by its own code (a read-only database is not transient, though MLflow
    reports every database error as 503)."""
    network = _network_errors()
    for cause in _chain(e):
        if isinstance(cause, sqlite3.OperationalError):
            return getattr(cause, "sqlite_errorname", None) in SQLITE_TRANSIENT
        if isinstance(cause, network):
            return True
    from mlflow.exceptions import MlflowException

    return isinstance(e, MlflowException) and e.get_http_status_code() in HTTP_TRANSIENT


def describe(e: BaseException) -> str:
    """``e`` in a few words for a warning line: a network error by what happened (MLflow's own
    message repeats the URL and urllib3's retry state), anything else by its first line."""
    if isinstance(e, OutOfTime):
        return str(e)
    import requests

    chain = list(_chain(e))
    if any(isinstance(cause, ConnectionRefusedError) for cause in chain):
        return "connection refused"
    if any(isinstance(cause, TimeoutError | requests.exceptions.Timeout) for cause in chain):
        return f"no answer within {REQUEST_SECONDS} s"
    return first_line(e)


def retrying(
    fn: Callable[..., Any],
    *args: Any,
    delays: tuple[float, ...] | None = None,
    deadline: float | None = None,
    cancel: threading.Event | None = None,
    **kwargs: Any,
) -> Any:
    """``fn(*args, **kwargs)``, retried after each of ``delays`` seconds on a transient error,
    as long as the next attempt would start before ``deadline`` (``time.monotonic()``; by
    default ``CALL_SECONDS`` from now). ``cancel`` set ends the pauses, and the retries, at once.
    ``OutOfTime`` if the deadline passed before the first attempt."""
    if deadline is None:
        deadline = time.monotonic() + CALL_SECONDS
    if time.monotonic() >= deadline:
        raise OutOfTime("not attempted: its time was used up")
    for delay in (*(RETRY_DELAYS if delays is None else delays), None):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if delay is None or not is_transient(e) or time.monotonic() + delay >= deadline:
                raise
            if cancel is not None and cancel.wait(delay):
                raise
            if cancel is None:
                time.sleep(delay)
    raise AssertionError("unreachable")
