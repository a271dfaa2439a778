"""The fixtures the test modules share, and how the session runs (its workers' groups, no
process left behind); their helpers live in one module per concern:
``tests.project`` (a copy of the project and the commands run in it), ``tests.params`` (editing
params.yaml), ``tests.store`` (what MLflow stored), ``tests.servers`` (servers and processes),
``tests.badfiles`` (bad inputs) and ``tests.browser`` (Chromium).

At the end of the session no process a test started may be left running (``SESSION_MARK``):
the run fails, naming them, and they are killed.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.project import (
    SESSION_MARK,
    Pipeline,
    copy_repo,
    leftover_temp_files,
    make_workspace,
    snapshot,
)
from tests.store import init_store


@pytest.fixture
def repo_copy(tmp_path: Path) -> Callable[..., Path]:
    """``repo_copy(iters=20, log_every=10)``: a committed copy of the workspace (`copy_repo`)."""

    def make(name: str = "repo", **params: Any) -> Path:
        return copy_repo(tmp_path / name, **params)

    return make


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """One `dvc repro` of the whole pipeline (the digits, ``Pipeline.ITERS`` iterations,
    tracked), shared by every test that only reads its results: such a test leaves ``root`` as
    it found it."""
    root = tmp_path_factory.mktemp("pipeline") / "repo"
    run = Pipeline(copy_repo(root, iters=Pipeline.ITERS, log_every=Pipeline.LOG_EVERY))
    run.repro()
    return run


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stage scripts' workspace, for the tests that run a stage by hand: params.yaml,
    dvc.yaml and the outputs of the data, prepare and train@h25 stages
    (``tests.project.make_workspace``). A test that changes it restores it."""
    root = tmp_path_factory.mktemp("workspace")
    make_workspace(root)
    return root


@pytest.fixture
def unchanged(workspace: Path) -> Iterator[Path]:
    """The workspace; after the test, its outputs must be as they were, with no temp file."""
    before = snapshot(workspace)
    assert before, "the workspace has no outputs to compare with"
    yield workspace
    assert snapshot(workspace) == before
    assert leftover_temp_files(workspace) == []


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("mlflow") / "template.db"
    init_store(db)
    return db


@pytest.fixture
def mlflow_uri(mlflow_template: Path, tmp_path: Path) -> str:
    """A fresh, initialised MLflow SQLite store of this test: its URI."""
    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template, db)
    return f"sqlite:///{db}"


@pytest.fixture(scope="module")
def team_tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The README's team MLflow server for a module: (its ``Server``, a member's environment)."""
    from tests.servers import stop_server, team_server

    proc, server, env = team_server(tmp_path_factory.mktemp("team-server"))
    try:
        yield server, env
    finally:
        stop_server(proc)


@pytest.hookimpl(tryfirst=True)  # xdist's own hook reads the groups: after this one
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """pytest-xdist's groups (``--dist loadgroup``, pyproject.toml): a module's tests run in one
    worker, in order, sharing its module fixtures; the tests that read the shared ``pipeline``
    all run in one worker, so that it is made once. (Without ``tryfirst``, or on pytest 9.2,
    the groups were ignored: each worker made the module fixtures its tests needed.)"""
    for item in items:
        group = "pipeline" if "pipeline" in item.fixturenames else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_configure(config: pytest.Config) -> None:
    """Mark this session: every process a test starts inherits the mark (``clean_env``)."""
    os.environ.setdefault(SESSION_MARK, str(os.getpid()))


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Iterator[None]:
    """Fail the run if a process a test started outlives it (a queue worker, a server, a
    trainer), and stop it. Checked once, by the process that started the session, after every
    other end of session (pytest-xdist's workers, which carry the mark too, are gone by then)."""
    from tests.servers import marked_processes

    result = yield
    if hasattr(session.config, "workerinput"):  # a worker of pytest-xdist: its controller checks
        return result
    left = marked_processes(SESSION_MARK, os.environ[SESSION_MARK])
    if not left:
        return result
    names = []
    for pid in left:
        try:
            names.append(f"{pid} ({Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r})")
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    print(f"\nprocesses left running by the tests (now killed): {'; '.join(names)}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return result
