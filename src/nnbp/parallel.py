"""Blocks of examples and the threads that run them: the ``n`` examples of a computation are split
into contiguous column blocks (``block_bounds``), each holding its own state, and each phase of
the computation runs once per block (``Blocks.run``), through a ``map_blocks``: ``in_order`` in
the caller's thread, or ``Pool(threads).map`` on several threads, each block on one BLAS thread,
so that what a block computes never depends on how many threads there are.

``Pool(threads).map(fn, count)`` calls ``fn(0) .. fn(count - 1)``, the calling thread taking
blocks too, and returns once all are done. Blocks are handed out one at a time as workers come
free, so a worker slowed by a neighbouring process takes fewer of them; which worker runs a
block changes nothing in the result. Waiting workers sleep on a lock (they never spin): a
machine's other work costs them its share of the cores and no more. NumPy releases the GIL
in its matrix products and ufunc loops, so plain threads run blocks side by side.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Schedule:
    """How a computation runs its examples: in ``blocks`` blocks (on which its last bits
    depend), each phase through ``map_blocks`` (on which they do not)."""

    blocks: int = 1
    map_blocks: MapBlocks = in_order


ONE_BLOCK = Schedule()


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


class _Job:
    """One ``map``: its function, its blocks (a counter whose ``next`` is atomic under the GIL
    hands each out once), a second counter of the blocks finished, and the errors raised."""

    def __init__(self, fn: Callable[[int], object], count: int) -> None:
        self.fn, self.count = fn, count
        self.blocks = itertools.count()
        self.finished = itertools.count(1)
        self.errors: list[BaseException] = []


class Pool:
    """``threads`` threads (the caller and ``threads - 1`` workers) running blocks; a context
    manager, whose exit stops the workers. BLAS runs on one thread meanwhile. The workers run with
    NumPy's overflow and invalid warnings off: a block's non-finite values are its caller's to
    detect (``nnbp.backprop`` silences the same warnings in the caller's thread).

    A phase costs each worker one wake-up, on a lock of its own, and the caller at most one wait,
    for the blocks still running when it runs out of blocks: whoever finishes the last block
    releases the caller. A worker that wakes late finds no block left and goes back to sleep; the
    caller never waits for it. A ``map`` left by an exception raised in the caller's thread while
    it waits (a KeyboardInterrupt) leaves the pool fit only to be closed."""

    def __init__(self, threads: int) -> None:
        self.threads = max(int(threads), 1)
        self._job = _Job(in_order, 0)
        self._closed = False
        self._limits = None
        # go[i] is held unless a wake-up is pending for worker i; only the caller releases it.
        self._go = [threading.Lock() for _ in range(1, self.threads)]
        for go in self._go:
            go.acquire()
        self._all_done = threading.Lock()  # released by whoever finishes a job's last block
        self._all_done.acquire()
        self._workers = [
            threading.Thread(target=self._work, args=(go,), name=f"nnbp-block-{i}", daemon=True)
            for i, go in enumerate(self._go, start=1)
        ]

    def __enter__(self) -> Pool:
        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(1, user_api="blas")  # a block's bits: one BLAS thread
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._wake()
        for worker in self._workers:
            worker.join()
        if self._limits is not None:
            self._limits.restore_original_limits()

    def _wake(self) -> None:
        for go in self._go:
            if go.locked():  # else a wake-up is pending: the worker will see the current job
                go.release()

    def _run(self, job: _Job) -> None:
        """Run blocks of ``job`` until none is left (after an error, only count them)."""
        while (i := next(job.blocks)) < job.count:
            if not job.errors:
                try:
                    job.fn(i)
                except BaseException as e:  # handed to the caller of map
                    job.errors.append(e)
            if next(job.finished) == job.count:
                self._all_done.release()

    def _work(self, go: threading.Lock) -> None:
        # Blocks overflow on the way to a divergence, which their caller detects and reports: the
        # workers silence NumPy's overflow and invalid warnings once, as the caller's thread does
        # around the phases it runs (a block's own context would cost every block a context).
        np.seterr(over="ignore", invalid="ignore")
        while True:
            go.acquire()
            if self._closed:
                return
            self._run(self._job)  # one read: the job as a whole, never half of the next one

    def map(self, fn: Callable[[int], object], count: int) -> None:
        """``fn(i)`` for every block ``i`` of ``count``; the first exception is raised here."""
        if self.threads == 1 or count <= 1:
            return in_order(fn, count)
        job = self._job = _Job(fn, count)
        self._wake()
        self._run(job)
        self._all_done.acquire()  # every block finished
        if job.errors:
            raise job.errors[0]
        return None
