"""A command that dies with the process that started it: ``python -m nnbp.tooling.guard PID --
CMD ...`` runs CMD and, the moment process PID ends, kills CMD and everything it started with
SIGKILL; otherwise it exits with CMD's status.

Why: a Dask worker runs an experiment as ``dvc exp run`` (whose stage trains in a grandchild)
and ``dvc exp push``. When the worker dies (kill -9, out of memory, its machine lost), Dask runs
the task again on another worker; the processes the dead one started must not live on, or an
orphaned ``dvc exp run`` would finish and its experiment be pushed and logged a second time.
The kernel's parent-death signal reaches only the direct child, and DVC's stage only through
DVC, so the guard watches the worker itself (a pidfd: no polling) and kills its own process
group, which the caller makes new (``start_new_session``), and every descendant it can see.
Nothing is left to close the MLflow run, as when a machine dies: it stays RUNNING until the pid
check on this host or its stopped heartbeat elsewhere closes it as FAILED (``tracking.orphans``).

Run it with ``python -E`` so that the command's PYTHONPATH does not choose the guard's code.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time

KILLED = 128 + signal.SIGKILL  # the status a shell reports for a command killed by SIGKILL


def _open(pid: int) -> int | None:
    """A pidfd of process ``pid``; None without pidfds (not Linux, or a kernel before 5.3).
    ``ProcessLookupError`` if it has ended."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise
    except (OSError, AttributeError):
        return None


def _wait_for_end(pidfd: int | None, pid: int) -> None:
    """Return when process ``pid`` (this process's parent, ``pidfd`` if there is one) ends."""
    if pidfd is None:
        while os.getppid() == pid:
            time.sleep(0.5)
    else:
        select.select([pidfd], [], [])  # readable once the process has ended


def _watch(pidfd: int | None, pid: int) -> None:
    """When process ``pid`` ends, SIGKILL to every descendant, then to this process group (this
    process included)."""
    import psutil  # now, while the command runs: the kill must not wait for an import

    _wait_for_end(pidfd, pid)
    with contextlib.suppress(psutil.Error):
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                process.kill()
    os.killpg(os.getpgrp(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: python -E -m nnbp.tooling.guard PID -- CMD [ARG...]", file=sys.stderr)
        return 2
    watched, command = int(argv[0]), argv[2:]
    try:
        pidfd = _open(watched)
    except ProcessLookupError:
        return KILLED
    if os.getppid() != watched:  # PID ended before the guard could watch it: run nothing
        return KILLED
    child = subprocess.Popen(command)
    watcher = threading.Thread(target=_watch, args=(pidfd, watched), daemon=True)
    watcher.start()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
