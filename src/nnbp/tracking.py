"""The one place that talks to MLflow.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (a shared server, say), otherwise the SQLite
store ``mlflow.db`` at the project root, with artifacts in ``mlartifacts/`` beside it. The root
is DVC's ``DVC_ROOT``, which DVC points at the workspace even when ``dvc exp run --temp`` or
``--queue`` executes in a temporary copy, so those runs land in the same store.
``NNBP_TRACKING=off`` trains without tracking.

Tracking never costs a training result: the store is checked before training starts (one clear
line if it cannot be used), and a failure later is reported once, after which the run goes on
untracked.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nnbp.data import first_line

EXPERIMENT = "tp5-neural-networks"
OPT_OUT = "NNBP_TRACKING"

# Set before MLflow is imported (a user's own setting wins). MLflow logs at INFO by default
# ("Creating initial MLflow database tables..."), which would wrap a one-line error; and its HTTP
# client retries for minutes, where a dead server should cost seconds.
MLFLOW_DEFAULTS = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


class TrackingError(RuntimeError):
    """The tracking store cannot be used; ``str()`` is one line naming it."""


def project_root() -> Path:
    """The workspace root: DVC's ``DVC_ROOT``, else the git top level, else the cwd."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
        ).stdout.strip()
        return Path(top)
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd()


def tracking_uri() -> str | None:
    """Where runs go, or None when the user opted out with ``NNBP_TRACKING=off``."""
    if os.environ.get(OPT_OUT, "").lower() in ("off", "0", "false", "no"):
        return None
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _check_reachable(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"MLflow tracking server {uri} cannot be reached ({reason}); start it, fix "
                f"MLFLOW_TRACKING_URI, or set {OPT_OUT}=off to train without tracking"
            ) from None
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


class Run:
    """One MLflow run, named after a configuration. Use ``Run.start`` to open it."""

    def __init__(self, client: Any, run_id: str) -> None:
        self._client = client
        self.run_id = run_id
        self._broken = False

    @classmethod
    def start(
        cls, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
    ) -> Run | None:
        """Open a run with ``params`` and tags; None when tracking is off.

        Raises ``TrackingError`` (one line) when the store cannot be used, before any training.
        """
        uri = tracking_uri()
        if uri is None:
            return None
        _check_reachable(uri)
        for key, value in MLFLOW_DEFAULTS.items():
            os.environ.setdefault(key, value)
        try:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                location = None
                if uri.startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ:
                    location = (project_root() / "mlartifacts").as_uri()
                experiment_id = client.create_experiment(EXPERIMENT, artifact_location=location)
            else:
                experiment_id = experiment.experiment_id
            all_tags = {
                "git_commit": _git_commit() or "unknown",
                "mlflow.source.name": "dvc.yaml",
            }
            if os.environ.get("DVC_EXP_NAME"):
                all_tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
            if os.environ.get("DVC_STAGE"):
                all_tags["dvc_stage"] = os.environ["DVC_STAGE"]
            all_tags.update(tags or {})
            run = client.create_run(experiment_id, run_name=name, tags=all_tags)
            from mlflow.entities import Param

            try:
                client.log_batch(
                    run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()]
                )
            except BaseException as e:  # Ctrl-C or a store error: never leave it RUNNING
                status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
                with contextlib.suppress(Exception):
                    client.set_terminated(run.info.run_id, status)
                raise
        except Exception as e:
            raise TrackingError(f"MLflow store {uri} cannot be used: {first_line(e)}") from None
        return cls(client, run.info.run_id)

    def _guard(self, action: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self._broken:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:
            self._broken = True
            print(
                f"warning: MLflow {action} failed ({first_line(e)}); training goes on "
                "untracked and its outputs are still written",
                file=sys.stderr,
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self._guard("logging", self._client.log_batch, self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._guard(
            "artifact upload", self._client.log_artifact, self.run_id, str(path), artifact_path
        )

    def end(self, status: str = "FINISHED") -> None:
        """Close the run as FINISHED, FAILED or KILLED."""
        self._guard("closing the run", self._client.set_terminated, self.run_id, status)
