"""The project as a test runs it: a throwaway copy of the repository, and the commands a user
types in it (DVC, git, a stage script), each failing the test with its output when it fails.

DVC and the stage scripts never run in the developer's workspace from a test (they would
overwrite its outputs and its MLflow store): they run in a copy, the tracked and the untracked
not ignored files, committed to a fresh git repository.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from nnbp.kernels import PINNED
from tests.params import set_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's python, dvc and mlflow
STAGES = ROOT / "stages"
GIT_ID = ["-c", "user.name=nnbp tests", "-c", "user.email=tests@nnbp.invalid"]
OUTPUT_DIRS = ("data/prepared", "models", "reports")
# Every process a test starts carries this mark in its environment: at the end of the session,
# none may be left (conftest.py).
SESSION_MARK = "NNBP_TEST_SESSION"
KERNEL_VARIABLES = tuple(PINNED)  # what `import nnbp` sets in this process


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess of a test.

    The venv first on PATH (dvc.yaml calls `python`), no inherited tracking store, DVC or git
    state, no kernel setting (``import nnbp`` set them in this process; a subprocess decides
    its kernels as on a user's machine), DVC analytics off, tracking off unless ``extra`` sets
    it. ``SHELL`` is bash, as in a terminal, whatever runs the suite: DVC runs a stage through
    it (through /bin/sh where none is set), and dash keeps itself between DVC and the stage.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "DVC_", "GIT_"))
        and k not in ("NNBP_TRACKING", *KERNEL_VARIABLES)
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["NNBP_TRACKING"] = "off"
    env["PYTHONUNBUFFERED"] = "1"
    env["SHELL"] = "/bin/bash"
    env[SESSION_MARK] = os.environ[SESSION_MARK]  # set by conftest.py for the whole session
    env.update(extra)
    return env


def tracked_env(uri: str | None = None, **extra: str) -> dict[str, str]:
    """``clean_env`` with tracking on: to ``uri``, or to the default store (the copy's
    mlflow.db)."""
    env = clean_env(NNBP_TRACKING="on", **extra)
    if uri is not None:
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def run(
    cmd: list[str], cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; on failure, fail the test with its output rather than a bare exit status."""
    result = attempt(cmd, cwd, env, timeout)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
        )
    return result


def attempt(
    cmd: list[str],
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` and return how it went, failed or not (``kw``: more of subprocess.run's)."""
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=dict(env or clean_env()),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def command(*cmd: str) -> list[str]:
    """``cmd`` with its program resolved: git with the tests' identity, anything else the
    venv's own (dvc, mlflow, nnbp-share...)."""
    if cmd[0] == "git":
        return ["git", *GIT_ID, *cmd[1:]]
    return [str(BIN / cmd[0]), *cmd[1:]]


def sh(
    cwd: Path, env: Mapping[str, str] | None, *cmd: str, ok: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``cmd`` (``command``) in ``cwd``; the test fails on a non-zero exit unless ``ok`` is
    False."""
    return (run if ok else attempt)(command(*cmd), cwd, env, timeout)


def git(repo: Path, *args: str) -> str:
    """What `git ARGS` prints in ``repo``; the test fails if it fails."""
    return sh(repo, clean_env(), "git", *args).stdout


def dvc(repo: Path, *args: str, env: Mapping[str, str] | None = None, timeout=600) -> str:
    """What `dvc ARGS` prints in ``repo``; the test fails if it fails."""
    return sh(repo, env, "dvc", *args, timeout=timeout).stdout


def dvc_attempt(
    repo: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`dvc ARGS` in ``repo``, failed or not."""
    return sh(repo, env, "dvc", *args, ok=False, timeout=timeout)


def close_orphans(root: Path, uri: str) -> subprocess.CompletedProcess[str]:
    """``nnbp-close-orphans`` against ``uri``, as a user runs it in ``root``."""
    return attempt([str(BIN / "nnbp-close-orphans")], root, tracked_env(uri), 120)


def wait_for_queue(repo: Path, env: Mapping[str, str] | None = None, timeout=600) -> str:
    """Poll `dvc queue status` until nothing is queued or running, then stop the queue's
    workers (`dvc queue stop`: they would outlive the test); its last status."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            status = dvc(repo, "queue", "status", env=env)
            if not re.search(r"\b(Queued|Running)\b", status):
                return status
            if time.monotonic() > deadline:
                pytest.fail(f"the queue did not drain in {timeout} s:\n{status}")
            time.sleep(1)
    finally:
        dvc_attempt(repo, "queue", "stop", env=env)


def source_files() -> list[str]:
    """The repository's files a copy gets: tracked, and untracked but not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    ).stdout
    return sorted({p for p in listed.split("\0") if p and (ROOT / p).is_file()})


def copy_repo(dest: Path, *, source: str = "digits", **params: Any) -> Path:
    """Copy the workspace to ``dest`` and commit it there; ``params`` (dotted keys given as
    ``data__n_train``) set in params.yaml first.

    ``data.source`` is set to ``source``: scikit-learn's 8x8 digits by default, which train
    several times faster than the 20x20 MNIST default and keep the suite quick.

    Returns ``dest``, a git repository whose HEAD holds every source file and the workspace's
    committed outputs (metrics, histories), with the given params already in its HEAD commit.
    DVC outputs and caches are not copied: ``dvc repro`` there rebuilds everything from the
    embedded data.
    """
    for rel in source_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    set_params(
        dest, {"data.source": source, **{k.replace("__", "."): v for k, v in params.items()}}
    )
    git(dest, "init", "--quiet", "--initial-branch=main")
    git(dest, "add", "--all")
    git(dest, "commit", "--quiet", "--no-verify", "-m", "copy of the workspace")
    return dest


def baseline_copy(dest: Path, **params: Any) -> Path:
    """``copy_repo`` with the shared run's few iterations (and ``params``), its baseline
    reproduced untracked and committed (outputs, dvc.lock): a workspace to run experiments in."""
    params = {"iters": Pipeline.ITERS, "log_every": Pipeline.LOG_EVERY, **params}
    root = copy_repo(dest, **params)
    dvc(root, "repro", env=clean_env())
    git(root, "add", "--all")
    git(root, "commit", "--quiet", "--no-verify", "-m", "the baseline, reproduced")
    return root


def project_files(root: Path, changes: Mapping[str, Any] | None = None) -> Path:
    """The project's params.yaml (with ``changes``) and dvc.yaml in ``root``: what a stage
    reads its parameters from, without the rest of the repository."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, root / name)
    set_params(root, changes or {})
    return root


# --- a stage script, run as the user (or DVC) runs it ----------------------------------------


def stage_cmd(stage: str, *args: str) -> list[str]:
    return [sys.executable, str(STAGES / f"{stage}.py"), *args]


def run_stage(
    stage: str,
    *args: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    **kw: Any,
) -> subprocess.CompletedProcess:
    """Run ``stages/STAGE.py ARGS`` in ``cwd`` (``env``: untracked by default), failed or not."""
    return attempt(stage_cmd(stage, *args), cwd, env, timeout, **kw)


_STAGE_COMMANDS: dict[str, click.Command] = {}


def stage_command(stage: str) -> click.Command:
    """The Click command of ``stages/STAGE.py``, loaded once."""
    if stage not in _STAGE_COMMANDS:
        spec = importlib.util.spec_from_file_location(f"stage_{stage}", STAGES / f"{stage}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _STAGE_COMMANDS[stage] = module.main
    return _STAGE_COMMANDS[stage]


def invoke(
    stage: str, *args: str, cwd: Path, tracking_uri: str | None = None
) -> subprocess.CompletedProcess:
    """Run a stage's command in this process (Click's test runner): the entry point of the
    script without the cost of a new interpreter. Anything but a clean exit propagates."""
    env = {"NNBP_TRACKING": "off", "MLFLOW_TRACKING_URI": None, "DVC_STAGE": None}
    if tracking_uri is not None:
        env.update(NNBP_TRACKING=None, MLFLOW_TRACKING_URI=tracking_uri)
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(
            stage_command(stage), list(args), env=env, catch_exceptions=False
        )
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


# The workspace of the error tests: the digits, few iterations.
WORKSPACE_PARAMS = {"data.source": "digits", "iters": 20, "log_every": 10}


def make_workspace(root: Path) -> None:
    """``project_files`` (``WORKSPACE_PARAMS`` applied) in ``root``, then ``data/digits.npz``,
    ``data/prepared`` and a trained ``h25`` made by the stage scripts, so that every error test
    has previous outputs to compare with."""
    project_files(root, WORKSPACE_PARAMS)
    for stage, args in (("data", ()), ("prepare", ()), ("train", ("h25",))):
        proc = run_stage(stage, *args, cwd=root)
        assert proc.returncode == 0, proc.stderr


# --- what a failed command left -------------------------------------------------------------


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def assert_one_line_error(
    proc: subprocess.CompletedProcess, *fragments: str, status: int | None = None
) -> str:
    """The process failed with exactly one non-empty stderr line holding every fragment."""
    lines = error_lines(proc.stderr)
    assert proc.returncode != 0, f"exit 0; stdout={proc.stdout!r} stderr={proc.stderr!r}"
    if status is not None:
        assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert len(lines) == 1, f"expected one line, got:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path, dirs: tuple[str, ...] = OUTPUT_DIRS) -> dict[str, str]:
    """Every file under ``dirs`` (hidden temporary files included) -> its SHA-256."""
    files = {}
    for d in dirs:
        base = root / d
        if base.is_file():
            files[d] = sha256(base)
            continue
        for p in sorted(base.rglob("*")) if base.is_dir() else ():
            if p.is_file():
                files[str(p.relative_to(root))] = sha256(p)
    return files


def leftover_temp_files(root: Path) -> list[Path]:
    return list(root.rglob(".*.tmp"))


# --- the shared pipeline run -------------------------------------------------------------------

HOOKS = ROOT / "tests" / "hooks"  # sitecustomize.py: the nnbp modules each stage loaded


class Pipeline:
    """A copy of the repository after one `dvc repro` (``root``), tracked to its own SQLite
    store, with ``env`` the environment it ran in; ``modules[stage]``: the files of the nnbp
    modules the stage loaded (relative to ``root``, e.g. ``src/nnbp/backprop.py``)."""

    ITERS, LOG_EVERY = 40, 20
    CONFIGS = ("h25", "h100", "h100_l2")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.records = root.parent / f"{root.name}-modules"
        self.records.mkdir()
        # As on a user's machine: nnbp imported from this copy's src, Python writing bytecode
        # beside it; tracking on (its default store, mlflow.db in the copy).
        self.env = clean_env(
            NNBP_TRACKING="on",
            PYTHONPATH=f"{HOOKS}{os.pathsep}{root / 'src'}",
            NNBP_TEST_MODULES=str(self.records),
        )
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.modules: dict[str, set[str]] = {}

    def repro(self) -> None:
        dvc(self.root, "repro", env=self.env)
        for record in self.records.glob("*.json"):
            entry = json.loads(record.read_text())
            files = {str(Path(f).resolve().relative_to(self.root)) for f in entry["files"]}
            self.modules.setdefault(entry["stage"], set()).update(files)
