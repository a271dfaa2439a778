"""A machine that dies mid-sweep leaves no run RUNNING: its runs' heartbeat stops, and once it is
older than NNBP_HEARTBEAT_TIMEOUT the next training run anywhere, or `nnbp-close-orphans`,
closes them as FAILED, saying why; a run that is slow but alive keeps beating and is left alone.

Real processes against the README's team server (basic auth, SQLite store), which keeps running.
The "other machine" is a training process in a UTS namespace of its own (`unshare --uts`) with
the host name machine-b: the pid check cannot see it from here, only its heartbeat tells.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.params import changed_params
from tests.project import BIN, clean_env, run_stage, sh, stage_cmd, tracked_env
from tests.servers import Api, on_host, wait_until
from tests.store import Run, by_config, runs, server_runs

BEAT, STALE = 1, 10  # seconds: NNBP_HEARTBEAT_SECONDS and NNBP_HEARTBEAT_TIMEOUT in this test
# Trains until stopped; `slow` logs its first point only, so only its heartbeat says it lives.
LONG = {"hidden": [25], "iters": 1_000_000, "log_every": 1000}
SLOW = {"hidden": [25], "iters": 1_000_000, "log_every": 1_000_000}


@pytest.fixture(scope="module")
def workspace(workspace: Path) -> Iterator[Path]:
    """The shared workspace with this module's two configurations, as it was after it."""
    with changed_params(workspace, {"configs.long": LONG, "configs.slow": SLOW}):
        yield workspace


def _api(server, env: dict[str, str]) -> Api:
    return Api(server.url, env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])


def _runs(api: Api) -> dict[str, Run]:
    return by_config(server_runs(api))


@pytest.mark.slow
def test_a_dead_machines_run_is_failed_after_the_timeout_and_a_slow_live_one_is_not(
    workspace: Path, tmp_path: Path, team_tracking
):
    server, member = team_tracking
    api = _api(server, member)
    beat = {"NNBP_HEARTBEAT_SECONDS": str(BEAT), "NNBP_HEARTBEAT_TIMEOUT": str(STALE)}
    machine_b = clean_env(**member, **beat)
    started = []
    try:
        for name in ("long", "slow"):
            out = str(tmp_path / name)
            cmd = stage_cmd("train", name, "--models", out, "--histories", out)
            started.append(
                subprocess.Popen(
                    on_host("machine-b", cmd),
                    cwd=workspace,
                    env=machine_b,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,  # its process group: the whole "machine"
                )
            )
        dead, slow = started
        wait_until("both runs started", lambda: {"long", "slow"} <= set(_runs(api)))
        runs = _runs(api)
        dead_id, slow_id = runs["long"].run_id, runs["slow"].run_id
        assert runs["long"].tags["nnbp.host"] == "machine-b"
        assert runs["long"].tags["nnbp.machine"] == "machine-b"  # NNBP_MACHINE unset
        first = int(runs["slow"].tags["nnbp.heartbeat"])
        wait_until(
            "the heartbeat refreshed",
            lambda: int(_runs(api)["slow"].tags["nnbp.heartbeat"]) > first,
        )

        os.killpg(dead.pid, signal.SIGKILL)  # machine-b's worker dies; the server lives on
        dead.communicate(timeout=60)
        killed_at = time.time()

        here = clean_env(**member, **beat)  # this host, vm or whatever it is called
        early = sh(workspace, here, "nnbp-close-orphans", ok=False, timeout=120)
        if time.time() - killed_at < STALE - BEAT:  # the check ran before the timeout
            assert early.returncode == 0, early.stderr
            assert early.stdout.strip().endswith("no orphaned run"), early.stdout
            assert _runs(api)["long"].status == "RUNNING"

        time.sleep(max(0.0, killed_at + STALE + 1 - time.time()))
        out = str(tmp_path / "next")
        paths = ("--models", out, "--histories", out)
        next_run = run_stage("train", "h25", *paths, cwd=workspace, env=here, timeout=300)
        assert next_run.returncode == 0, next_run.stderr
        note = (
            f"note: closed MLflow run 'long' ({dead_id[:8]}) as FAILED: no heartbeat from "
            f"machine machine-b (its process "
        )
        assert note in next_run.stdout, next_run.stdout
        runs = _runs(api)
        assert runs["long"].status == "FAILED"
        why = runs["long"].tags["nnbp.orphaned"]
        assert why.startswith("no heartbeat from machine machine-b (process "), why
        assert f"more than the {STALE} s allowed (NNBP_HEARTBEAT_TIMEOUT)" in why
        assert "closed as FAILED by the next run (h25) on " in why
        # its end is its last sign of life, before the kill
        assert runs["long"].end_time <= killed_at * 1000 + 1
        # the slow run logged nothing for longer than the timeout, and is alive: left alone
        assert runs["slow"].status == "RUNNING", runs["slow"].tags
        last_metric = max(
            m["timestamp"]
            for m in api.get("metrics/get-history", run_id=slow_id, metric_key="loss")["metrics"]
        )
        assert time.time() * 1000 - last_metric > STALE * 1000
        again = sh(workspace, here, "nnbp-close-orphans", ok=False, timeout=120)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip().endswith("no orphaned run"), again.stdout
        assert _runs(api)["slow"].status == "RUNNING"
        assert next_run.stderr == ""
        os.killpg(slow.pid, signal.SIGTERM)
        slow.communicate(timeout=60)
        assert _runs(api)["slow"].status == "KILLED"
        statuses = {name: r.status for name, r in _runs(api).items()}
        assert statuses == {"long": "FAILED", "slow": "KILLED", "h25": "FINISHED"}
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate(timeout=60)


def test_heartbeats_change_no_bit_of_the_model(workspace: Path, tmp_path: Path):
    """A heartbeat every 10 ms while training: the model's bytes are those trained untracked."""
    db = tmp_path / "mlflow.db"
    outs = {}
    mid = {"configs.mid": {"hidden": [25], "iters": 1500, "log_every": 500}}
    for tracked in (True, False):
        out = tmp_path / ("tracked" if tracked else "untracked")
        env = tracked_env(f"sqlite:///{db}") if tracked else clean_env()
        with changed_params(workspace, mid):
            beating = {**env, "NNBP_HEARTBEAT_SECONDS": "0.01"}
            paths = ("--models", str(out), "--histories", str(out))
            result = run_stage("train", "mid", *paths, cwd=workspace, env=beating, timeout=300)
        assert result.returncode == 0, result.stderr
        outs[tracked] = (out / "mid.npz").read_bytes()
    assert outs[True] == outs[False]
    (run,) = runs(db)
    assert run.start_time + 100 < int(run.tags["nnbp.heartbeat"]) <= run.end_time  # it beat


@pytest.mark.parametrize(
    ("command", "env", "value"),
    [
        ("nnbp-close-orphans", "NNBP_HEARTBEAT_TIMEOUT", "ten"),
        ("train", "NNBP_HEARTBEAT_SECONDS", "0"),
    ],
)
def test_heartbeat_settings_that_are_not_seconds_are_one_line_errors(
    workspace: Path, tmp_path: Path, command: str, env: str, value: str
):
    out = str(tmp_path / "out")
    cmd = (
        [str(BIN / command)]
        if command.startswith("nnbp-")
        else stage_cmd(command, "h25", "--models", out, "--histories", out)
    )
    result = subprocess.run(
        cmd,
        cwd=workspace,
        env=tracked_env(f"sqlite:///{tmp_path / 'x.db'}", **{env: value}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr == f"Error: {env} = {value!r}: must be a positive number of seconds\n"
    assert not (tmp_path / "x.db").exists() and not Path(out).exists()  # before any request
