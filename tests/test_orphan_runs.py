"""Issue 11, finding 2: no MLflow run stays RUNNING once its process is gone, and a locked store
costs one line, not a SQLAlchemy traceback.

The stage scripts run as processes against a real SQLite store; a run is orphaned the way it
happens (`kill -9`), and closed by the next training run or by `nnbp-close-orphans`,
while a run whose process still trains is left alone. (A tracking server dying mid-run is in
test_tracking_server.py.)
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.params import changed_params
from tests.project import close_orphans, error_lines, run_stage, stage_cmd, tracked_env
from tests.store import runs

# A configuration that trains until stopped, logging every 1,000 iterations.
LONG = {"hidden": [25], "iters": 1_000_000, "log_every": 1000}


@pytest.fixture(scope="module")
def workspace(workspace: Path) -> Iterator[Path]:
    """The shared workspace with the configuration ``long`` besides h25, as it was after."""
    with changed_params(workspace, {"configs.long": LONG}):
        yield workspace


@pytest.fixture
def store(mlflow_uri: str) -> tuple[Path, str]:
    return Path(mlflow_uri.removeprefix("sqlite:///")), mlflow_uri


def _long_training(workspace: Path, uri: str, out: Path) -> subprocess.Popen:
    """A training process of ``long``, writing into ``out`` if it ever ends."""
    return subprocess.Popen(
        stage_cmd("train", "long", "--models", str(out), "--histories", str(out)),
        cwd=workspace,
        env=tracked_env(uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _running_with_metrics(db: Path, known: set[str], proc: subprocess.Popen) -> str:
    """The id of the new run (not in ``known``) once it has logged a metric."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for run in runs(db):
            if run.run_id not in known and run.status == "RUNNING" and run.steps:
                return run.run_id
        time.sleep(0.2)
    raise AssertionError("training did not start in time")


def _statuses(db: Path) -> dict[str, str]:
    return {run.run_id: run.status for run in runs(db)}


def _tags(db: Path, run_id: str) -> dict[str, str]:
    return next(run.tags for run in runs(db) if run.run_id == run_id)


def _kill_9(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.communicate(timeout=60)


@pytest.fixture
def trainings():
    """Training processes a test starts; any still running at the end is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)


def test_a_run_killed_with_sigkill_is_closed_by_the_next_run_not_a_live_one(
    workspace: Path, tmp_path: Path, store, trainings
):
    db, uri = store
    live = _long_training(workspace, uri, tmp_path / "live")
    trainings.append(live)
    live_run = _running_with_metrics(db, set(), live)
    dead = _long_training(workspace, uri, tmp_path / "dead")
    trainings.append(dead)
    dead_run = _running_with_metrics(db, {live_run}, dead)
    _kill_9(dead)
    assert _statuses(db) == {dead_run: "RUNNING", live_run: "RUNNING"}

    proc = run_stage("train", "h25", cwd=workspace, env=tracked_env(uri))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    note = f"note: closed MLflow run 'long' ({dead_run[:8]}) as FAILED: its process {dead.pid} on "
    assert note in proc.stdout, proc.stdout
    statuses = _statuses(db)
    assert statuses.pop(dead_run) == "FAILED"
    assert statuses.pop(live_run) == "RUNNING", "a run still training was closed"
    assert list(statuses.values()) == ["FINISHED"]
    assert "ended without closing this run" in _tags(db, dead_run)["nnbp.orphaned"]

    live.send_signal(signal.SIGTERM)
    live.communicate(timeout=60)
    assert _statuses(db)[live_run] == "KILLED"


def test_nnbp_close_orphans_closes_a_killed_run_and_says_so(
    workspace: Path, tmp_path: Path, store, trainings
):
    db, uri = store
    dead = _long_training(workspace, uri, tmp_path / "dead")
    trainings.append(dead)
    dead_run = _running_with_metrics(db, set(), dead)
    _kill_9(dead)
    proc = close_orphans(workspace, uri)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"note: closed MLflow run 'long' ({dead_run[:8]}) as FAILED: its process {dead.pid} on "
        f"{_tags(db, dead_run)['nnbp.host']} is gone"
    ]
    assert _statuses(db) == {dead_run: "FAILED"}
    again = close_orphans(workspace, uri)
    assert again.stdout == f"{uri}: no orphaned run\n"


def test_a_store_locked_mid_run_is_one_warning_line_and_the_run_still_closes(
    workspace: Path, tmp_path: Path, store, trainings
):
    """An exclusive lock on mlflow.db while training logs: MLflow's own logger printed the whole
    SQLAlchemy traceback. Now one line; once the lock is gone the run closes, and the points
    that could not be logged live are sent again: its history has no gap."""
    db, uri = store
    proc = _long_training(workspace, uri, tmp_path / "locked")
    trainings.append(proc)
    run_id = _running_with_metrics(db, set(), proc)
    lock = sqlite3.connect(db, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        line = proc.stderr.readline()  # blocks until the stage reports the failure
    finally:
        lock.execute("COMMIT")
        lock.close()
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    assert line.startswith("warning: MLflow logging failed ("), line
    assert "database is locked" in line
    assert error_lines(rest) == ["terminated (SIGTERM): stopped; no output is half-written"], rest
    assert _statuses(db) == {run_id: "KILLED"}
    steps = next(run.steps["loss"] for run in runs(db) if run.run_id == run_id)
    assert len(steps) >= 2 and steps == list(range(0, steps[-1] + 1, 1000)), steps
