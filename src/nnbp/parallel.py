"""Blocks of examples and the threads that run them: the ``n`` examples of a computation are split
into contiguous column blocks (``block_bounds``), each holding its own state, and each phase of
the computation runs once per block (``Blocks.run``), through a ``map_blocks``: ``in_order`` in
the caller's thread, or ``Pool(threads).map`` on several threads, each block on one BLAS thread,
so that what a block computes never depends on how many threads there are.

``Pool(threads).map(fn, count)`` calls ``fn(0) .. fn(count - 1)``, the calling thread taking
blocks too, and returns once all are done. Blocks are handed out one at a time as workers come
free, so a worker slowed by a neighbouring process takes fewer of them; which worker runs a
block changes nothing in the result. Waiting workers sleep on a condition (they never spin):
a machine's other work costs them its share of the cores and no more. NumPy releases the GIL
in its matrix products and ufunc loops, so plain threads run blocks side by side.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")
MapBlocks = Callable[[Callable[[int], object], int], None]  # calls fn(0), ..., fn(count - 1)


def in_order(fn: Callable[[int], object], count: int) -> None:
    """The blocks one after the other, in the caller's thread."""
    for i in range(count):
        fn(i)


def block_bounds(n: int, blocks: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` columns of ``blocks`` contiguous blocks of ``n`` examples, sizes
    differing by one at most (larger first); fewer blocks when ``n < blocks``."""
    count = max(1, min(blocks, n))
    q, r = divmod(n, count)
    stops = np.cumsum([q + 1] * r + [q] * (count - r))
    return [(int(a), int(b)) for a, b in zip([0, *stops[:-1]], stops, strict=True)]


class Blocks(Generic[T]):
    """The states of a computation's blocks, in block order, and the ``map_blocks`` that runs
    each of its phases on all of them."""

    def __init__(self, parts: list[T], map_blocks: MapBlocks = in_order) -> None:
        self.parts = parts
        self.map_blocks = map_blocks

    @classmethod
    def split(
        cls, n: int, blocks: int, make: Callable[[int, int], T], map_blocks: MapBlocks = in_order
    ) -> Blocks[T]:
        """``make(start, stop)`` for each of the ``block_bounds(n, blocks)``."""
        return cls([make(a, b) for a, b in block_bounds(n, blocks)], map_blocks)

    def run(self, phase: Callable[[T], object]) -> None:
        """``phase(part)`` for every block, returning once all are done."""
        parts = self.parts
        self.map_blocks(lambda i: phase(parts[i]), len(parts))

    def __iter__(self) -> Iterator[T]:
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # no affinity on this platform
        return max(os.cpu_count() or 1, 1)


def thread_count(threads: int | str, blocks: int) -> int:
    """``threads`` as a number: ``"auto"`` is the available cores, at most ``blocks``."""
    if threads == "auto":
        return max(1, min(available_cores(), blocks))
    return max(1, min(int(threads), blocks))


class Pool:
    """``threads`` threads (the caller and ``threads - 1`` workers) running blocks; a context
    manager, whose exit stops the workers. BLAS runs on one thread meanwhile. The workers run with
    NumPy's overflow and invalid warnings off: a block's non-finite values are its caller's to
    detect (``nnbp.backprop`` silences the same warnings in the caller's thread)."""

    def __init__(self, threads: int) -> None:
        self.threads = max(int(threads), 1)
        self._cond = threading.Condition()
        self._job: Callable[[int], object] | None = None
        self._count = 0
        self._next = 0  # the next block to hand out
        self._running = 0  # threads inside the current job
        self._generation = 0  # one per job, so that a worker takes part in each job once
        self._error: BaseException | None = None
        self._closed = False
        self._limits = None
        self._workers = [
            threading.Thread(target=self._work, name=f"nnbp-block-{i}", daemon=True)
            for i in range(1, self.threads)
        ]

    def __enter__(self) -> Pool:
        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(1, user_api="blas")  # a block's bits: one BLAS thread
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.join()
        if self._limits is not None:
            self._limits.restore_original_limits()

    def _take(self) -> int | None:
        """The next block of the current job, or None when all are handed out (lock held)."""
        if self._error is not None or self._next >= self._count:
            return None
        self._next += 1
        return self._next - 1

    def _run_blocks(self, job: Callable[[int], object]) -> None:
        """Run blocks of ``job`` until none is left; the lock is held on entry and exit."""
        while (i := self._take()) is not None:
            self._cond.release()
            try:
                job(i)
            except BaseException as e:  # handed to the caller of map
                self._cond.acquire()
                self._error = self._error or e
                continue
            self._cond.acquire()

    def _work(self) -> None:
        # Blocks overflow on the way to a divergence, which their caller detects and reports: the
        # workers silence NumPy's overflow and invalid warnings once, as the caller's thread does
        # around the phases it runs (a block's own context would cost every block a context).
        np.seterr(over="ignore", invalid="ignore")
        seen = 0
        with self._cond:
            while True:
                while self._generation == seen and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                seen = self._generation
                job = self._job
                if job is None:  # woke after its job was over: nothing left to take
                    continue
                self._running += 1
                self._run_blocks(job)
                self._running -= 1
                if self._running == 0:
                    self._cond.notify_all()

    def map(self, fn: Callable[[int], object], count: int) -> None:
        """``fn(i)`` for every block ``i`` of ``count``; the first exception is raised here."""
        if self.threads == 1 or count <= 1:
            return in_order(fn, count)
        with self._cond:
            self._job, self._count, self._next, self._error = fn, count, 0, None
            self._generation += 1
            self._running += 1
            self._cond.notify_all()
            self._run_blocks(fn)
            self._running -= 1
            while self._running:  # the blocks are all handed out: wait for those still running
                self._cond.wait()
            error, self._job = self._error, None
        if error is not None:
            raise error
        return None
