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
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnbp.artifacts import TrainedModel
from nnbp.kernels import FAMILY
from tests.faults import frozen, in_parallel
from tests.params import set_params
from tests.project import ROOT, clean_env, close_orphans, project_files
from tests.servers import start_server, stop_server
from tests.store import committed_copy, init_store, runs

pytestmark = pytest.mark.slow

ITERS, LOG_EVERY = 3000, 100  # a couple of seconds of training on the digits
FAULT_TO_EXIT = 60  # seconds: the bound


def _stage(work: Path, stage: str, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "stages" / f"{stage}.py"), *args],
        cwd=work,
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _workspace(work: Path) -> Path:
    """params.yaml, dvc.yaml, the digits and their prepared arrays, made by the stages."""
    project_files(work, {"data.source": "digits", "iters": ITERS, "log_every": LOG_EVERY})
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
        pids[run.tags["nnbp.pid"]]: run.run_id
        for run in runs(db)
        if run.tags.get("nnbp.pid") in pids and run.steps.get("loss")
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
    db = tmp_path / "mlflow.db"
    init_store(db)  # before the servers: two creating its tables at once would race
    store = f"sqlite:///{db}"
    for name in ("killed", "frozen"):
        (tmp_path / name).mkdir()
    # two servers over one store, started while the data is made
    (killed_proc, killed), (frozen_proc, thawed), work = in_parallel(
        lambda: start_server(tmp_path / "killed", store),
        lambda: start_server(tmp_path / "frozen", store),
        lambda: _workspace(tmp_path / "work"),
    )
    # "stopped" trains on the frozen server too, endlessly (its own params.yaml), and gets
    # SIGTERM once the server is frozen; "frozen" starts once it trains, so that both do at the
    # freeze however slowly the machine starts a stage.
    endless = shutil.copytree(work, tmp_path / "endless")
    set_params(endless, {"iters": 10**7})
    places = {"killed": (killed, work), "stopped": (thawed, endless), "frozen": (thawed, work)}
    procs: dict[str, subprocess.Popen[str]] = {}
    run_ids: dict[str, str] = {}
    faulted: dict[str, float] = {}
    results = {}

    def start(name: str) -> None:
        server, folder = places[name]
        procs[name] = _stage(
            folder,
            "train",
            "h25",
            *("--models", f"out-{name}", "--histories", f"out-{name}"),
            MLFLOW_TRACKING_URI=server.url,
            NNBP_TRACKING="on",
        )

    try:
        with contextlib.ExitStack() as faults:
            start("killed")
            start("stopped")
            deadline = time.monotonic() + 120
            while len(faulted) < len(places):  # each fault as soon as its training logs
                silent = sorted(set(places) - set(run_ids))
                assert time.monotonic() < deadline, f"in 120 s, no metric logged by {silent}"
                run_ids.update(_runs_of(db, procs))
                for name in set(procs) - set(faulted):
                    proc = procs[name]
                    ended = proc.poll() is not None
                    assert not ended, f"{name} ended before its fault: {proc.communicate()}"
                if "stopped" in run_ids and "frozen" not in procs:
                    start("frozen")
                if "killed" in run_ids and "killed" not in faulted:
                    os.killpg(killed_proc.pid, signal.SIGKILL)
                    faulted["killed"] = time.monotonic()
                if {"frozen", "stopped"} <= set(run_ids) and "frozen" not in faulted:
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
            # the store, read while the frozen server is stopped
            during = {run.run_id: run for run in runs(committed_copy(db, tmp_path / "during.db"))}
            assert set(run_ids.values()) <= set(during), "the store could not be read"
            sent_live = len(during[run_ids["killed"]].steps.get("loss", []))
        # The store back: the frozen server thawed, the killed one's store behind it.
        closing = close_orphans(work, thawed.url)
        after = {run.run_id: run for run in runs(db)}
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
    written = [(endless / "out-stopped" / f"h25.{ext}").exists() for ext in ("npz", "json")]
    assert written == [False, False], written  # stopped in the middle of its training
    assert during[run_ids["stopped"]].status == "RUNNING"  # its KILLED status could not be sent

    for name, (status, seconds, out, err) in results.items():
        assert status == 0, f"{name}: {err}"
        assert seconds < FAULT_TO_EXIT, f"{name}: exited {seconds:.1f} s after the fault"
        assert "Traceback" not in err, err
        lines = err.splitlines()
        assert len(lines) == 1, f"{name}: {err}"  # one warning line
        line = lines[0]
        assert line.startswith(f"warning: MLflow run h25 ({run_ids[name]}) is incomplete: "), line
        assert "so it shows RUNNING until the next training run or `nnbp-close-orphans`" in line
        assert "the stage's outputs are written all the same" in line
        assert f"after {ITERS} iterations" in out
        assert TrainedModel.load(work / f"out-{name}" / "h25.npz").kernels == FAMILY
        history = json.loads((work / f"out-{name}" / "h25.json").read_text())
        assert [row["step"] for row in history] == list(range(0, ITERS + 1, LOG_EVERY))
        assert during[run_ids[name]].status == "RUNNING"
    # the fault came in the middle of training: the points after it never reached the store
    assert 0 < sent_live < len(history), sent_live

    assert closing.returncode == 0, closing.stderr
    killed = after[run_ids["killed"]]
    assert killed.status == "FAILED", after
    assert "ended without closing this run" in killed.tags["nnbp.orphaned"]
    assert f"note: closed MLflow run 'h25' ({run_ids['killed'][:8]}) as FAILED" in closing.stdout
    # The frozen server, thawed, may first carry out requests it had taken in; either way the
    # runs are closed.
    for name, closed in (("frozen", "FINISHED"), ("stopped", "KILLED")):
        run = after[run_ids[name]]
        assert run.status == closed or (run.status == "FAILED" and "nnbp.orphaned" in run.tags)
