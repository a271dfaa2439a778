"""Team tracking: the pipeline logs to an `mlflow server` (PostgreSQL or SQLite backend store,
proxied artifacts), read back through its REST API; and tracking problems fail at once.

The PostgreSQL server is a throwaway cluster (initdb + pg_ctl) in a temporary folder, listening
on 127.0.0.1 only. Without PostgreSQL the test is skipped, except under CI=true where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from nnbp.tracking import EXPERIMENT
from tests.conftest import BIN, clean_env, copy_repo, dvc, train_args

HEALTH_TIMEOUT = 240  # seconds: the first start migrates the store (~30 s on PostgreSQL)
PG_DEFAULT_BIN = Path("/usr/lib/postgresql/15/bin")  # Debian's postgresql-15
ITERS, LOG_EVERY = 20, 10

# No proxy for 127.0.0.1, whatever the environment says.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing(message: str) -> None:
    """Skip, or fail under CI, where the server tests must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: the tracking server tests may not be skipped)")
    pytest.skip(message)


# --- PostgreSQL ----------------------------------------------------------------------------


def _pg_bin() -> Path | None:
    """initdb and pg_ctl: $NNBP_PG_BIN, Debian's 15, any /usr/lib/postgresql/*/bin, or PATH."""
    candidates = [Path(os.environ["NNBP_PG_BIN"])] if os.environ.get("NNBP_PG_BIN") else []
    candidates.append(PG_DEFAULT_BIN)
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(
        versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True
    )
    if shutil.which("pg_ctl"):
        candidates.append(Path(shutil.which("pg_ctl")).parent)
    return next(
        (c for c in candidates if (c / "initdb").is_file() and (c / "pg_ctl").is_file()), None
    )


def _pg(cmd: list[str], as_user: list[str], what: str, timeout: float = 120) -> None:
    result = subprocess.run(
        [*as_user, *cmd], capture_output=True, text=True, timeout=timeout, env=clean_env()
    )
    if result.returncode != 0:
        pytest.fail(
            f"{what} failed ({result.returncode}): {(result.stdout + result.stderr)[-2000:]}"
        )


@pytest.fixture
def postgres_db() -> Iterator[str]:
    """A PostgreSQL cluster with a database `mlflow`; yields its SQLAlchemy URI."""
    pg = _pg_bin()
    if pg is None:
        _missing(
            f"PostgreSQL server binaries (initdb, pg_ctl) not found in {PG_DEFAULT_BIN}, "
            "/usr/lib/postgresql/*/bin or PATH: install postgresql (apt-get install "
            "postgresql-15) or set NNBP_PG_BIN"
        )
    try:
        import psycopg2  # noqa: F401  (the server's driver: postgresql+psycopg2://)
    except ImportError:
        _missing("psycopg2 is not installed: pip install -e '.[dev]'")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as postgres
        # runuser lives in /usr/sbin or /sbin, which a non-login PATH may leave out.
        search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        runuser = shutil.which("runuser", path=search)
        if runuser is None:
            _missing("running as root without runuser: cannot start PostgreSQL as postgres")
        try:
            import pwd

            owner = pwd.getpwnam("postgres")
        except KeyError:
            _missing("running as root and there is no postgres user to run PostgreSQL as")
        as_user = [runuser, "-u", "postgres", "--"]
    # Not pytest's tmp_path: its parents are private to the current user.
    folder = Path(tempfile.mkdtemp(prefix="nnbp-pg-"))
    if as_user:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    data, port = folder / "data", _free_port()
    started = False
    try:
        _pg(
            [
                str(pg / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            as_user,
            "initdb",
        )
        options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off"
        started = True  # pg_ctl may leave a server behind even when it reports a failure
        _pg(
            [
                str(pg / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(folder / "postgres.log"),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ],
            as_user,
            "pg_ctl start",
        )
        _pg(
            [str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"],
            as_user,
            "createdb",
        )
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the dev extras install psycopg2.
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        if started:
            stop = [
                *as_user,
                str(pg / "pg_ctl"),
                "-D",
                str(data),
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
                "stop",
            ]
            if subprocess.run(stop, capture_output=True, timeout=60, env=clean_env()).returncode:
                stop[stop.index("fast")] = "immediate"
                subprocess.run(stop, capture_output=True, timeout=60, env=clean_env())
        shutil.rmtree(folder, ignore_errors=True)


# --- the MLflow server -----------------------------------------------------------------------


@dataclass
class Server:
    url: str
    artifacts: Path  # --artifacts-destination
    backend: str
    startup_seconds: float


def _stop(proc: subprocess.Popen) -> None:
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


@pytest.fixture(params=["sqlite", "postgresql"])
def mlflow_server(request, tmp_path) -> Iterator[Server]:
    """`mlflow server` on a free 127.0.0.1 port, serving artifacts from a temporary folder."""
    backend = request.param
    folder = tmp_path / "server"
    folder.mkdir()
    if backend == "postgresql":
        store = request.getfixturevalue("postgres_db")
    else:
        store = f"sqlite:///{folder / 'mlflow.db'}"
    artifacts, port = folder / "artifacts", _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        store,
        "--artifacts-destination",
        str(artifacts),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log_path = folder / "server.log"
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=folder,
            env=clean_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while True:
            if proc.poll() is not None:
                log = log_path.read_text()[-3000:]
                pytest.fail(f"mlflow server ({backend}) exited {proc.returncode}:\n{log}")
            try:
                with _http.open(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() - start > HEALTH_TIMEOUT:
                pytest.fail(
                    f"mlflow server ({backend}) not healthy after {HEALTH_TIMEOUT} s:\n"
                    f"{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield Server(url, artifacts, backend, time.monotonic() - start)
    finally:
        _stop(proc)


class Api:
    """The tracking server's REST API (/api/2.0/mlflow/...)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _call(self, request: urllib.request.Request) -> Any:
        try:
            with _http.open(request, timeout=60) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            pytest.fail(f"{request.get_method()} {request.full_url}: {e.code} {e.read()[:500]!r}")
        return json.loads(body) if body else {}

    def get(self, endpoint: str, **query: Any) -> Any:
        q = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        return self._call(urllib.request.Request(f"{self.url}/api/2.0/mlflow/{endpoint}?{q}"))

    def post(self, endpoint: str, body: dict) -> Any:
        return self._call(
            urllib.request.Request(
                f"{self.url}/api/2.0/mlflow/{endpoint}",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
        )

    def artifacts(self, run_id: str, path: str | None = None) -> dict[str, dict]:
        files = self.get("artifacts/list", run_id=run_id, path=path).get("files", [])
        return {f["path"]: f for f in files}

    def download(self, artifact_uri: str, path: str) -> bytes:
        """An artifact's bytes, through the proxied artifact service (mlflow-artifacts:/...)."""
        where = artifact_uri.removeprefix("mlflow-artifacts:/").strip("/")
        request = urllib.request.Request(
            f"{self.url}/api/2.0/mlflow-artifacts/artifacts/{where}/{path}"
        )
        with _http.open(request, timeout=60) as response:
            return response.read()


@pytest.mark.slow
def test_pipeline_logs_every_configuration_to_the_team_server(mlflow_server, tmp_path):
    server = mlflow_server
    repo = copy_repo(tmp_path / "repo", iters=ITERS, log_every=LOG_EVERY)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    configs = params["configs"]

    started = time.monotonic()
    dvc(repo, "repro", env=clean_env(MLFLOW_TRACKING_URI=server.url, NNBP_TRACKING="on"))
    pipeline_seconds = time.monotonic() - started
    assert not (repo / "mlflow.db").exists(), "runs went to the local store, not the server"

    started = time.monotonic()
    api = Api(server.url)
    experiment = api.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    found = api.post(
        "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000}
    ).get("runs", [])

    def config_of(run: dict) -> str:
        return {p["key"]: p["value"] for p in run["data"].get("params", [])}["config"]

    assert sorted(map(config_of, found)) == sorted(configs), "expected one run per configuration"
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()

    for run in found:
        info, data = run["info"], run["data"]
        name, run_id = config_of(run), info["run_id"]
        assert info["run_name"] == f"{name} (repro {commit[:7]})"
        config = {**params, **configs[name]}
        assert info["status"] == "FINISHED", name

        logged = {p["key"]: p["value"] for p in data.get("params", [])}
        expected = {
            "config": name,
            "hidden": str(list(config["hidden"])),
            "tau": str(float(config["tau"])),
            "lamb": str(float(config["lamb"])),
            "iters": str(ITERS),
            "log_every": str(LOG_EVERY),
            "seed": str(config["seed"]),
            "gradient": config["gradient"],
            "dtype": config["dtype"],
            "sizes": f"64-{'-'.join(map(str, config['hidden']))}-10",
        }
        assert {k: logged.get(k) for k in expected} == expected, name
        tags = {t["key"]: t["value"] for t in data.get("tags", [])}
        assert tags.get("git_commit") == commit

        # Step metrics: every log point, the same values as the stage's history file.
        history = json.loads((repo / "reports" / "history" / f"{name}.json").read_text())
        steps = [row["step"] for row in history]
        assert steps == list(range(0, ITERS + 1, LOG_EVERY))
        for key in ("loss", "train_acc", "test_acc"):
            points = api.get("metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
            points.sort(key=lambda m: m["step"])
            assert [m["step"] for m in points] == steps, (name, key)
            assert [m["value"] for m in points] == pytest.approx([row[key] for row in history])

        # Artifacts: listed by the server, stored under --artifacts-destination, downloadable.
        assert set(api.artifacts(run_id)) == {"figures", "history"}
        for folder, files in {
            "figures": ["figures/features.png", "figures/curves.png"],
            "history": [f"history/{name}.json"],
        }.items():
            listed = api.artifacts(run_id, folder)
            for path in files:
                assert path in listed, (name, path, sorted(listed))
                assert int(listed[path]["file_size"]) > 0
        artifact_uri = info["artifact_uri"]
        assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri
        # The model: a LoggedModel of the run, its weights the file DVC tracks.
        (output,) = run["outputs"]["model_outputs"]
        model = api.get(f"logged-models/{output['model_id']}")["model"]
        assert model["info"]["source_run_id"] == run_id
        location = model["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/")
        stored = server.artifacts / location.strip("/")
        assert (stored / "artifacts" / f"{name}.npz").read_bytes() == (
            repo / "models" / f"{name}.npz"
        ).read_bytes()
        assert (
            api.download(artifact_uri, f"history/{name}.json")
            == (repo / "reports" / "history" / f"{name}.json").read_bytes()
        )

    print(
        f"\n[{server.backend}] server ready in {server.startup_seconds:.1f} s, "
        f"dvc repro {pipeline_seconds:.1f} s, REST read-back {time.monotonic() - started:.1f} s"
    )


# --- tracking problems fail at once --------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_repo(tmp_path_factory) -> Path:
    """A copy of the repository with the data prepared (`dvc repro prepare`), nothing trained."""
    repo = copy_repo(tmp_path_factory.mktemp("tracking") / "repo", iters=LONG)
    dvc(repo, "repro", "prepare")
    return repo


def _train(
    repo: Path, out: str, iters: int, **env: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    """`python stages/train.py` for h25 as dvc.yaml runs it, writing into ``out``."""
    options = train_args(
        iters=iters,
        log_every=min(iters, LOG_EVERY),
        model=f"{out}/h25.npz",
        history=f"{out}/h25.json",
    )
    cmd = [sys.executable, "stages/train.py", *options]
    started = time.monotonic()
    result = subprocess.run(
        cmd, cwd=repo, env=clean_env(**env), capture_output=True, text=True, timeout=300
    )
    return result, time.monotonic() - started


# Far more iterations than a few seconds allow: a late failure would show as a timeout.
LONG = 500_000
FAST = 15  # seconds: Python and NumPy start-up on a loaded machine, then the failed check


def test_closed_port_fails_before_training_with_one_line(prepared_repo):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    result, seconds = _train(
        prepared_repo, "out-closed", LONG, MLFLOW_TRACKING_URI=url, NNBP_TRACKING="on"
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert url in lines[0] and "NNBP_TRACKING=off" in lines[0]
    assert seconds < FAST, f"took {seconds:.1f} s"
    assert not (prepared_repo / "out-closed").exists()


def test_port_that_does_not_speak_http_fails_with_one_line(prepared_repo):
    """MLFLOW_TRACKING_URI pointing at, say, PostgreSQL's port: an answer that is not HTTP."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def answer() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(b"this is not HTTP\r\n")

    threading.Thread(target=answer, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        result, seconds = _train(
            prepared_repo, "out-garbage", LONG, MLFLOW_TRACKING_URI=url, NNBP_TRACKING="on"
        )
    finally:
        listener.close()
    assert result.returncode != 0
    assert seconds < FAST
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert url in result.stderr


def test_tracking_off_trains_and_writes_outputs(prepared_repo):
    url = f"http://127.0.0.1:{_free_port()}"  # unreachable, and ignored
    result, _ = _train(
        prepared_repo, "out-off", ITERS, MLFLOW_TRACKING_URI=url, NNBP_TRACKING="off"
    )
    assert result.returncode == 0, result.stderr
    assert "h25: loss" in result.stdout
    assert (prepared_repo / "out-off" / "h25.npz").stat().st_size > 0
    history = json.loads((prepared_repo / "out-off" / "h25.json").read_text())
    assert [row["step"] for row in history] == [0, 10, 20]
    assert not (prepared_repo / "mlflow.db").exists()


@pytest.mark.slow
def test_train_stage_through_dvc_fails_at_once_on_a_closed_port(prepared_repo):
    url = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "dvc"), "repro", "train@h25"],
        cwd=prepared_repo,
        env=clean_env(MLFLOW_TRACKING_URI=url, NNBP_TRACKING="on"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"MLflow tracking server {url} cannot be reached" in result.stderr
    assert seconds < 2 * FAST, f"took {seconds:.1f} s"
    assert not (prepared_repo / "models" / "h25.npz").exists()
