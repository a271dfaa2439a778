"""Issue 23, item 2: the tracking server killed, or frozen (SIGSTOP: it accepts connections and
answers nothing), in the middle of a training run.

Training finishes and writes its model and history; the stage exits 0 well within 60 s of the
fault, with one warning line naming what the run lacks; the run, left RUNNING, is closed as
soon as the store is back (`nnbp-close-orphans`). And a stage stopped by SIGTERM while its
server is frozen exits 143 within 10 s all the same (it used to wait on the server for minutes).
Real `mlflow server`s over one SQLite store, real stage processes, real SIGKILL, SIGSTOP and
SIGTERM. The faults run side by side, one server each: the killed server's store is back through
the other one once it is thawed (rather than a restart, which costs a server's start).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnbp.artifacts import TrainedModel
from nnbp.kernels import FAMILY
from tests.conftest import ROOT
from tests.faults import (
    close_orphans,
    fresh_env,
    frozen,
    in_parallel,
    logged_metrics,
    new_store,
    project,
    store_runs,
)
from tests.servers import start_server, stop_server

pytestmark = pytest.mark.slow

ITERS, LOG_EVERY = 3000, 100  # a couple of seconds of training on the digits
FAULT_TO_EXIT = 60  # seconds: the bound


def _stage(work: Path, stage: str, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "stages" / f"{stage}.py"), *args],
        cwd=work,
        env=fresh_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _workspace(work: Path) -> Path:
    """params.yaml, dvc.yaml, the digits and their prepared arrays, made by the stages."""
    project(work, {"data.source": "digits", "iters": ITERS, "log_every": LOG_EVERY})
    for stage in ("data", "prepare"):
        proc = _stage(work, stage, NNBP_TRACKING="off")
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    return work


def _runs_of(db: Path, procs: dict[str, subprocess.Popen[str]]) -> dict[str, str]:
    """name -> run id of each stage of ``procs`` whose run has logged a metric (a run names
    its process: tag nnbp.pid)."""
    pids = {str(proc.pid): name for name, proc in procs.items()}
    return {
        pids[tags["nnbp.pid"]]: run_id
        for run_id, (_, tags) in store_runs(db).items()
        if tags.get("nnbp.pid") in pids and logged_metrics(db, run_id)
    }


def _ends(procs: dict[str, subprocess.Popen[str]], timeout: float) -> dict[str, float]:
    """name -> when each process ended (``time.monotonic()``), polled every 20 ms; the test
    fails if one still runs after ``timeout`` seconds. (Their output is a few lines: the pipes
    cannot fill meanwhile.)"""
    ended: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(ended) < len(procs):
        assert time.monotonic() < deadline, f"still running: {set(procs) - set(ended)}"
        for name, proc in procs.items():
            if name not in ended and proc.poll() is not None:
                ended[name] = time.monotonic()
        time.sleep(0.02)
    return ended


def test_a_killed_and_a_frozen_server_cost_the_run_its_tracking_not_its_model(tmp_path: Path):
    store = new_store(tmp_path / "mlflow.db")
    for name in ("killed", "frozen"):
        (tmp_path / name).mkdir()
    # two servers over one store, started while the data is made
    (killed_proc, killed), (frozen_proc, thawed), work = in_parallel(
        lambda: start_server(tmp_path / "killed", store),
        lambda: start_server(tmp_path / "frozen", store),
        lambda: _workspace(tmp_path / "work"),
    )
    db = tmp_path / "mlflow.db"
    # "stopped" trains on the frozen server too, and gets SIGTERM once it is frozen
    servers = {"killed": killed, "frozen": thawed, "stopped": thawed}
    procs: dict[str, subprocess.Popen[str]] = {}
    runs: dict[str, str] = {}
    faulted: dict[str, float] = {}
    results = {}
    try:
        with contextlib.ExitStack() as faults:
            for name, server in servers.items():
                procs[name] = _stage(
                    work,
                    "train",
                    "h25",
                    *("--models", f"out-{name}", "--histories", f"out-{name}"),
                    MLFLOW_TRACKING_URI=server.url,
                    NNBP_TRACKING="on",
                )
            deadline = time.monotonic() + 120
            while len(faulted) < len(procs):  # each fault as soon as its training logs
                assert time.monotonic() < deadline, "training did not start in time"
                runs.update(_runs_of(db, procs))
                for name in set(runs) - set(faulted):
                    assert procs[name].poll() is None, f"{name} ended before its fault"
                if "killed" in runs and "killed" not in faulted:
                    os.killpg(killed_proc.pid, signal.SIGKILL)
                    faulted["killed"] = time.monotonic()
                if {"frozen", "stopped"} <= set(runs) and "frozen" not in faulted:
                    faults.enter_context(frozen(frozen_proc))  # thawed when the block ends
                    faulted["frozen"] = time.monotonic()
                    time.sleep(0.5)  # in the middle of its training, the server frozen
                    procs["stopped"].send_signal(signal.SIGTERM)
                    faulted["stopped"] = time.monotonic()
                time.sleep(0.05)
            ended = _ends(procs, FAULT_TO_EXIT + 30)
            for name, proc in procs.items():
                out, err = proc.communicate(timeout=30)
                results[name] = (proc.returncode, ended[name] - faulted[name], out, err)
            during = store_runs(db)  # the file, read while the frozen server is stopped
            sent_live = logged_metrics(db, runs["killed"])
        # The store back: the frozen server thawed, the killed one's store behind it.
        closing = close_orphans(work, thawed.url)
        after = store_runs(db)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in (killed_proc, frozen_proc):
            stop_server(proc)

    status, seconds, out, err = results.pop("stopped")
    assert status == 143, err
    assert seconds < 10, f"the stopped stage exited {seconds:.1f} s after SIGTERM"
    assert err.splitlines()[-1] == "terminated (SIGTERM): stopped; no output is half-written"
    assert "Traceback" not in err, err
    written = [(work / "out-stopped" / f"h25.{ext}").exists() for ext in ("npz", "json")]
    assert written in ([False, False], [True, True]), written  # both or neither
    assert during[runs["stopped"]][0] == "RUNNING"  # its KILLED status could not be sent

    for name, (status, seconds, out, err) in results.items():
        assert status == 0, f"{name}: {err}"
        assert seconds < FAULT_TO_EXIT, f"{name}: exited {seconds:.1f} s after the fault"
        assert "Traceback" not in err, err
        lines = err.splitlines()
        assert len(lines) == 1, f"{name}: {err}"  # one warning line
        line = lines[0]
        assert line.startswith(f"warning: MLflow run h25 ({runs[name]}) is incomplete: "), line
        assert "so it shows RUNNING until the next training run or `nnbp-close-orphans`" in line
        assert "the stage's outputs are written all the same" in line
        assert f"after {ITERS} iterations" in out
        assert TrainedModel.load(work / f"out-{name}" / "h25.npz").kernels == FAMILY
        history = json.loads((work / f"out-{name}" / "h25.json").read_text())
        assert [row["step"] for row in history] == list(range(0, ITERS + 1, LOG_EVERY))
        assert during[runs[name]][0] == "RUNNING"
    # the fault came in the middle of training: the points after it never reached the store
    assert 0 < sent_live < len(history), sent_live

    assert closing.returncode == 0, closing.stderr
    status, tags = after[runs["killed"]]
    assert status == "FAILED", after
    assert "ended without closing this run" in tags["nnbp.orphaned"]
    assert f"note: closed MLflow run 'h25' ({runs['killed'][:8]}) as FAILED" in closing.stdout
    # The frozen server, thawed, may first carry out requests it had taken in; either way the
    # runs are closed.
    for name, closed in (("frozen", "FINISHED"), ("stopped", "KILLED")):
        status, tags = after[runs[name]]
        assert status == closed or (status == "FAILED" and "nnbp.orphaned" in tags), after
