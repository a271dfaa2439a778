"""Orphaned MLflow runs: a run left RUNNING by a process that is gone (``kill -9``, a store that
was down when the run ended). Each run records its host and process (tags ``nnbp.host``,
``nnbp.pid``, ``nnbp.process``); a process on the same host can then tell an orphan from a run
still training, and close it as FAILED (every run does so as it starts, and ``nnbp-close-orphans``
on demand).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import first_line

PROCESS_TAGS = ("nnbp.host", "nnbp.pid", "nnbp.process")


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
    reused after a reboot or by another container apart."""
    pid = os.getpid()
    token = {"boot": _read("/proc/sys/kernel/random/boot_id"), "pidns": _pid_namespace()}
    token["start"] = _started(pid)
    process = " ".join(f"{k}={v}" for k, v in token.items() if v)
    return {"nnbp.host": socket.gethostname(), "nnbp.pid": str(pid), "nnbp.process": process}


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


def close_orphans(client: Any, experiment_id: str, by: str) -> list[Orphan]:
    """Close as FAILED every RUNNING run of ``experiment_id`` whose process is gone (this host
    only); its end time is its last logged metric, a tag says what happened."""
    closed, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], "attributes.status = 'RUNNING'", max_results=1000, page_token=token
        )
        for run in page:
            tags = run.data.tags
            if process_alive(tags) is not False:
                continue
            orphan = Orphan(run.info.run_id, run.info.run_name, tags["nnbp.host"], tags["nnbp.pid"])
            stamps = [m.timestamp for m in client.get_metric_history(orphan.run_id, "loss")]
            end = max([run.info.start_time or 0, *stamps]) or None
            why = (
                f"process {orphan.pid} on {orphan.host} ended without closing this run "
                f"(killed, or the store was unreachable); closed as FAILED by {by}"
            )
            client.set_tag(orphan.run_id, "nnbp.orphaned", why)
            client.set_terminated(orphan.run_id, "FAILED", end_time=end)
            closed.append(orphan)
        token = page.token
        if not token:
            return closed


def orphan_note(orphan: Orphan) -> str:
    return (
        f"note: closed MLflow run '{orphan.name}' ({orphan.run_id[:8]}) as FAILED: its process "
        f"{orphan.pid} on {orphan.host} is gone"
    )


def close_orphan_runs() -> tuple[str, list[Orphan]] | None:
    """``close_orphans`` in the project's experiment of the current store: (its URI, the runs
    closed); None when tracking is off. ``TrackingError`` when the store cannot be used."""
    from .store import TrackingError, check_store, find_experiment, tracking_uri

    uri = tracking_uri()
    if uri is None:
        return None
    check_store(uri)
    try:
        client, experiment_id = find_experiment(uri)
        if experiment_id is None:
            return uri, []
        return uri, close_orphans(client, experiment_id, "nnbp-close-orphans")
    except Exception as e:
        raise TrackingError(f"MLflow store {uri} cannot be used: {first_line(e)}") from None
