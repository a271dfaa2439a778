"""Reading what MLflow stored, the one way the tests do: every run with its name, status,
params, tags and metric steps, from a SQLite store read directly (no MLflow import, and safe
while a stage writes to it) or from a tracking server's REST API (``tests.servers.Api``)."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnbp.tooling.tracking.store import EXPERIMENT


@dataclass
class Run:
    run_id: str
    name: str
    status: str
    start_time: int
    end_time: int | None = None
    artifact_uri: str = ""
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    steps: dict[str, list[int]] = field(default_factory=dict)  # metric -> its steps, sorted

    @property
    def config(self) -> str:
        """The configuration it trained (its param ``config``), else its name's first word."""
        return self.params.get("config") or self.name.split(" (")[0]


def runs(db: Path | str) -> list[Run]:
    """Every run of the SQLite store ``db`` (its path or its ``sqlite:///`` URI), oldest first;
    none while the store is being made or is locked for longer than 5 s.

    Opened for writing (never created), as any client opens it: a server killed inside a write
    leaves a hot journal, which the next connection rolls back; a read-only one cannot, and
    reads nothing."""
    db = Path(str(db).removeprefix("sqlite:///"))
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=5) as con:
            found = {
                run_id: Run(run_id, name, status, start or 0, end, uri)
                for run_id, name, status, start, end, uri in con.execute(
                    "SELECT run_uuid, name, status, start_time, end_time, artifact_uri FROM runs"
                    " ORDER BY start_time"
                )
            }
            for table, attr in (("params", "params"), ("tags", "tags")):
                for run_id, key, value in con.execute(f"SELECT run_uuid, key, value FROM {table}"):
                    if run_id in found:
                        getattr(found[run_id], attr)[key] = value
            for run_id, key, step in con.execute("SELECT run_uuid, key, step FROM metrics"):
                if run_id in found:
                    found[run_id].steps.setdefault(key, []).append(step)
    except sqlite3.Error:  # no tables yet, or locked
        return []
    for run in found.values():
        run.steps = {k: sorted(v) for k, v in run.steps.items()}
    return list(found.values())


def committed_copy(db: Path, copy: Path) -> Path:
    """``copy``: the SQLite store ``db`` as it was last committed, for ``runs`` to read while
    no process can write it (a server killed, or stopped in the middle of a write and holding
    its lock): the file and its journal copied together, which SQLite rolls back on opening, as
    after a crash."""
    for suffix in ("", "-journal", "-wal"):
        source = db.with_name(db.name + suffix)
        if source.exists():
            shutil.copyfile(source, copy.with_name(copy.name + suffix))
    return copy


def statuses(db: Path | str) -> list[str]:
    """The status of every run of the SQLite store ``db``, oldest first."""
    return [run.status for run in runs(db)]


def server_runs(api: Any, filter_string: str = "") -> list[Run]:
    """Every run of the project's experiment on a tracking server, through its REST API (those
    ``filter_string`` selects, in MLflow's search syntax, if given)."""
    lookup = api.request("experiments/get-by-name", experiment_name=EXPERIMENT)
    if api.status(lookup) == 404:  # no run has made it yet
        return []
    experiment = api.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    body = {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000}
    if filter_string:
        body["filter"] = filter_string
    found = []
    for raw in api.post("runs/search", body).get("runs", []):
        info, data = raw["info"], raw["data"]
        end = int(info["end_time"]) if info.get("end_time") else None
        run = Run(info["run_id"], info["run_name"], info["status"], int(info["start_time"]), end)
        run.artifact_uri = info.get("artifact_uri", "")
        run.params = {p["key"]: p["value"] for p in data.get("params", [])}
        run.tags = {t["key"]: t["value"] for t in data.get("tags", [])}
        found.append(run)
    return sorted(found, key=lambda r: r.start_time)


def by_config(found: list[Run]) -> dict[str, Run]:
    """The runs by configuration (the last run of each)."""
    return {run.config: run for run in found}


def wait_for_training(db: Path, proc: subprocess.Popen, timeout: float = 120) -> Run:
    """Wait until a RUNNING run of ``db`` has logged a metric (training has begun); that run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the stage ended early: {proc.communicate()}")
        for run in runs(db):
            if run.status == "RUNNING" and run.steps:
                return run
        time.sleep(0.2)
    raise AssertionError("training did not start in time")


def init_store(db: Path) -> None:
    """An MLflow SQLite store (its tables) with the project's experiment, artifacts beside it,
    so that a stage's first use of it prints nothing."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    client.create_experiment(EXPERIMENT, artifact_location=(db.parent / "artifacts").as_uri())
