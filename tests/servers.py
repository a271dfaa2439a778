"""Servers and processes: real servers for the tests, started as the docs start them, on
127.0.0.1 only: the team's MLflow tracking server (optionally behind MLflow's authentication app)
and a client of its REST API; the MLflow UI as the README's command runs it; the S3-compatible
store a DVC remote points at (moto's server); a stage's processes and waiting for them to end;
and what a test needs that the machine may lack (``missing``: skip, or fail under CI).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.project import BIN, ROOT, clean_env

HEALTH_TIMEOUT = 240  # seconds: the first start migrates the store (~30 s on PostgreSQL)

# No proxy for 127.0.0.1, whatever the environment says.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing(message: str) -> None:
    """Skip, or fail under CI (``CI=true``, which .ci/run sets), where every test must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: this test may not be skipped)")
    pytest.skip(message)


# --- MLflow ----------------------------------------------------------------------------------


ADMIN = "admin"  # admin_username in server/basic_auth.ini
AUTH_CONFIG = ROOT / "server" / "basic_auth.ini"


@dataclass
class Server:
    url: str
    artifacts: Path  # --artifacts-destination
    backend: str
    startup_seconds: float
    admin_password: str


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server and its workers: the process group it leads (start_new_session)."""
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
    ``stop_server``."""
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
                with HTTP.open(f"{url}/health", timeout=5) as response:
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
        stop_server(proc)
        raise


def start_server(
    folder: Path, store: str, port: int | None = None, *, auth: bool = False
) -> tuple[subprocess.Popen, Server]:
    """`mlflow server` on 127.0.0.1 (a free port unless given), backed by ``store``, serving
    artifacts from ``folder``/artifacts; returns once it answers /health. ``stop_server`` stops
    it.

    ``auth``: as the README starts the team server, `--app-name basic-auth` with the secrets in
    the environment only, the auth app's settings from server/basic_auth.ini, and the host check
    for the one name clients use."""
    backend = store.split(":", 1)[0].split("+", 1)[0]
    artifacts, port = folder / "artifacts", port or free_port()
    url = f"http://127.0.0.1:{port}"
    admin_password = secrets.token_urlsafe(18) if auth else ""
    # MLflow's job runner (a consumer per GenAI job type, 7 processes) serves nothing tested here
    env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
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


UI_MARKER = "<!-- ui-command -->"  # README.md: the ```sh block after it is the UI command


def ui_command(readme: Path = ROOT / "README.md") -> tuple[dict[str, str], list[str]]:
    """The README's command for the MLflow UI, the line of the ```sh block after ``UI_MARKER``:
    its leading ``NAME=value`` settings and its words (`mlflow ui ...`)."""
    lines = readme.read_text().splitlines()
    if UI_MARKER not in lines:
        pytest.fail(f"{readme.name} has no {UI_MARKER} before the UI's command")
    at = lines.index(UI_MARKER)
    if not lines[at + 1].startswith("```sh"):
        pytest.fail(f"{readme.name}: no ```sh block right after {UI_MARKER}")
    words = shlex.split(lines[at + 2], comments=True)
    settings = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        settings[name] = value
    if words[:2] != ["mlflow", "ui"]:
        pytest.fail(f"{readme.name}'s UI command is not `mlflow ui ...`: {lines[at + 2]!r}")
    return settings, words


def start_ui(repo: Path, log_folder: Path) -> tuple[subprocess.Popen, str]:
    """The README's UI command (``ui_command``), run from the repository root ``repo`` (its
    default store, mlflow.db), on 127.0.0.1 and a free port; returns it and its URL once
    healthy. It leads its own process group (``stop_server`` stops all of it)."""
    settings, words = ui_command()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "mlflow"), *words[1:], "--host", "127.0.0.1", "--port", str(port)]
    env = clean_env(**settings)
    proc = serve(cmd, repo, url, log_folder / "mlflow-ui.log", env, " ".join(words))
    return proc, url


class Api:
    """The tracking server's REST API (/api/2.0/mlflow/...), as ``user`` with ``password``."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None) -> None:
        self.url = url
        self.headers = {}
        if user is not None:
            pair = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {pair}"

    def request(
        self, endpoint: str, body: dict | None = None, version: str = "2.0", **query: Any
    ) -> urllib.request.Request:
        q = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        return urllib.request.Request(
            f"{self.url}/api/{version}/mlflow/{endpoint}" + (f"?{q}" if q else ""),
            data=None if body is None else json.dumps(body).encode(),
            headers={**self.headers, "Content-Type": "application/json"},
            method="GET" if body is None else "POST",
        )

    def status(self, request: urllib.request.Request) -> int:
        """The HTTP status the server answers ``request`` with."""
        try:
            with HTTP.open(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    def _call(self, request: urllib.request.Request) -> Any:
        try:
            with HTTP.open(request, timeout=60) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            pytest.fail(f"{request.get_method()} {request.full_url}: {e.code} {e.read()[:500]!r}")
        return json.loads(body) if body else {}

    def get(self, endpoint: str, **query: Any) -> Any:
        return self._call(self.request(endpoint, **query))

    def post(self, endpoint: str, body: dict, version: str = "2.0") -> Any:
        return self._call(self.request(endpoint, body, version))

    def artifacts(self, run_id: str, path: str | None = None) -> dict[str, dict]:
        files = self.get("artifacts/list", run_id=run_id, path=path).get("files", [])
        return {f["path"]: f for f in files}

    def download(self, artifact_uri: str, path: str) -> bytes:
        """An artifact's bytes, through the proxied artifact service (mlflow-artifacts:/...)."""
        where = artifact_uri.removeprefix("mlflow-artifacts:/").strip("/")
        request = urllib.request.Request(
            f"{self.url}/api/2.0/mlflow-artifacts/artifacts/{where}/{path}", headers=self.headers
        )
        with HTTP.open(request, timeout=60) as response:
            return response.read()


def add_member(server: Server, user: str) -> tuple[str, str]:
    """A team member's account, created by the admin as the README shows (users/create)."""
    password = secrets.token_urlsafe(15)
    admin = Api(server.url, ADMIN, server.admin_password)
    admin.post("users/create", {"username": user, "password": password})
    return user, password


def member_env(user: str, password: str, url: str) -> dict[str, str]:
    """A member's environment for the pipeline (the README's client setup)."""
    return clean_env(
        MLFLOW_TRACKING_URI=url,
        MLFLOW_TRACKING_USERNAME=user,
        MLFLOW_TRACKING_PASSWORD=password,
        NNBP_TRACKING="on",
    )


def team_server(folder: Path) -> tuple[subprocess.Popen, Server, dict[str, str]]:
    """The README's team server (SQLite-backed, `start_server(auth=True)`) and a member's
    environment for the pipeline (``member_env``) with an account that may log runs."""
    proc, server = start_server(folder, f"sqlite:///{folder / 'mlflow.db'}", auth=True)
    try:
        user, password = add_member(server, "alice")
        return proc, server, member_env(user, password, server.url)
    except BaseException:
        stop_server(proc)
        raise


# --- an S3-compatible store: moto's server ----------------------------------------------


@dataclass
class S3:
    url: str  # the endpoint, DVC's `endpointurl`
    bucket: str
    key_id: str  # a user's access key, allowed everything on S3
    secret: str

    def env(self, secret: str | None = None) -> dict[str, str]:
        """The credentials as DVC's S3 client reads them from the environment."""
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret if secret is None else secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


# The set-up makes exactly these many requests (user, its key, its policy, the bucket); moto
# checks credentials and signatures from the next one on, as a real S3 store does.
S3_SETUP_ACTIONS = 4


def start_s3_server(folder: Path, bucket: str = "tp5-dvc") -> tuple[subprocess.Popen, S3]:
    """moto's S3 server on 127.0.0.1 with a bucket and one user's access key; requests signed
    with anything else are refused (403). ``stop_server`` stops it."""
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_env(INITIAL_NO_AUTH_ACTION_COUNT=str(S3_SETUP_ACTIONS))
    log_path = folder / "s3.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with HTTP.open(f"{url}/moto-api/", timeout=5) as response:  # counts no action
                    if response.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"moto_server not up after 60 s: {log_path.read_text()[-2000:]}")
            time.sleep(0.3)
        setup = {
            "endpoint_url": url,
            "region_name": "us-east-1",
            "aws_access_key_id": "setup",
            "aws_secret_access_key": "setup",
        }
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="team")
        key = iam.create_access_key(UserName="team")["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="team", PolicyName="s3", PolicyDocument=json.dumps(policy))
        boto3.client("s3", **setup).create_bucket(Bucket=bucket)
    except BaseException:
        stop_server(proc)
        raise
    return proc, S3(url, bucket, key["AccessKeyId"], key["SecretAccessKey"])


# --- processes --------------------------------------------------------------------------------


def stage_processes(root: Path, script: str = "stages/train.py") -> list[int]:
    """Pids of the running ``python SCRIPT`` processes whose working folder is ``root`` (not
    the ended ones their parent has not reaped yet)."""
    found, folder, word = [], root.resolve(), script.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # the command line first: a test polls this, and most processes are not stages
            if word not in (proc / "cmdline").read_bytes().split(b"\0")[:3]:
                continue
            if (proc / "cwd").resolve() == folder and alive(int(proc.name)):
                found.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids of ``pids`` still alive after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if alive(p)]
    return left


def marked_processes(mark: str, value: str) -> list[int]:
    """The live processes whose environment holds ``mark=value`` (``tests.project.clean_env``
    gives every process a test starts its session's mark)."""
    needle = f"{mark}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0") and alive(int(proc.name)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def wait_until(what: str, condition: Callable[[], object], timeout: float = 120) -> object:
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
        missing("unshare (util-linux) is needed to run a process under another host name")
    probe = subprocess.run([unshare, "--uts", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        missing(f"unshare --uts is not permitted here: {probe.stderr.strip()}")
    script = f'hostname {host} && exec "$@"'
    return [unshare, "--uts", "--fork", "sh", "-c", script, "sh", *cmd]
