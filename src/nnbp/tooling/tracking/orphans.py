"""Orphaned MLflow runs: a run left RUNNING by a process that is gone (``kill -9``, a machine
that died, a store that was down when the run ended). Each run records its host and process
(tags ``nnbp.host``, ``nnbp.pid``, ``nnbp.process``) and keeps a heartbeat (``heartbeat``). A
process on the same host tells an orphan from a run still training by its pid; from any other
machine, by a heartbeat older than the timeout. Either closes it as FAILED, saying why (every run
does so as it starts, and ``nnbp-close-orphans`` on demand).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import first_line
from .heartbeat import HEARTBEAT_TAG, MACHINE_TAG, last_beat, machine, now_ms, timeout

PROCESS_TAGS = ("nnbp.host", "nnbp.pid", "nnbp.process", MACHINE_TAG, HEARTBEAT_TAG)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), None if there is no such process."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]  # field 22, starttime


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def process_tags() -> dict[str, str]:
    """Tags naming this process so that another one can later tell whether it still runs: its
    host and pid, and (on Linux) its boot, pid namespace and start time, which tell a pid
    reused after a reboot or by another container apart; its machine, and a first heartbeat."""
    pid = os.getpid()
    token = {"boot": _read("/proc/sys/kernel/random/boot_id"), "pidns": _pid_namespace()}
    token["start"] = _started(pid)
    process = " ".join(f"{k}={v}" for k, v in token.items() if v)
    return {
        "nnbp.host": socket.gethostname(),
        "nnbp.pid": str(pid),
        "nnbp.process": process,
        MACHINE_TAG: machine(),
        HEARTBEAT_TAG: str(now_ms()),
    }


def process_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the process that ``tags`` (``process_tags``) name still runs; None when this
    process cannot tell (another host or container, or no such tags)."""
    host, pid = tags.get("nnbp.host"), tags.get("nnbp.pid", "")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    then = dict(kv.split("=", 1) for kv in tags.get("nnbp.process", "").split() if "=" in kv)
    if then.get("pidns") != _pid_namespace():
        return None  # the same host name, another pid namespace: its pids mean nothing here
    if "boot" in then and then["boot"] != _read("/proc/sys/kernel/random/boot_id"):
        return False  # the machine rebooted since
    if "start" in then:
        return _started(int(pid)) == then["start"]  # None (gone) or another process
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Orphan:
    run_id: str
    name: str
    host: str
    pid: str
    machine: str = "?"
    silent: float | None = None  # seconds without a heartbeat; None: its process is gone


def _why(tags: Mapping[str, str], stale_after: float, now: int) -> tuple[str, float | None] | None:
    """Why a RUNNING run is an orphan (and its heartbeat's age, if that tells), or None if it
    may still be training: its process, when this host can see it; else its heartbeat."""
    alive = process_alive(tags)
    where = f"process {tags.get('nnbp.pid', '?')} on {tags.get('nnbp.host', '?')}"
    if alive is False:
        return (
            f"{where} ended without closing this run (killed, or the store was unreachable)",
            None,
        )
    beat = last_beat(tags)
    if alive is None and beat is not None and (now - beat) / 1000 > stale_after:
        silent = (now - beat) / 1000
        return (
            f"no heartbeat from machine {tags.get(MACHINE_TAG, '?')} ({where}) for "
            f"{silent:.0f} s, more than the {stale_after:g} s allowed (NNBP_HEARTBEAT_TIMEOUT): "
            "its machine died or lost the store"
        ), silent
    return None


def close_orphans(client: Any, experiment_id: str, by: str, stale_after: float) -> list[Orphan]:
    """Close as FAILED every RUNNING run of ``experiment_id`` whose process is gone (this host)
    or whose heartbeat is older than ``stale_after`` seconds (another host); its end time is its
    last sign of life, the tag ``nnbp.orphaned`` says what happened."""
    closed, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], "attributes.status = 'RUNNING'", max_results=1000, page_token=token
        )
        for run in page:
            tags = run.data.tags
            found = _why(tags, stale_after, now_ms())
            if found is None:
                continue
            why, silent = found
            orphan = Orphan(
                run.info.run_id,
                run.info.run_name,
                tags.get("nnbp.host", "?"),
                tags.get("nnbp.pid", "?"),
                tags.get(MACHINE_TAG, "?"),
                silent,
            )
            stamps = [m.timestamp for m in client.get_metric_history(orphan.run_id, "loss")]
            end = max([run.info.start_time or 0, last_beat(tags) or 0, *stamps]) or None
            client.set_tag(orphan.run_id, "nnbp.orphaned", f"{why}; closed as FAILED by {by}")
            client.set_terminated(orphan.run_id, "FAILED", end_time=end)
            closed.append(orphan)
        token = page.token
        if not token:
            return closed


def orphan_note(orphan: Orphan) -> str:
    what = f"its process {orphan.pid} on {orphan.host}"
    if orphan.silent is None:
        why = f"{what} is gone"
    else:
        why = f"no heartbeat from machine {orphan.machine} ({what}) for {orphan.silent:.0f} s"
    return f"note: closed MLflow run '{orphan.name}' ({orphan.run_id[:8]}) as FAILED: {why}"


def close_orphan_runs() -> tuple[str, list[Orphan]] | None:
    """``close_orphans`` in the project's experiment of the current store: (its URI, the runs
    closed); None when tracking is off. ``TrackingError`` when the store cannot be used."""
    from .store import TrackingError, check_store, find_experiment, tracking_uri

    uri = tracking_uri()
    if uri is None:
        return None
    stale_after = timeout()  # a bad NNBP_HEARTBEAT_TIMEOUT is one line before any request
    check_store(uri)
    try:
        client, experiment_id = find_experiment(uri)
        if experiment_id is None:
            return uri, []
        return uri, close_orphans(
            client, experiment_id, f"nnbp-close-orphans on {machine()}", stale_after
        )
    except Exception as e:
        raise TrackingError(f"MLflow store {uri} cannot be used: {first_line(e)}") from None
