"""A run's tracking calls, made in order by one thread of its own, each within a deadline.

The stage's main thread hands every MLflow call to this thread and never makes one itself: a
signal never lands inside an MLflow, SQLAlchemy or HTTP call (whose client the cleanup would then
reuse), training never waits for the store, and where the main thread does wait (a run opening,
a run ending) it waits until a deadline at most, while watching for a signal (``stop_check``).
A call still in flight at its deadline is left to finish or fail alone (the thread is a daemon),
and named as not sent.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .retry import CALL_SECONDS, OutOfTime, describe

POLL_SECONDS = 0.1  # how often a waiting main thread looks for a signal


class Unsent(Exception):
    """``Unsent(what, why)``: what a call could not send, and why, in words for the run's
    warning line."""


class Call:
    """One call handed to the sender: ``fn(*args, deadline=..., cancel=...)``, what it sends
    (``label``, for a warning), and once ``done``, its ``value`` or its ``error``."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], label: str, seconds: float):
        self.fn, self.args, self.label, self.seconds = fn, args, label, seconds
        self.submitted = time.monotonic()
        self.deadline = self.submitted + seconds
        self.cancel = threading.Event()  # set: no more retries, no more pauses
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def failure(self) -> tuple[str, str] | None:
        """(what this call did not send, why), in words; None if it sent it."""
        if not self.done.is_set():
            return self.label, f"no answer after {time.monotonic() - self.submitted:.0f} s"
        if self.error is None:
            return None
        if isinstance(self.error, Unsent):
            what, why = self.error.args
            return what, why
        return self.label, describe(self.error)


class Sender:
    """The thread that makes a run's calls, in the order they were handed to it."""

    def __init__(self) -> None:
        self._queue: collections.deque[Call] = collections.deque()
        self._ready = threading.Condition()
        self._current: Call | None = None
        self._closed = False
        self._cap = math.inf  # no attempt starts after it (the run's end)
        self._thread = threading.Thread(target=self._loop, name="nnbp-tracking", daemon=True)
        self._thread.start()

    def submit(
        self, fn: Callable[..., Any], *args: Any, label: str = "", seconds: float = CALL_SECONDS
    ) -> Call:
        """Queue ``fn(*args, deadline=..., cancel=...)``, its budget ``seconds`` from now."""
        call = Call(fn, args, label, seconds)
        with self._ready:
            self._queue.append(call)
            self._ready.notify()
        return call

    def cap(self, deadline: float) -> None:
        """From now on, no call makes an attempt after ``deadline`` (``time.monotonic()``)."""
        self._cap = min(self._cap, deadline)

    def drop_pending(self, why: str) -> None:
        """Give up the calls not started yet (``why``), and the retries of the one in flight."""
        with self._ready:
            dropped = list(self._queue)
            self._queue.clear()
            if self._current is not None:
                self._current.cancel.set()
        for call in dropped:
            call.error = OutOfTime(why)
            call.done.set()

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                call = self._current = self._queue.popleft()
            try:
                deadline = min(call.deadline, self._cap)
                call.value = call.fn(*call.args, deadline=deadline, cancel=call.cancel)
            except BaseException as e:  # reported by whoever looks at the call
                call.error = e
            finally:
                with self._ready:
                    self._current = None
                call.done.set()

    @staticmethod
    def wait(
        calls: Iterable[Call], until: float, stop_check: Callable[[], None] | None = None
    ) -> bool:
        """Wait until every call of ``calls`` is done, or until ``until``; whether they all are.
        ``stop_check`` is called meanwhile, and may raise to stop the wait."""
        for call in calls:
            while not call.done.wait(max(0.0, min(POLL_SECONDS, until - time.monotonic()))):
                if stop_check is not None:
                    stop_check()
                if time.monotonic() >= until:
                    return False
        return True

    def close(self, until: float) -> None:
        """Take no more calls; the thread ends once the queue is done, and is waited for until
        ``until`` at most (a call stuck on a store that does not answer is left behind)."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(max(0.0, until - time.monotonic()))
