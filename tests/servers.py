"""Real servers for the tests, on 127.0.0.1: `mlflow server` (as the README's team section runs
it, or plain), `mlflow ui` as the README's Tracking section runs it, and what a test needs that
the machine may lack (``missing``: skip, or fail under CI)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT, clean_env

HEALTH_TIMEOUT = 240  # seconds: the first start migrates the store (~30 s on PostgreSQL)
ADMIN = "admin"  # admin_username in server/basic_auth.ini
AUTH_CONFIG = ROOT / "server" / "basic_auth.ini"

# No proxy for 127.0.0.1, whatever the environment says.
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing(message: str) -> None:
    """Skip, or fail under CI (``CI=true``, which .ci/run sets), where every test must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: this test may not be skipped)")
    pytest.skip(message)


@dataclass
class Server:
    url: str
    artifacts: Path  # --artifacts-destination
    backend: str
    startup_seconds: float
    admin_password: str


def stop(proc: subprocess.Popen) -> None:
    """Stop a server and its workers: the process group it leads (start_new_session)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def serve(
    cmd: Sequence[str], cwd: Path, url: str, log_path: Path, env: Mapping[str, str], what: str
) -> subprocess.Popen:
    """Start ``cmd`` in ``cwd`` (output to ``log_path``) and return once ``url``/health answers
    200; the test fails with the server's log if it exits or stays unhealthy. Stop it with
    ``stop``."""
    start = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{what} exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with http.open(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        return proc
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() - start > HEALTH_TIMEOUT:
                pytest.fail(
                    f"{what} not healthy after {HEALTH_TIMEOUT} s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
    except BaseException:
        stop(proc)
        raise


def start_server(
    folder: Path, store: str, port: int | None = None, *, auth: bool = False
) -> tuple[subprocess.Popen, Server]:
    """`mlflow server` on 127.0.0.1 (a free port unless given), backed by ``store``, serving
    artifacts from ``folder``/artifacts; returns once it answers /health. Stop it with ``stop``.

    ``auth``: as the README starts the team server, `--app-name basic-auth` with the secrets in
    the environment only, the auth app's settings from server/basic_auth.ini, and the host check
    for the one name clients use."""
    backend = store.split(":", 1)[0].split("+", 1)[0]
    artifacts, port = folder / "artifacts", port or free_port()
    url = f"http://127.0.0.1:{port}"
    admin_password = secrets.token_urlsafe(18) if auth else ""
    env = clean_env()
    cmd = [str(BIN / "mlflow"), "server"]
    if auth:
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(AUTH_CONFIG),
            MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32),
        )
        cmd += ["--app-name", "basic-auth", "--allowed-hosts", f"127.0.0.1:{port}"]
    cmd += [
        *("--backend-store-uri", store, "--serve-artifacts"),
        *("--artifacts-destination", str(artifacts)),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    start = time.monotonic()
    proc = serve(cmd, folder, url, folder / "server.log", env, f"mlflow server ({backend})")
    return proc, Server(url, artifacts, backend, time.monotonic() - start, admin_password)


def start_ui(repo: Path, log_folder: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow ui` as the README runs it, from the repository root ``repo`` (its default store,
    mlflow.db), on 127.0.0.1 and a free port; returns it and its URL once healthy."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "mlflow"), "ui", "--host", "127.0.0.1", "--port", str(port)]
    proc = serve(cmd, repo, url, log_folder / "mlflow-ui.log", clean_env(), "mlflow ui")
    return proc, url
