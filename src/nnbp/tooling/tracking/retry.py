"""Retrying a tracking call that failed for a moment: a SQLite file locked by a parallel writer,
a server restarting or overloaded. What is transient is decided by the error's type and status
code, never by words in its message (a run id or a path can hold "503")."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

# SQLite's "the database is busy / a table is locked": a parallel writer holds the lock.
SQLITE_TRANSIENT = ("SQLITE_BUSY", "SQLITE_LOCKED")
# HTTP statuses of a server restarting, overloaded or behind a restarting proxy (as MLflow's own
# client retries them), and of an MLflow store that reports a database error (503).
HTTP_TRANSIENT = frozenset({408, 429, 502, 503, 504})
RETRY_DELAYS = (1.0, 2.0, 4.0)  # seconds: 7 s of pauses in all


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


def retrying(
    fn: Callable[..., Any], *args: Any, delays: tuple[float, ...] | None = None, **kwargs: Any
) -> Any:
    """``fn(*args, **kwargs)``, retried after each of ``delays`` seconds on a transient error."""
    for delay in (*(RETRY_DELAYS if delays is None else delays), None):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if delay is None or not is_transient(e):
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")
