"""Issue 23, item 1: stopped at any moment, a stage ends cleanly, within 10 s, and says so.

Signals reach the stage as they do in use: Ctrl-C is SIGINT to the terminal's process group
(DVC and the stage, or DVC alone before it runs the stage), a scheduler or `dvc queue kill` is
SIGTERM to the stage (at its moment, or as soon as it runs). At random moments of a real
`dvc repro` of a small
configuration tracked to a real `mlflow server`, half of them while the server is frozen
(SIGSTOP), the stage must end within 10 s with 130 or 143 and its one line, DVC fail, every model
keep its history (the old pair or the new, never one of each), no run stay RUNNING once the
server is back, and the next `dvc repro` succeed.

DVC runs a stage through ``$SHELL`` (``/bin/sh`` where it is not set, as under cron or a CI
runner). bash runs the stage as DVC's child; dash, Debian's ``/bin/sh``, keeps itself between them,
and Ctrl-C ends it with the rest of the process group: DVC then reports the shell's ``-2``, while
the stage stops as it does under bash. The trials take both shells in turn.

Before its handler is in place (Python starting, the imports: a few tenths of a second) and
after it is gone (the process exiting), a signal ends a stage as it ends any Python program:
whether the handler was in place is read from the stage's SigCgt at the moment of the signal.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.faults import catches, frozen, in_parallel
from tests.params import set_params
from tests.project import BIN, attempt, clean_env, close_orphans, copy_repo, sha256
from tests.servers import alive, stage_processes, start_server, stop_server
from tests.store import runs

BOUND = 10.0  # seconds from a signal to the stage's exit
# Ctrl-C while Python imports its site module, before any code of the stage: Python's own end
# (exit 1), as docs/faults.md says.
PYTHON_STARTING = "Fatal Python error: init_import_site"
FREEZE_AHEAD = 1.0  # at most this many seconds between the server's freeze and the first signal
# How often a frozen round looks for its runs: reading every process's /proc entries and the
# store takes milliseconds of a core the stages are starting on.
PLACE_EVERY = 0.1
TRIALS, LANES = 30, 3  # three workspaces side by side: ten rounds of three trials
ITERS, LOG_EVERY = 1000, 100  # a second of training
BASH, SH = "/bin/bash", "/bin/sh"  # a terminal's $SHELL, and DVC's shell when none is set
SHELL_INTERRUPTED = -signal.SIGINT  # DVC's status of a shell that Ctrl-C ended
PAIR = ("models/h25.npz", "reports/history/h25.json")
LINES = {
    signal.SIGINT: (130, "interrupted (Ctrl-C): stopped; no output is half-written"),
    signal.SIGTERM: (143, "terminated (SIGTERM): stopped; no output is half-written"),
}

# A signal handed to another thread between the two renames of a group: CPython runs the
# handler in the main thread, right after the first rename.
RENAMES = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from pathlib import Path
    import nnbp
    from nnbp.files import atomic_paths

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    idle = threading.Event()
    other = threading.Thread(target=idle.wait, daemon=True)  # as OpenBLAS's, the heartbeat's
    other.start()
    rename = os.replace

    def replace(src, dst):
        rename(src, dst)
        if str(dst).endswith("model"):  # the first of the group
            signal.pthread_kill(other.ident, signal.SIGTERM)
            time.sleep(0.3)  # the handler has all the time it needs to run here

    os.replace = replace
    for name in ("model", "history"):
        Path(name).write_text("old")
    try:
        with atomic_paths("model", "history") as tmps:
            for tmp in tmps:
                tmp.write_text("new")
    except KeyboardInterrupt:
        print("stopped:", Path("model").read_text(), Path("history").read_text())
    """
)


def test_a_signal_between_two_renames_waits_for_the_group(tmp_path: Path):
    proc = attempt([sys.executable, "-c", RENAMES], tmp_path, clean_env(), 60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "stopped: new new", proc.stdout  # not lost, and not between


@dataclass
class Trial:
    """One `dvc repro` stopped by a signal at ``moment`` seconds after it started."""

    lane: Path
    signum: int
    frozen: bool
    moment: float | None  # None: placed once its run is open (a frozen round)
    shell: str = BASH  # DVC's $SHELL
    before: tuple[str, str] = ("", "")
    dvc: subprocess.Popen[str] | None = None
    stage: int | None = None  # the stage's pid, if one ran at the moment
    in_place: bool = False  # its signal path was in place then
    sent: float = 0.0
    ended: float | None = None  # seconds from the signal to the stage's end
    output: str = ""
    repaired: bool = False  # DVC's lock file, which DVC itself left corrupted
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        target = f"stage {self.stage}" if self.stage else "DVC (no stage running)"
        state = "frozen" if self.frozen else "up"
        name = signal.Signals(self.signum).name
        where = f"{self.lane.name} ({Path(self.shell).name})"
        return f"{where} {name} at {self.moment or 0:.2f} s to {target}, server {state}"


def _pair(lane: Path) -> tuple[str, str]:
    return sha256(lane / PAIR[0]), sha256(lane / PAIR[1])


def _repro(lane: Path, url: str, *targets: str, shell: str = BASH) -> subprocess.Popen[str]:
    """`dvc repro TARGETS` in ``lane`` as a terminal runs it: its own process group, tracked to
    ``url``, the stages importing nnbp from the lane's own src, run through ``shell``."""
    env = clean_env(
        MLFLOW_TRACKING_URI=url, NNBP_TRACKING="on", PYTHONPATH=str(lane / "src"), SHELL=shell
    )
    return subprocess.Popen(
        [str(BIN / "dvc"), "repro", *targets],
        cwd=lane,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _next_repro(lane: Path, url: str, *targets: str) -> str:
    """`dvc repro TARGETS` in ``lane``: "" if it succeeds, else what it said."""
    proc = _repro(lane, url, *targets)
    out, _ = proc.communicate(timeout=300)
    return "" if proc.returncode == 0 else f"{lane.name}: dvc repro failed:\n{out[-3000:]}"


def _succeeds(lane: Path, url: str, *targets: str) -> float:
    started = time.monotonic()
    proc = _repro(lane, url, *targets)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{lane.name}: dvc repro {' '.join(targets)}:\n{out[-3000:]}"
    return time.monotonic() - started


def _signal(trial: Trial) -> bool:
    """Ctrl-C: SIGINT to the process group, whatever runs. SIGTERM: to the stage, once there is
    one. Whether the trial is done with (False: wait for the stage)."""
    assert trial.dvc is not None
    if trial.dvc.poll() is not None:
        return True  # the repro ended before its moment: nothing to stop
    pids = stage_processes(trial.lane)
    if trial.signum == signal.SIGTERM and not pids:
        return False
    if pids:
        trial.stage = pids[0]
        trial.in_place = catches(trial.stage, signal.SIGTERM)  # the path's handlers are set
    trial.sent = time.monotonic()
    if trial.signum == signal.SIGINT:
        os.killpg(trial.dvc.pid, signal.SIGINT)
    else:
        os.kill(pids[0], signal.SIGTERM)
    return True


def _place_after_its_run(trial: Trial, opened: set[str], now: float, seconds: float) -> None:
    """A frozen round's trial: its moment, at random in the rest of the repro once its run is
    open in the store (``opened``: the pids the store's runs name), so that the server freezes
    in the middle of a run; at once if its repro ended first."""
    assert trial.dvc is not None
    if trial.dvc.poll() is not None:
        trial.moment = now
        return
    if {str(pid) for pid in stage_processes(trial.lane)} & opened:
        trial.moment = now + random.uniform(0, max(0.3, 0.9 * seconds - now))


def _round(
    trials: list[Trial], url: str, server: subprocess.Popen, db: Path, seconds: float
) -> None:
    """The round's repros side by side, each signalled at its moment; in a frozen round, the
    server frozen in the second before the first signal, each signal once its run is open or,
    for a stage still opening it then, within a second of the freeze; each stage's end timed;
    the server thawed once every repro has ended."""
    for trial in trials:
        trial.before = _pair(trial.lane)
        trial.dvc = _repro(trial.lane, url, "train@h25", shell=trial.shell)
    start = time.monotonic()
    freeze_at: float | None = None
    placed_at = -PLACE_EVERY
    is_frozen = False
    waiting = list(trials)
    with contextlib.ExitStack() as thaw:
        try:
            while waiting:
                now = time.monotonic() - start
                if trials[0].frozen:
                    unplaced = [t for t in waiting if t.moment is None]
                    if unplaced and is_frozen:  # frozen while they open their runs
                        for trial in unplaced:
                            trial.moment = now + random.uniform(0, FREEZE_AHEAD)
                    elif unplaced and now - placed_at >= PLACE_EVERY:
                        placed_at = now
                        opened = {run.tags.get("nnbp.pid", "") for run in runs(db)}
                        for trial in unplaced:
                            _place_after_its_run(trial, opened, now, seconds)
                    placed = [t.moment for t in waiting if t.moment is not None]
                    if freeze_at is None and placed:
                        freeze_at = max(now, min(placed) - random.uniform(0, FREEZE_AHEAD))
                    if freeze_at is not None and now >= freeze_at and not is_frozen:
                        thaw.enter_context(frozen(server))
                        is_frozen = True
                for trial in list(waiting):
                    if trial.moment is None or now < trial.moment:
                        continue
                    if trial.frozen and (freeze_at is None or now < freeze_at):
                        continue
                    assert trial.dvc is not None
                    if _signal(trial) or trial.dvc.poll() is not None:
                        waiting.remove(trial)  # sent, or no stage to send a SIGTERM to
                time.sleep(0.01)
            # A stage without its handler (yet, or any more) ends as the kernel ends it, no code
            # of ours running: the 10 s are ours to keep once the handler is in place (a
            # starved machine was seen to take 15 s to end one without it); it must end.
            while any(t.stage and t.ended is None for t in trials):
                for t in trials:
                    if t.stage and t.ended is None and not alive(t.stage):
                        t.ended = time.monotonic() - t.sent
                if time.monotonic() - max(t.sent for t in trials) > 6 * BOUND:
                    break
                time.sleep(0.02)
            for trial in trials:
                assert trial.dvc is not None
                trial.output, _ = trial.dvc.communicate(timeout=120)
        finally:
            for trial in trials:
                if trial.dvc is not None and trial.dvc.poll() is None:
                    os.killpg(trial.dvc.pid, signal.SIGKILL)


def _check(trial: Trial) -> None:
    """What must hold after one trial; the problems found are kept on the trial."""
    assert trial.dvc is not None
    out, problems = trial.output, trial.problems
    after = _pair(trial.lane)
    if (after[0] != trial.before[0]) != (after[1] != trial.before[1]):
        problems.append("a model and a history of different trainings")
    leftovers = [p.name for p in trial.lane.rglob(".*.tmp")]
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    rwlock = trial.lane / ".dvc" / "tmp" / "rwlock"
    with contextlib.suppress(FileNotFoundError):
        try:
            json.loads(rwlock.read_text())
        except ValueError:
            if trial.stage is not None:  # DVC itself ignores Ctrl-C while a stage runs
                problems.append("DVC's .dvc/tmp/rwlock is corrupted")
            # Ctrl-C to DVC itself, while it rewrote its lock file: DVC's own bug
            # (treeverse/dvc#7615); repaired as docs/faults.md tells users to, and counted.
            rwlock.unlink()
            trial.repaired = True
    if trial.stage is None:  # Ctrl-C to DVC alone, or the stage ended before the SIGTERM
        if trial.dvc.returncode == 0 and after == trial.before:
            problems.append("DVC succeeded without training")
        # DVC's line, or its imports; or the shell, Ctrl-C'd before it had started the stage
        why = ["interrupted by the user", "KeyboardInterrupt", f"exited with {SHELL_INTERRUPTED}"]
        if trial.frozen:  # the stage's check of the store, frozen from its start
            why.append("Error: MLflow tracking server ")
        if trial.repaired:  # DVC's cleanup, reading back the lock file the signal cut short
            why.append("Unable to read RWLock-file")
        if trial.dvc.returncode != 0 and not any(words in out for words in why):
            problems.append("DVC failed, not for the signal")  # a lock left by an earlier trial
        return
    if trial.ended is None or (trial.in_place and trial.ended > BOUND):
        problems.append(f"the stage ended {trial.ended} s after the signal")
    if trial.dvc.returncode == 0 and not trial.in_place and after != trial.before:
        return  # the stage had finished its work when the signal came: its outputs are whole
    if trial.dvc.returncode == 0:
        problems.append("DVC exited 0")
    if trial.in_place:
        status, line = LINES[trial.signum]
        shell_killed = trial.shell == SH and trial.signum == signal.SIGINT  # dash, by Ctrl-C
        reported = SHELL_INTERRUPTED if shell_killed else status  # the status DVC sees
        if f"exited with {reported}" not in out:
            problems.append(f"DVC did not see {reported} (the stage's {status})")
        if line not in out:
            problems.append(f"no line {line!r}")
        if "Traceback" in out:
            problems.append("a traceback")
    elif not re.search(r"exited with (130|143|-2|-15)\b", out) and PYTHON_STARTING not in out:
        problems.append("the stage did not end by the signal")


def _first_lane(lane: Path) -> Path:
    """A copy of the project with a small configuration, its data made and prepared."""
    copy_repo(lane, iters=ITERS, log_every=LOG_EVERY)
    set_params(lane, {"configs": {"h25": {"hidden": [25]}}})
    _succeeds(lane, "", "prepare")  # no stage of it tracks
    return lane


@pytest.mark.slow
def test_a_stage_stopped_at_random_moments_ends_within_10_s_and_cleanly(tmp_path: Path):
    seed = int.from_bytes(os.urandom(4), "little")
    random.seed(seed)
    (tmp_path / "server").mkdir()
    db = tmp_path / "server" / "mlflow.db"
    (proc, server), first = in_parallel(
        lambda: start_server(tmp_path / "server", f"sqlite:///{db}"),
        lambda: _first_lane(tmp_path / "lane0"),
    )
    try:
        _stop_at_random_moments(first, proc, server.url, db, seed)
    finally:
        stop_server(proc)


def _stop_at_random_moments(
    first: Path, proc: subprocess.Popen, url: str, db: Path, seed: int
) -> None:
    seconds = _succeeds(first, url, "train@h25")  # the old pair; what a repro takes
    lanes = [first]
    for i in range(1, LANES):
        lanes.append(Path(shutil.copytree(first, first.parent / f"lane{i}", symlinks=True)))
    known = {run.run_id for run in runs(db)}

    trials: list[Trial] = []
    for r in range(TRIALS // LANES):
        round_trials = []
        for i, lane in enumerate(lanes):
            set_params(lane, {"seed": 2 + r})  # the stage is out of date: DVC runs it
            signum = (signal.SIGINT, signal.SIGTERM)[(r + i) % 2]
            frozen = r % 2 == 1
            moment = None if frozen else random.uniform(0.05, 0.9 * seconds)
            shell = (BASH, SH)[(r // 2 + i) % 2]  # each signal, frozen or not, in each shell
            round_trials.append(Trial(lane, signum, frozen, moment, shell))
        _round(round_trials, url, proc, db, seconds)
        for trial in round_trials:
            _check(trial)
        trials += round_trials

    # The server is back: the runs left RUNNING are closed. And the next `dvc repro`: the whole
    # pipeline in one workspace, the stage stopped in the others (its runs are alive meanwhile).
    targets = {lane: () if lane == first else ("train@h25",) for lane in lanes}
    closing, *finals = in_parallel(
        lambda: close_orphans(first, url),
        *(lambda lane=lane: _next_repro(lane, url, *targets[lane]) for lane in lanes),
    )
    new = [run for run in runs(db) if run.run_id not in known]

    repaired = sum(t.repaired for t in trials)
    report = (
        f"seed {seed}, a repro of the stage took {seconds:.1f} s, DVC's lock file repaired "
        f"after {repaired} of its own interruptions"
    )
    failed = [f"{t}: {'; '.join(t.problems)}\n{t.output[-1500:]}" for t in trials if t.problems]
    assert not failed, report + "\n" + "\n\n".join(failed)
    assert [f for f in finals if f] == [], report
    assert closing.returncode == 0, closing.stderr
    running = [run.run_id for run in new if run.status == "RUNNING"]
    assert running == [], f"{report}: runs left RUNNING: {running}"
    # Where the server answered and the stage's path was in place, the stage closed its run
    # itself: KILLED (or FINISHED, when its status was sent just before the signal).
    by_pid = {run.tags.get("nnbp.pid"): run.status for run in new}
    for trial in trials:
        if trial.in_place and not trial.frozen and str(trial.stage) in by_pid:
            assert by_pid[str(trial.stage)] in ("KILLED", "FINISHED"), f"{report}: {trial}"
    stages = sum(t.stage is not None for t in trials)
    in_place = sum(t.in_place for t in trials)
    assert stages >= TRIALS // 2, f"{report}: only {stages} signals reached a stage"
    assert in_place >= stages // 2, f"{report}: {in_place} of {stages} stages had their handler"
