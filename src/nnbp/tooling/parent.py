"""A stage ends with the DVC process that runs it.

Killing `dvc repro` with SIGTERM does not reach its stage: DVC dies at once, and the stage used
to train on for minutes and write outputs that DVC never recorded. ``end_with_dvc`` makes the
kernel send the stage SIGTERM when its parent dies (Linux's ``PR_SET_PDEATHSIG``); the stage then
stops as it does for any SIGTERM: nothing half-written, its MLflow run KILLED.

DVC runs a command as ``$SHELL -c CMD``. bash replaces itself with the last command, so the stage's
parent is DVC; dash (``/bin/sh`` on Debian, DVC's default without ``$SHELL``) does not, so the
parent is a shell that outlives DVC. In that case a thread also watches DVC itself, the shell's
parent, through a pidfd (no polling), and sends the stage SIGTERM when DVC ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2 :].split()[1])  # the field after the state


def _terminate_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _set_parent_death_signal(signum: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(pid: int, shell: int) -> None:
    """SIGTERM to this process when ``pid`` ends (or already has: the shell was re-parented)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        _terminate_self()
        return
    except OSError:
        return  # no pidfd (kernel < 5.3): the death signal of the direct parent still holds
    with contextlib.suppress(OSError):
        if _parent_of(shell) != pid:  # DVC ended before the pidfd was open
            _terminate_self()
            return
    select.select([fd], [], [])  # readable when the process has ended
    _terminate_self()


def dvc_process() -> tuple[int, int | None]:
    """(the stage's parent, and DVC's pid when that parent is the shell DVC started, else None)."""
    parent = os.getppid()
    shell = os.environ.get("SHELL") or "/bin/sh"  # what DVC runs commands with
    with contextlib.suppress(OSError, ValueError, IndexError):
        argv = _cmdline(parent)
        if argv and argv[0] == shell and "-c" in argv[1:]:
            return parent, _parent_of(parent)
    return parent, None


def end_with_dvc() -> None:
    """Under DVC (``DVC_STAGE`` set), get SIGTERM when DVC ends; elsewhere do nothing: a stage
    run by hand may outlive its shell (``nohup``), as any program does."""
    if not os.environ.get("DVC_STAGE") or not sys.platform.startswith("linux"):
        return
    parent, dvc = dvc_process()
    if not _set_parent_death_signal(signal.SIGTERM):
        return
    if os.getppid() != parent:  # the parent died before the death signal was set
        _terminate_self()
        return
    if dvc is not None:
        watcher = threading.Thread(target=_watch, args=(dvc, parent), daemon=True)
        watcher.start()
