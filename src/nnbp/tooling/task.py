"""One experiment of a sweep, as a Dask worker runs it (``run``, the task ``nnbp-sweep``
submits): in a clone of the git remote that belongs to one task slot of this worker, at the
submitter's commit, ``dvc pull``, ``dvc exp run -n NAME -S ...``, then ``nnbp-share`` of it.

A slot's clone is made once and reused. Slots are numbered folders, each held by a lock
(``flock``) for as long as a task uses it, so two tasks never share a clone and DVC's lock never
meets itself; a worker that dies releases its locks with its process. The worker's folder is
``NNBP_CLUSTER_DIR`` (default ``~/.cache/nnbp/cluster``): a folder per git remote, its slots, and
one DVC cache that all of them share (DVC's cache is content-addressed: clones may share one).

An experiment is its baseline commit and its params (``name``, made by the submitter, is a digest
of them): one already on the remote is never run or pushed again, which is what makes a task
that Dask runs a second time (its worker died) and a sweep submitted again harmless. Every
command runs under ``guard``: it dies with this worker. A failure is ``ExperimentFailed``, one
line, the command's own words (the stage's ``Error: ...`` line when a stage failed); every
command's output is kept in the slot's ``logs/NAME.log``.

A cluster on the submitter's machine (Dask's ``LocalCluster``) uses the submitter's DVC cache
and MLflow store (``cache``, ``env``). Without a team (no git remote: ``shared`` False) its
clones are of the submitter's repository, whose cache has the outputs (nothing is pulled), and
the experiment's ref is pushed back into it, as ``dvc exp run --queue`` leaves experiments in
the repository that queued them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from ..artifacts import Metrics, parse_metrics
from ..errors import UserError, one_line
from .team import error_line
from .tracking.heartbeat import machine

CLUSTER_DIR_ENV = "NNBP_CLUSTER_DIR"
METRICS_FILE = "reports/metrics.json"  # dvc.yaml's metrics: in git, so in the experiment's commit
GIT_TIMEOUT = 600.0  # seconds: a clone or fetch of the team's repository
TRANSFER_TIMEOUT = 3600.0  # dvc pull and push: the outputs of one experiment
EXPERIMENT_TIMEOUT = 6 * 3600.0  # dvc exp run, unless the submitter says (nnbp-sweep --timeout)
STOP_GRACE = 30.0  # seconds a command stopped for its time gets to end its run, before SIGKILL


class ExperimentFailed(UserError):
    """An experiment that could not be run or shared; ``str()`` is one line. ``machine`` ran it
    and ``log`` (on that machine) holds every command's output."""

    def __init__(self, message: str, machine: str = "?", log: str = "") -> None:
        super().__init__(message)
        self.machine, self.log = machine, log

    def __reduce__(self) -> tuple[Any, ...]:  # travels from the worker to the submitter
        return (type(self), (str(self), self.machine, self.log))


@dataclass(frozen=True)
class Experiment:
    """What a task needs: the experiment (its name, baseline commit and ``-S`` settings) and
    where it comes from and goes to."""

    name: str
    commit: str
    settings: tuple[str, ...]  # the -S arguments of `dvc exp run`, one value each
    source: str  # the git URL a slot clones: the team's remote, or the submitter's repository
    shared: bool  # through the team's remotes (dvc pull, nnbp-share); else the submitter's repo
    dvc_remote: str | None = None  # -r for dvc pull and nnbp-share (None: the default one)
    cache: str | None = None  # a local cluster's: the submitter's DVC cache, for every slot
    env: tuple[tuple[str, str], ...] = ()  # a local cluster's: the submitter's MLflow store
    topic: str = ""  # the sweep's Dask event topic, for its progress
    timeout: float = EXPERIMENT_TIMEOUT  # seconds `dvc exp run` may take, then it is stopped

    @property
    def ref(self) -> str:
        """The experiment's git ref, as DVC names it (``refs/exps/AB/CDEF.../NAME``)."""
        from dvc.repo.experiments.refs import ExpRefInfo

        return str(ExpRefInfo(self.commit, self.name))


@dataclass(frozen=True)
class Outcome:
    """A task's result: where the experiment ran, what it scored (None when it was found on the
    remote, run by an earlier task), and how long each phase took."""

    name: str
    machine: str
    found: bool
    seconds: Mapping[str, float] = field(default_factory=dict)  # prepare, run, share
    metrics: Metrics | None = None


def cluster_dir() -> Path:
    """This worker's folder for clones and their DVC cache (``NNBP_CLUSTER_DIR``)."""
    if os.environ.get(CLUSTER_DIR_ENV):
        return Path(os.environ[CLUSTER_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "nnbp" / "cluster"


def _slots_of(source: str) -> Path:
    """The folder of ``source``'s slots: a readable name and a digest of the URL."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", source.rstrip("/").rsplit("/", 1)[-1]) or "repo"
    return cluster_dir() / f"{stem}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def _slot(folder: Path) -> Iterator[Path]:
    """The first free slot of ``folder`` (``slot-0``, ``slot-1``...), held until the block ends;
    its lock goes with the process, so a dead worker's slots are free again."""
    folder.mkdir(parents=True, exist_ok=True)
    index = 0
    while True:
        fd = os.open(folder / f"slot-{index}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            index += 1
            continue
        try:
            slot = folder / f"slot-{index}"
            slot.mkdir(exist_ok=True)
            yield slot
        finally:
            os.close(fd)
        return


def _event(exp: Experiment, what: str, where: str) -> None:
    """Tell the submitter (the sweep's Dask topic) that ``exp`` is at ``what`` on ``where``."""
    if not exp.topic:
        return
    from distributed import get_worker

    with contextlib.suppress(ValueError):  # not in a worker (called directly)
        get_worker().log_event(exp.topic, {"event": what, "name": exp.name, "machine": where})


def _stop(proc: subprocess.Popen) -> None:
    """Stop a command's whole process group: SIGTERM, which DVC and a stage take as Ctrl-C (the
    MLflow run KILLED, nothing half-written), then SIGKILL after ``STOP_GRACE`` seconds."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=STOP_GRACE)
            return


def _label(cmd: tuple[str, ...]) -> str:
    """A command as an error names it: its words before the first option (``dvc exp run``)."""
    words = list(itertools.takewhile(lambda a: not a.startswith("-"), cmd[:3]))
    return " ".join(words)


class _Clone:
    """A slot's clone of ``exp.source`` and the log of the commands run in it."""

    def __init__(self, slot: Path, exp: Experiment, where: str) -> None:
        self.exp, self.where = exp, where
        self.path = slot / "repo"
        (slot / "logs").mkdir(exist_ok=True)
        self.log = slot / "logs" / f"{exp.name}.log"
        self.log.write_text(f"experiment {exp.name} at {exp.commit} on {where}\n")
        self.start = time.monotonic()
        bin_dir = str(Path(sys.executable).parent)  # this worker's dvc, nnbp-share and python
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.update(exp.env)

    def sh(
        self,
        *cmd: str,
        timeout: float | None = GIT_TIMEOUT,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        cwd: Path | None = None,
        guarded: bool = True,
    ) -> str | None:
        """``cmd`` in the clone, under ``guard`` (but git's local plumbing, done in
        milliseconds); its output (logged). If it fails: ``ExperimentFailed`` with its error
        line, or None unless ``check``. ``timeout`` kills the command's whole process group."""
        guard = [sys.executable, "-E", "-m", "nnbp.tooling.guard", str(os.getpid()), "--"]
        with open(self.log, "a") as log:
            log.write(f"[{time.monotonic() - self.start:6.1f} s] $ {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            [*guard, *cmd] if guarded else list(cmd),
            cwd=cwd or self.path,
            env=dict(env or self.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # the guard's group: what it kills when this worker dies
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            self.fail(f"{_label(cmd)}: still running after {timeout:g} s, stopped")
        with open(self.log, "a") as log:
            log.write(output)
        if proc.returncode == 0:
            return output
        if check:
            self.fail(f"{_label(cmd)}: {error_line(output, proc.returncode)}")
        return None

    def fail(self, message: str) -> NoReturn:
        raise ExperimentFailed(one_line(message), self.where, str(self.log))

    def on_remote(self) -> bool:
        """Whether the experiment's ref is on the remote (``origin`` of the clone)."""
        return bool((self.sh("git", "ls-remote", "origin", self.exp.ref) or "").strip())

    def prepare(self) -> None:
        """The clone at the experiment's commit, clean: made on the slot's first task."""
        exp, slot = self.exp, self.path.parent
        if not self.path.is_dir():
            partial = self.path.with_name("repo.partial")  # a clone cut short is made again
            shutil.rmtree(partial, ignore_errors=True)
            self.sh("git", "clone", "--quiet", "--no-checkout", exp.source, str(partial), cwd=slot)
            # the commit, not the remote's HEAD (which may name no branch): .dvc/ to configure
            self.sh("git", "checkout", "--quiet", "--detach", exp.commit, cwd=partial)
            cache = exp.cache or str(_slots_of(exp.source).parent / "dvc-cache")
            self.sh("dvc", "config", "--local", "cache.dir", cache, cwd=partial)
            partial.rename(self.path)
        commit = f"{exp.commit}^{{commit}}"
        if self.sh("git", "cat-file", "-e", commit, check=False, guarded=False) is None:
            self.sh("git", "fetch", "--quiet", "origin")
        self.sh("git", "checkout", "--quiet", "--force", "--detach", exp.commit, guarded=False)
        self.sh("git", "clean", "-ffdq", guarded=False)
        from dvc.repo.experiments.refs import WORKSPACE_STASH

        # What a killed `dvc exp run` may leave: its queued entry (the next run would run it
        # too) and a ref of the same name that was never shared.
        self.sh("git", "update-ref", "-d", WORKSPACE_STASH, guarded=False)
        self.sh("git", "update-ref", "-d", exp.ref, guarded=False)

    def pull(self) -> None:
        """The baseline's outputs in the workspace: from the DVC remote, or the shared cache
        (what is missing there the experiment makes again)."""
        remote = ["-r", self.exp.dvc_remote] if self.exp.dvc_remote else []
        if self.exp.shared:
            self.sh("dvc", "pull", "--force", *remote, timeout=TRANSFER_TIMEOUT)
        else:
            self.sh("dvc", "checkout", "--force", "--allow-missing", timeout=TRANSFER_TIMEOUT)

    def run(self) -> None:
        """``dvc exp run`` with the commit's own code: the stages import the clone's nnbp."""
        settings = [arg for s in self.exp.settings for arg in ("-S", s)]
        env = {**self.env, "PYTHONPATH": str(self.path / "src")}
        name, timeout = self.exp.name, self.exp.timeout
        self.sh("dvc", "exp", "run", "--name", name, *settings, timeout=timeout, env=env)

    def share(self) -> None:
        """The experiment to the remote: ``nnbp-share`` (the DVC remote checked first, then
        ``dvc exp push``), or its ref alone into the submitter's repository."""
        if self.exp.shared:
            remote = ["-r", self.exp.dvc_remote] if self.exp.dvc_remote else []
            self.sh("nnbp-share", *remote, "origin", self.exp.name, timeout=TRANSFER_TIMEOUT)
        else:
            self.sh("dvc", "exp", "push", "--no-cache", "origin", self.exp.name)

    def metrics(self) -> Metrics:
        where = f"{self.exp.name}:{METRICS_FILE}"
        text = self.sh("git", "show", f"{self.exp.ref}:{METRICS_FILE}", guarded=False)
        return parse_metrics(text or "", where)


def run(exp: Experiment) -> Outcome:
    """Run, share and score one experiment on this worker (the sweep's Dask task)."""
    where = machine()
    _event(exp, "started", where)
    try:
        return _run(exp, where)
    finally:  # through the same channel as "started", so that the submitter's counts add up
        _event(exp, "ended", where)


def _run(exp: Experiment, where: str) -> Outcome:
    seconds: dict[str, float] = {}
    with _slot(_slots_of(exp.source)) as slot:
        clone = _Clone(slot, exp, where)
        start = time.monotonic()
        clone.prepare()
        if clone.on_remote():  # run before by a task whose worker died after sharing it
            return Outcome(exp.name, where, True)
        clone.pull()
        seconds["prepare"] = time.monotonic() - start
        start = time.monotonic()
        clone.run()
        seconds["run"] = time.monotonic() - start
        start = time.monotonic()
        if clone.on_remote():  # landed meanwhile by another worker: never pushed twice
            return Outcome(exp.name, where, True)
        clone.share()
        metrics = clone.metrics()
        seconds["share"] = time.monotonic() - start
        return Outcome(exp.name, where, False, seconds, metrics)
