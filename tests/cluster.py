"""A team and a Dask cluster of real processes on 127.0.0.1, for tests/test_cluster.py: a bare git
repository as the team's remote, the lead's baseline pushed to it and to the DVC remote (moto's
S3 server), `dask scheduler`, and `dask worker` processes that are each a machine of their own:
their folder (NNBP_CLUSTER_DIR: clones and DVC cache), NNBP_MACHINE and host name (a UTS
namespace, `unshare --uts`, as tests/test_heartbeat.py does), so that a run of a dead worker is
told dead by its heartbeat, as a machine's would be.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.conftest import BIN, GIT_ID, clean_env, copy_repo
from tests.errors_helpers import write_params
from tests.servers import S3, free_port, missing, stop_server

BEAT, STALE = 1, 6  # seconds: NNBP_HEARTBEAT_SECONDS and NNBP_HEARTBEAT_TIMEOUT of the workers
# The lead's baseline: the digits, h25 alone, long enough to be killed while it trains.
ITERS, LOG_EVERY = 600, 300


def sh(
    cwd: Path, env: dict[str, str], *cmd: str, ok: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``cmd`` (git, or a console script of the venv) in ``cwd``; fails the test on a non-zero
    exit unless ``ok`` is False."""
    exe = cmd[0] if cmd[0] == "git" else str(BIN / cmd[0])
    args = [*GIT_ID, *cmd[1:]] if cmd[0] == "git" else list(cmd[1:])
    result = subprocess.run(
        [exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if ok and result.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}"
        )
    return result


def wait_until(what: str, condition: Callable[[], object], timeout: float) -> object:
    """``condition()``'s first true value, polled; the test fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)
    return value


def on_host(host: str, cmd: list[str]) -> list[str]:
    """``cmd`` on a host named ``host``: a UTS namespace of its own."""
    unshare = shutil.which("unshare")
    if unshare is None:
        missing("unshare (util-linux) is needed to run a worker under another host name")
    probe = subprocess.run([unshare, "--uts", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        missing(f"unshare --uts is not permitted here: {probe.stderr.strip()}")
    script = f'hostname {host} && exec "$@"'
    return [unshare, "--uts", "--fork", "sh", "-c", script, "sh", *cmd]


def team_repository(root: Path, s3: S3) -> tuple[Path, Path]:
    """The bare git remote and the lead's clone, whose baseline (h25 on the digits, untracked)
    is committed and pushed with its outputs, as the README's team section sets it up."""
    origin = root / "tp5.git"
    subprocess.run(
        ["git", "init", "--quiet", "--bare", "--initial-branch=main", str(origin)], check=True
    )
    lead = copy_repo(root / "lead", iters=ITERS, log_every=LOG_EVERY)
    write_params(lead, {"configs.h100": None, "configs.h100_l2": None})
    for stale in (lead / "reports" / "history").glob("h100*"):
        stale.unlink()
    env = clean_env(**s3.env())
    sh(lead, env, "git", "remote", "add", "origin", str(origin))
    sh(lead, env, "dvc", "remote", "add", "-d", "team", f"s3://{s3.bucket}/dvc")
    sh(lead, env, "dvc", "remote", "modify", "team", "endpointurl", s3.url)
    sh(lead, env, "dvc", "repro", "--quiet")
    sh(lead, env, "git", "add", "--all")
    sh(lead, env, "git", "commit", "--quiet", "-m", "the team's remotes, the baseline (h25)")
    sh(lead, env, "dvc", "push", "--quiet")
    sh(lead, env, "git", "push", "--quiet", "origin", "main")
    return origin, lead


@dataclass
class Cluster:
    """`dask scheduler` and its workers, each in a process group of its own."""

    root: Path
    address: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def start_scheduler(self) -> None:
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        cmd = [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port)]
        self._start("scheduler", [*cmd, "--no-dashboard"], clean_env())

    def start_worker(self, machine: str, env: dict[str, str]) -> Path:
        """A worker of one task slot on host ``machine``, with its own folder; returns it."""
        folder = self.root / machine
        folder.mkdir(exist_ok=True)
        cmd = [str(BIN / "dask"), "worker", self.address, "--name", machine, "--nthreads", "1"]
        cmd += ["--host", "127.0.0.1", "--no-nanny", "--no-dashboard"]
        cmd += ["--local-directory", str(folder / "dask")]
        env = {
            **env,
            "NNBP_MACHINE": machine,
            "NNBP_CLUSTER_DIR": str(folder),
            "NNBP_HEARTBEAT_SECONDS": str(BEAT),
            "NNBP_HEARTBEAT_TIMEOUT": str(STALE),
        }
        self._start(machine, on_host(machine, cmd), env)
        return folder

    def wait_for_workers(self, n: int, timeout: float = 60) -> None:
        """Once the scheduler answers and ``n`` workers (0: none) have joined it."""
        from distributed import Client

        with Client(self.address, timeout=timeout) as client:
            if n:
                client.wait_for_workers(n, timeout=timeout)

    def worker_process(self, machine: str) -> psutil.Process:
        """The `dask worker` process of ``machine`` (the child of its `unshare`)."""
        (worker,) = psutil.Process(self.procs[machine].pid).children()
        return worker

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_server(proc)


def gone(processes: list[psutil.Process]) -> bool:
    """Whether every one of ``processes`` has ended (a zombie waiting for its parent counts)."""
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def kill(process: psutil.Process) -> None:
    os.kill(process.pid, signal.SIGKILL)
