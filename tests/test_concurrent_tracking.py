"""Runs land in MLflow complete with parallel writers and a store that is locked for a while.

Real SQLite stores, real processes: several writers logging to one file at once, and another
process holding the database's exclusive lock (what a long write of a sibling does).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nnbp.tooling.tracking import retry
from nnbp.tooling.tracking.run import Run
from tests.project import tracked_env
from tests.servers import free_port, start_server
from tests.store import runs

POINTS = 30
WRITER = textwrap.dedent(
    """
    import sys
    from nnbp.tooling.tracking.run import Run
    name, points = sys.argv[1], int(sys.argv[2])
    run = Run.start(name, {"writer": name})
    for step in range(points):
        run.log_metrics({"loss": 1 / (step + 1), "train_acc": step, "test_acc": step}, step)
    run.end("FINISHED")
    """
)


def _runs(db: Path) -> dict[str, tuple[str, dict[str, list[int]]]]:
    """configuration -> (status, metric key -> its steps) of every run in the store."""
    return {run.config: (run.status, run.steps) for run in runs(db)}


def _env(db: Path) -> dict[str, str]:
    return tracked_env(f"sqlite:///{db}")


@pytest.mark.slow
def test_parallel_writers_on_a_new_store_all_land_finished_and_complete(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, f"w{i}", str(POINTS)],
            env=_env(db),
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    errors = [w.communicate(timeout=300)[1] for w in writers]
    assert [w.returncode for w in writers] == [0] * 4, errors
    runs = _runs(db)
    assert sorted(runs) == ["w0", "w1", "w2", "w3"]
    for status, steps in runs.values():
        assert status == "FINISHED"
        assert steps == {k: list(range(POINTS)) for k in ("loss", "train_acc", "test_acc")}


def _lock(db: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the store's exclusive lock for ``seconds``."""
    code = (
        "import sqlite3, sys, time; con = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "con.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); "
        "time.sleep(float(sys.argv[2])); con.execute('COMMIT')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(db), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("NNBP_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    Run.start("warm-up", {}).end()  # the tables exist before anything is locked
    return db


@pytest.mark.slow
def test_a_store_locked_past_sqlites_timeout_is_retried_and_nothing_is_lost(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = Run.start("locked", {"x": 1})
    locker = _lock(store, 24)  # beyond MLflow's 20 s busy timeout: it raises "database is locked"
    start = time.monotonic()
    run.log_metrics({"loss": 0.5}, step=0)  # sent by the run's own thread
    assert run.flush(60)
    assert time.monotonic() - start > 20  # it did meet the lock, and waited past its error
    locker.wait()
    run.log_metrics({"loss": 0.25}, step=1)
    run.end()
    assert "warning" not in capsys.readouterr().err  # retried, not given up
    assert _runs(store)["locked"] == ("FINISHED", {"loss": [0, 1]})


def _server(store: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:``port`` over the SQLite file ``store``, healthy."""
    return start_server(store.parent, f"sqlite:///{store}", port)[0]


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_run_stopped_while_its_end_waits_names_only_what_it_lost(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A signal while the run's end waits for a locked store (a metric in flight, the FINISHED
    status queued behind it): KILLED replaces FINISHED and, the store answering again, goes
    through; nothing is lost, so no warning line (it used to say the run shows RUNNING)."""
    locked: list[subprocess.Popen] = []  # the locker, once the signal has come

    def stop_point() -> None:
        """A stage's stop point: the signal is handled here, and the lock released as it is,
        so that the store answers the KILLED status."""
        if locked:
            locker = locked.pop()
            locker.kill()
            locker.wait()
            raise KeyboardInterrupt

    run = Run.start("stopped", {"x": 1}, stop_check=stop_point)
    locked.append(_lock(store, 60))
    run.log_metrics({"loss": 0.5}, step=0)  # in flight, waiting for the lock
    with pytest.raises(KeyboardInterrupt):
        run.end()
    assert locked == []  # the signal was handled in the end's wait
    assert capsys.readouterr().err == ""
    assert _runs(store)["stopped"] == ("KILLED", {"loss": [0]})


@pytest.mark.slow
def test_a_server_that_restarts_mid_run_leaves_it_complete_or_names_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retry, "RETRY_DELAYS", (0.2,))  # give up on the live log quickly
    port = free_port()
    store = tmp_path / "server.db"
    server = _server(store, port)
    monkeypatch.setenv("NNBP_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # ours are the retries tested
    try:
        restarted, lost = Run.start("restarted", {}), Run.start("lost", {})
        for run in (restarted, lost):
            run.log_metrics({"loss": 1.0}, step=0)
            assert run.flush(30)  # the run's own thread sends: step 0 is in before the kill
        _kill(server)  # the server dies mid-run
        for step in (10, 20):
            restarted.log_metrics({"loss": 1 / step}, step=step)
            lost.log_metrics({"loss": 1 / step}, step=step)
        for run in (restarted, lost):
            assert run.flush(30)  # until live logging gave up
        first = capsys.readouterr().err.strip().splitlines()
        lost.end()  # with the server still down: nothing more can be sent
        lost_line = capsys.readouterr().err.strip().splitlines()
        server = _server(store, port)  # back
        restarted.end()  # resends its whole history
        assert capsys.readouterr().err == ""
    finally:
        _kill(server)
    # live logging gave up once per run, in one line, and said what happens next
    assert len(first) == 2 and all("will be sent again when the run ends" in x for x in first)
    assert len(lost_line) == 1
    assert lost_line[0].startswith(f"warning: MLflow run lost ({lost.run_id}) is incomplete: ")
    assert "metrics at steps 0..20" in lost_line[0]
    assert "its FINISHED status, so it shows RUNNING" in lost_line[0]
    runs = _runs(store)
    assert runs["restarted"] == ("FINISHED", {"loss": [0, 10, 20]})
    assert runs["lost"] == ("RUNNING", {"loss": [0]})  # for the orphan closer to find


def _raised(fn, *args) -> BaseException:
    try:
        fn(*args)
    except BaseException as e:
        return e
    raise AssertionError(f"{fn} raised nothing")


def test_transient_errors_are_told_from_lasting_ones_by_type_and_status(tmp_path: Path) -> None:
    """Real errors, as SQLite, requests and MLflow raise them; never words in a message."""
    import requests
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    db = tmp_path / "store.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    locked = _raised(sqlite3.connect(db, timeout=0).execute, "SELECT * FROM t")
    holder.execute("COMMIT")
    db.chmod(0o444)
    readonly_con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    readonly = _raised(readonly_con.execute, "INSERT INTO t VALUES (1)")

    def wrapped(cause: BaseException, code: int) -> MlflowException:
        """As MLflow's SQL store reports every database error: 503, raised from the cause."""
        try:
            raise cause
        except BaseException as e:
            try:
                raise MlflowException(str(e), error_code=code) from e
            except MlflowException as wrapper:
                return wrapper

    refused = _raised(requests.get, "http://127.0.0.1:9/api")  # nothing listens on port 9
    assert retry.is_transient(locked)
    assert retry.is_transient(wrapped(locked, TEMPORARILY_UNAVAILABLE))
    assert not retry.is_transient(readonly)
    assert not retry.is_transient(wrapped(readonly, TEMPORARILY_UNAVAILABLE))
    assert retry.is_transient(refused)
    assert retry.is_transient(wrapped(refused, TEMPORARILY_UNAVAILABLE))
    assert retry.is_transient(RestException({"error_code": "TEMPORARILY_UNAVAILABLE"}))
    assert not retry.is_transient(
        RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "run 5034c503"})
    )
    assert not retry.is_transient(
        MlflowException("run 503a503 not found (503)", error_code=RESOURCE_DOES_NOT_EXIST)
    )
    assert not retry.is_transient(RuntimeError("API request failed with error code 503"))
