"""Where runs go, whether that store can be used, and the project's experiment in it.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (a shared server, say), otherwise the SQLite
store ``mlflow.db`` at the project root, with artifacts in ``mlartifacts/`` beside it. The root
is DVC's ``DVC_ROOT``, which DVC points at the workspace even when ``dvc exp run --temp`` or
``--queue`` executes in a temporary copy, so those runs land in the same store.
``NNBP_TRACKING=off`` trains without tracking.

The store is checked before training starts (``check_store``): one clear line if it cannot be
used, a server's refused credentials included. MLflow's own log records are one line each.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import http.client
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import UserError, one_line
from .. import git
from .retry import REQUEST_SECONDS, retrying

EXPERIMENT = "tp5-neural-networks"
OPT_OUT = "NNBP_TRACKING"
CREDENTIALS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
# MLflow 3 guesses an experiment's kind and opens a GenAI "Traces" page for a new one; these
# tags say that it trains models and which metric ranks its runs, so the UI opens on the runs.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.experiment.primaryMetric.name": "test_acc",
    "mlflow.experiment.primaryMetric.greaterIsBetter": "true",
}
WEIGHTS_MD5_TAG = "nnbp.weights_md5"  # on each LoggedModel: the MD5 of the file DVC tracks
# Set before MLflow is imported (a user's own setting wins). MLflow logs at INFO by default
# ("Creating initial MLflow database tables..."), which would wrap a one-line error; and its HTTP
# client retries for minutes and waits 120 s for an answer, where a dead or frozen server should
# cost seconds: a request gets REQUEST_SECONDS, and the retries are ours, within a call's budget
# (``retry``).
MLFLOW_DEFAULTS = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REQUEST_SECONDS),
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # model logging would print bars
    # A server's client prints a run's link on every status it sets, after one more request:
    # closing a run (or an orphan) is then one request, and the stage's output its own.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


class TrackingError(UserError, RuntimeError):
    """The tracking store cannot be used; ``str()`` is one line naming it."""


def project_root() -> Path:
    """The workspace root: DVC's ``DVC_ROOT``, else the git top level, else the cwd."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    return git.top_level() or Path.cwd()


def tracking_uri() -> str | None:
    """Where runs go, or None when the user opted out with ``NNBP_TRACKING=off``."""
    if os.environ.get(OPT_OUT, "").lower() in ("off", "0", "false", "no"):
        return None
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def check_store(uri: str) -> None:
    """``TrackingError`` (one line) unless the store at ``uri`` can be used: a server that
    answers and takes the credentials, or a SQLite file that can be written."""
    if uri.startswith(("http://", "https://")):
        try:
            health = f"{uri.rstrip('/')}/health"
            with urllib.request.urlopen(health, timeout=REQUEST_SECONDS) as response:
                response.read()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"MLflow tracking server {uri} cannot be reached ({reason}); start it, fix "
                f"MLFLOW_TRACKING_URI, or set {OPT_OUT}=off to train without tracking"
            ) from None
        _check_credentials(uri)
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        folder = db.parent
        if (
            not folder.is_dir()
            or not os.access(folder, os.W_OK)
            or (db.exists() and not os.access(db, os.W_OK))
        ):
            raise TrackingError(
                f"MLflow store {db} is not writable; fix its permissions, set "
                f"MLFLOW_TRACKING_URI, or set {OPT_OUT}=off to train without tracking"
            )


def _check_credentials(uri: str) -> None:
    """One authenticated request, as MLflow's client makes them: a server with authentication
    (``mlflow server --app-name basic-auth``) answers 401 to missing or wrong credentials."""
    query = urllib.parse.urlencode({"experiment_name": EXPERIMENT})
    request = urllib.request.Request(
        f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
    )
    user, password = (os.environ.get(f"MLFLOW_TRACKING_{k}") for k in ("USERNAME", "PASSWORD"))
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    elif user is not None and password is not None:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {pair}")
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_SECONDS) as response:
            response.read()
    except urllib.error.HTTPError as e:
        if e.code == 401:
            given = "were refused" if user is not None else "are not set"
            raise TrackingError(
                f"MLflow tracking server {uri} asks for a user name and password (401): "
                f"the credentials in {CREDENTIALS} {given}; set them, or set {OPT_OUT}=off "
                "to train without tracking"
            ) from None
        if e.code == 403:
            raise TrackingError(
                f"MLflow tracking server {uri}: user {user!r} ({CREDENTIALS}) may not use "
                f"experiment {EXPERIMENT} (403); ask the server's admin for access"
            ) from None
        # 404 is a new experiment; any other answer is left to MLflow's client to report.
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        pass  # reachable a moment ago (/health): MLflow's client reports what follows


class _OneLine(logging.Filter):
    """MLflow's log records as one line each. A record that carries an exception (SQLAlchemy's
    full traceback when the store is locked) is dropped: MLflow raises that exception to us too,
    and it is reported once, in one line, by the caller."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            return False
        record.msg, record.args = one_line(record.getMessage()), None
        return True


def mlflow_settings() -> None:
    """MLflow's environment defaults (``MLFLOW_DEFAULTS``), before it is imported."""
    for key, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(key, value)


def client(uri: str, *, registry: bool = False) -> Any:
    """An ``MlflowClient`` of ``uri`` (and its model registry), MLflow's logging one line."""
    mlflow_settings()
    from mlflow import MlflowClient

    for handler in logging.getLogger("mlflow").handlers:  # MLflow's own, set up on import
        if not any(isinstance(f, _OneLine) for f in handler.filters):
            handler.addFilter(_OneLine())
    return MlflowClient(tracking_uri=uri, registry_uri=uri if registry else None)


@contextlib.contextmanager
def _initialising(uri: str) -> Iterator[None]:
    """One process at a time for a SQLite store's set-up: MLflow creates and migrates its tables
    on first use, and parallel first users (a `dvc queue start -j 2` on a new store) would race
    through the same migration and fail."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    with open(db.with_name(f"{db.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_experiment(uri: str, deadline: float | None = None) -> tuple[Any, str]:
    """(a client of ``uri``, the project's experiment id), the experiment created and tagged on
    first use (a parallel creator may win the race); retried until ``deadline`` at most."""
    with _initialising(uri):  # the first use of a store creates its tables
        mlflow = client(uri)
        return mlflow, retrying(_experiment_id, mlflow, uri, deadline=deadline)


def find_experiment(uri: str) -> tuple[Any, str | None]:
    """(a client of ``uri`` and its registry, the project's experiment id or None)."""
    mlflow = client(uri, registry=True)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    return mlflow, experiment.experiment_id if experiment is not None else None


def _experiment_id(mlflow: Any, uri: str) -> str:
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        for key, value in EXPERIMENT_TAGS.items():  # stores made before the tags existed
            if experiment.tags.get(key) != value:
                mlflow.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ:
        location = (project_root() / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(
            EXPERIMENT, artifact_location=location, tags=EXPERIMENT_TAGS
        )
    except Exception:
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)  # created by a sibling meanwhile
        if experiment is None:
            raise
        return experiment.experiment_id
