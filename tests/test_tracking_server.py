"""Team tracking: the pipeline logs to an `mlflow server` with MLflow's authentication app
(PostgreSQL or SQLite backend store, proxied artifacts), as the README's team section sets it
up, read back through its REST API; and tracking problems, wrong credentials among them, fail at
once.

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
from pathlib import Path

import mlflow
import numpy as np
import pytest

from nnbp.artifacts import Prepared, TrainedModel
from nnbp.backprop import predict
from nnbp.dvcfiles import read_yaml
from nnbp.files import file_md5
from nnbp.tooling.tracking.store import EXPERIMENT
from tests.params import set_params
from tests.project import BIN, clean_env, copy_repo, dvc
from tests.servers import (
    ADMIN,
    Api,
    Server,
    add_member,
    free_port,
    member_env,
    missing,
    start_server,
    stop_server,
)
from tests.store import runs, server_runs

PG_DEFAULT_BIN = Path("/usr/lib/postgresql/15/bin")  # Debian's postgresql-15
ITERS, LOG_EVERY = 20, 10


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


@pytest.fixture(scope="module")
def postgres_db() -> Iterator[str]:
    """A PostgreSQL cluster with a database `mlflow`; yields its SQLAlchemy URI."""
    pg = _pg_bin()
    if pg is None:
        missing(
            f"PostgreSQL server binaries (initdb, pg_ctl) not found in {PG_DEFAULT_BIN}, "
            "/usr/lib/postgresql/*/bin or PATH: install postgresql (apt-get install "
            "postgresql-15) or set NNBP_PG_BIN"
        )
    try:
        import psycopg2  # noqa: F401  (the server's driver: postgresql+psycopg2://)
    except ImportError:
        missing("psycopg2 is not installed: pip install -e '.[dev]'")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as postgres
        # runuser lives in /usr/sbin or /sbin, which a non-login PATH may leave out.
        search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        runuser = shutil.which("runuser", path=search)
        if runuser is None:
            missing("running as root without runuser: cannot start PostgreSQL as postgres")
        try:
            import pwd

            owner = pwd.getpwnam("postgres")
        except KeyError:
            missing("running as root and there is no postgres user to run PostgreSQL as")
        as_user = [runuser, "-u", "postgres", "--"]
    # Not pytest's tmp_path: its parents are private to the current user.
    folder = Path(tempfile.mkdtemp(prefix="nnbp-pg-"))
    if as_user:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    data, port = folder / "data", free_port()
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


# --- the MLflow server, as the README's team section runs it ------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def mlflow_server(request, tmp_path_factory) -> Iterator[Server]:
    """The team server of the README (`start_server(..., auth=True)`), SQLite- or
    PostgreSQL-backed."""
    backend = request.param
    folder = tmp_path_factory.mktemp(f"server-{backend}")
    if backend == "postgresql":
        store = request.getfixturevalue("postgres_db")
    else:
        store = f"sqlite:///{folder / 'mlflow.db'}"
    proc, server = start_server(folder, store, auth=True)
    try:
        yield server
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_server_refuses_requests_without_valid_credentials_or_from_other_hosts(mlflow_server):
    server = mlflow_server
    search = {"max_results": 10}
    anonymous = Api(server.url)
    assert anonymous.status(anonymous.request("experiments/search", **search)) == 401
    wrong = Api(server.url, ADMIN, server.admin_password + "x")
    assert wrong.status(wrong.request("experiments/search", **search)) == 401
    admin = Api(server.url, ADMIN, server.admin_password)
    assert admin.status(admin.request("experiments/search", **search)) == 200
    # --allowed-hosts: a page on another site that resolves its name to this server (DNS
    # rebinding) sends its own Host header, and is refused
    rebound = admin.request("experiments/search", **search)
    rebound.add_header("Host", "attacker.invalid")
    assert admin.status(rebound) == 403
    # artifacts too: the proxied artifact service asks for credentials
    listing = urllib.request.Request(f"{server.url}/api/2.0/mlflow-artifacts/artifacts")
    assert anonymous.status(listing) == 401


@pytest.mark.slow
def test_pipeline_logs_every_configuration_to_the_team_server(mlflow_server, tmp_path, monkeypatch):
    server = mlflow_server
    one = {"h25": {"hidden": [25]}}  # a configuration is logged as any other is
    repo = copy_repo(tmp_path / "repo", iters=ITERS, log_every=LOG_EVERY, configs=one)
    params = read_yaml(repo / "params.yaml")
    configs = params["configs"]
    user, password = add_member(server, "alice")

    started = time.monotonic()
    dvc(repo, "repro", env=member_env(user, password, server.url))
    pipeline_seconds = time.monotonic() - started
    assert not (repo / "mlflow.db").exists(), "runs went to the local store, not the server"

    started = time.monotonic()
    api = Api(server.url, user, password)
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
        assert tags.get("mlflow.user") == user
        inputs = {
            i["dataset"]["name"]: (i["dataset"]["digest"], i["tags"])
            for i in run["inputs"]["dataset_inputs"]
        }
        digest = file_md5(repo / "data" / "digits.npz")
        assert inputs == {
            "digits.npz:training": (digest, [{"key": "mlflow.data.context", "value": "training"}]),
            "digits.npz:test": (digest, [{"key": "mlflow.data.context", "value": "test"}]),
        }

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

        # ... and it loads from the server, with the member's credentials, as MLflow's client
        # reads them from the environment; it predicts what nnbp predicts.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(server.url)
        try:
            loaded = mlflow.pyfunc.load_model(f"models:/{output['model_id']}")
        finally:
            mlflow.set_tracking_uri(previous)
        model = TrainedModel.load(repo / "models" / f"{name}.npz")
        data = Prepared.load(repo / "data" / "prepared")
        digits = (predict(list(model.weights), data.X_test) + 1) % 10
        np.testing.assert_array_equal(loaded.predict(data.X_test.T), digits)

    print(
        f"\n[{server.backend}] server ready in {server.startup_seconds:.1f} s, "
        f"dvc repro {pipeline_seconds:.1f} s, REST read-back {time.monotonic() - started:.1f} s"
    )

    # Another member may read the experiment (default_permission READ), not log to it, until
    # the admin grants EDIT as the README shows.
    experiment_id = experiment["experiment_id"]
    bob = Api(server.url, *add_member(server, "bob"))
    create = {"experiment_id": experiment_id, "run_name": "bob's"}
    assert bob.status(bob.request("experiments/get", experiment_id=experiment_id)) == 200
    assert bob.status(bob.request("runs/create", create)) == 403
    grant = {
        "username": "bob",
        "resource_type": "experiment",
        "resource_id": experiment_id,
        "permission": "EDIT",
    }
    Api(server.url, ADMIN, server.admin_password).post("users/permissions/grant", grant, "3.0")
    assert bob.status(bob.request("runs/create", create)) == 200


@pytest.mark.slow
def test_wrong_password_fails_before_training_in_one_line_leaving_the_outputs(
    mlflow_server, prepared_repo
):
    server = mlflow_server
    user, password = add_member(server, "carol")
    out = f"out-wrong-password-{server.backend}"
    result, _ = _train(prepared_repo, out, ITERS, NNBP_TRACKING="off")  # previous outputs
    assert result.returncode == 0, result.stderr
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (prepared_repo / out).iterdir()}
    admin = Api(server.url, ADMIN, server.admin_password)
    runs_before = server_runs(admin)

    env = member_env(user, password + "-wrong", server.url)
    result, seconds = _train(prepared_repo, out, LONG, **{k: env[k] for k in WITH_CREDENTIALS})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: MLflow tracking server {server.url} ")
    assert "MLFLOW_TRACKING_USERNAME" in lines[0] and "MLFLOW_TRACKING_PASSWORD" in lines[0]
    assert seconds < FAST, f"took {seconds:.1f} s"  # LONG iterations: it did not train
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (prepared_repo / out).iterdir()}
    assert after == before
    assert server_runs(admin) == runs_before  # no run was opened


# --- tracking problems fail at once --------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_repo(tmp_path_factory) -> Path:
    """A copy of the repository with the data prepared (`dvc repro prepare`), nothing trained."""
    repo = copy_repo(tmp_path_factory.mktemp("tracking") / "repo", iters=LONG)
    dvc(repo, "repro", "prepare")
    return repo


def _train_command(repo: Path, out: str, iters: int, log_every: int = LOG_EVERY) -> list[str]:
    """`python stages/train.py h25` as dvc.yaml runs it, writing into ``out``, with ``iters``
    (and ``log_every``) in the copy's params.yaml."""
    set_params(repo, {"iters": iters, "log_every": min(iters, log_every)})
    return [sys.executable, "stages/train.py", "h25", "--models", out, "--histories", out]


def _train(
    repo: Path, out: str, iters: int, **env: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    """``_train_command``, run to its end: (its result, its wall seconds)."""
    cmd = _train_command(repo, out, iters)
    started = time.monotonic()
    result = subprocess.run(
        cmd, cwd=repo, env=clean_env(**env), capture_output=True, text=True, timeout=300
    )
    return result, time.monotonic() - started


WITH_CREDENTIALS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "NNBP_TRACKING",
)
# Far more iterations than a few seconds allow: a late failure would show as a timeout.
LONG = 500_000
FAST = 15  # seconds: Python and NumPy start-up on a loaded machine, then the failed check


def test_closed_port_fails_before_training_with_one_line(prepared_repo):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
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
    url = f"http://127.0.0.1:{free_port()}"  # unreachable, and ignored
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
    url = f"http://127.0.0.1:{free_port()}"
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


# --- a server that dies mid-run ------------------------------------------------------------


def _server_runs(db: Path) -> dict[str, tuple[str, int]]:
    """run id -> (status, metric points), read from the server's SQLite store directly."""
    return {run.run_id: (run.status, sum(map(len, run.steps.values()))) for run in runs(db)}


@pytest.mark.slow
def test_a_run_left_running_by_a_dead_server_is_closed_by_the_next_run(prepared_repo, tmp_path):
    """The server dies while a stage trains; the stage goes on untracked and ends while the
    server is still down, so its run stays RUNNING. Once the server is back, the next training
    run closes it as FAILED (its process is gone), and runs itself to FINISHED."""
    folder = tmp_path / "server"
    folder.mkdir()
    db = folder / "mlflow.db"
    port = free_port()
    server_proc, server = start_server(folder, f"sqlite:///{db}", port)
    env = clean_env(MLFLOW_TRACKING_URI=server.url, NNBP_TRACKING="on")
    training = subprocess.Popen(
        _train_command(prepared_repo, "out-dead", LONG, log_every=1000),
        cwd=prepared_repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(n for _, n in _server_runs(db).values()):
            assert training.poll() is None, training.communicate()
            assert time.monotonic() < deadline, "training did not start in time"
            time.sleep(0.2)
        (orphan,) = _server_runs(db)
        stop_server(server_proc)  # the server dies mid-run
        first = training.stderr.readline()  # the stage reports the failure and trains on
        training.send_signal(signal.SIGTERM)  # ... and ends while the server is still down
        _, rest = training.communicate(timeout=180)
    finally:
        if training.poll() is None:
            training.kill()
        stop_server(server_proc)
    assert first.startswith("warning: MLflow logging failed ("), first
    assert f"warning: MLflow run h25 ({orphan}) is incomplete: could not send " in rest, rest
    assert "so it shows RUNNING until the next training run" in rest
    assert "Traceback" not in rest
    assert _server_runs(db)[orphan][0] == "RUNNING"

    server_proc, server = start_server(folder, f"sqlite:///{db}", port)  # back, same store
    try:
        result, _ = _train(prepared_repo, "out-next", ITERS, **env)
        runs = _server_runs(db)
    finally:
        stop_server(server_proc)
    assert result.returncode == 0, result.stderr
    assert "note: closed MLflow run 'h25 " in result.stdout  # its name adds how it was run
    assert f"({orphan[:8]}) as FAILED" in result.stdout
    assert runs.pop(orphan)[0] == "FAILED"
    assert [status for status, _ in runs.values()] == ["FINISHED"]
