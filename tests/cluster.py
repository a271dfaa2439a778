"""A team and a Dask cluster of real processes on 127.0.0.1, for tests/test_cluster.py: a bare git
repository as the team's remote, the lead's baseline pushed to it and to the DVC remote (moto's
S3 server), `dask scheduler`, and `dask worker` processes that are each a machine of their own:
their folder (NNBP_CLUSTER_DIR: clones and DVC cache), NNBP_MACHINE and host name (a UTS
namespace, `unshare --uts`, as tests/test_heartbeat.py does), so that a run of a dead worker is
told dead by its heartbeat, as a machine's would be.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.params import DELETE, set_params
from tests.project import BIN, clean_env, copy_repo, sh
from tests.servers import S3, free_port, on_host, stop_server

BEAT, STALE = 1, 6  # seconds: NNBP_HEARTBEAT_SECONDS and NNBP_HEARTBEAT_TIMEOUT of the workers
# The lead's baseline: the digits, h25 alone, long enough to be killed while it trains.
ITERS, LOG_EVERY = 600, 300


def team_repository(root: Path, s3: S3) -> tuple[Path, Path]:
    """The bare git remote and the lead's clone, whose baseline (h25 on the digits, untracked)
    is committed and pushed with its outputs, as the README's team section sets it up."""
    origin = root / "tp5.git"
    subprocess.run(
        ["git", "init", "--quiet", "--bare", "--initial-branch=main", str(origin)], check=True
    )
    lead = copy_repo(root / "lead", iters=ITERS, log_every=LOG_EVERY)
    set_params(lead, {"configs.h100": DELETE, "configs.h100_l2": DELETE})
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
