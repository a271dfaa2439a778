"""Shared fixtures: a throwaway copy of the repository to run the real pipeline in.

DVC and the stage scripts must never run in the developer's workspace from a test (they would
overwrite its outputs and its MLflow store), so the slow tests work in a copy: the tracked and the
untracked, not ignored files, committed to a fresh git repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's python, dvc and mlflow

GIT_ID = ["-c", "user.name=nnbp tests", "-c", "user.email=tests@nnbp.invalid"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a pipeline subprocess.

    The venv first on PATH (dvc.yaml calls `python`), no inherited tracking store, DVC or git
    state, DVC analytics off, tracking off unless ``extra`` sets it.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "DVC_", "GIT_")) and k != "NNBP_TRACKING"
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["NNBP_TRACKING"] = "off"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(
    cmd: list[str], cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; on failure, fail the test with its output rather than a bare exit status."""
    result = subprocess.run(
        cmd, cwd=cwd, env=dict(env or clean_env()), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
        )
    return result


def git(repo: Path, *args: str) -> str:
    return run(["git", *GIT_ID, *args], repo, clean_env()).stdout


def dvc(repo: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    return run([str(BIN / "dvc"), *args], repo, env or clean_env()).stdout


def _source_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    ).stdout
    return sorted({p for p in listed.split("\0") if p and (ROOT / p).is_file()})


def set_params(repo: Path, **updates: Any) -> None:
    """Set top-level keys of the copy's params.yaml in place, keeping its comments."""
    path = repo / "params.yaml"
    text = path.read_text()
    for key, value in updates.items():
        flow = json.dumps(value)  # JSON is YAML's flow style
        text, n = re.subn(
            rf"^({re.escape(key)}:[ \t]*)[^#\n]*?([ \t]*(#.*)?)$",
            lambda m, flow=flow: f"{m.group(1)}{flow}{m.group(2)}",
            text,
            count=1,
            flags=re.M,
        )
        assert n == 1, f"{key} is not a top-level key of params.yaml"
    path.write_text(text)


def set_data_source(repo: Path, source: str) -> None:
    """Set ``data.source`` in the copy's params.yaml in place."""
    path = repo / "params.yaml"
    text, n = re.subn(
        r"^(  source:[ \t]*)[a-z]+", rf"\g<1>{source}", path.read_text(), count=1, flags=re.M
    )
    assert n == 1, "data.source is not in params.yaml"
    path.write_text(text)


def copy_repo(dest: Path, *, source: str = "digits", **params: Any) -> Path:
    """Copy the workspace to ``dest`` and commit it there; ``params`` set top-level params first.

    ``data.source`` is set to ``source``: scikit-learn's 8x8 digits by default, which train
    several times faster than the 20x20 MNIST default and keep the suite quick.

    Returns ``dest``, a git repository whose HEAD holds every source file and the workspace's
    committed outputs (metrics, histories), with the given params already in its HEAD commit.
    DVC outputs and caches are not copied: ``dvc repro`` there rebuilds everything from the
    embedded data.
    """
    for rel in _source_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    set_params(dest, **params)
    set_data_source(dest, source)
    git(dest, "init", "--quiet", "--initial-branch=main")
    git(dest, "add", "--all")
    git(dest, "commit", "--quiet", "--no-verify", "-m", "copy of the workspace")
    return dest


@pytest.fixture
def repo_copy(tmp_path: Path) -> Callable[..., Path]:
    """``repo_copy(iters=20, log_every=10)``: a committed copy of the workspace (`copy_repo`)."""

    def make(name: str = "repo", **params: Any) -> Path:
        return copy_repo(tmp_path / name, **params)

    return make


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module's workspace: params.yaml, dvc.yaml and the outputs of the data, prepare and
    train@h25 stages, made by the stage scripts (``errors_helpers.make_workspace``)."""
    from tests.errors_helpers import make_workspace

    root = tmp_path_factory.mktemp("workspace")
    make_workspace(root)
    return root


@pytest.fixture(scope="module")
def team_tracking(tmp_path_factory: pytest.TempPathFactory):
    """The README's team MLflow server for a module: (its ``Server``, a member's environment)."""
    from tests.servers import stop_server, team_server

    proc, server, env = team_server(tmp_path_factory.mktemp("team-server"))
    try:
        yield server, env
    finally:
        stop_server(proc)


# --- the shared pipeline run --------------------------------------------------------------------

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


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """One `dvc repro` of the whole pipeline (the digits, ``Pipeline.ITERS`` iterations),
    shared by every test that only reads its results: such a test must leave ``root`` as it
    found it."""
    run = Pipeline(
        copy_repo(
            tmp_path_factory.mktemp("pipeline") / "repo",
            iters=Pipeline.ITERS,
            log_every=Pipeline.LOG_EVERY,
        )
    )
    run.repro()
    return run
