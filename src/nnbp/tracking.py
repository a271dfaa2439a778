"""The one place that talks to MLflow.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (a shared server, say), otherwise the SQLite
store ``mlflow.db`` at the project root, with artifacts in ``mlartifacts/`` beside it. The root
is DVC's ``DVC_ROOT``, which DVC points at the workspace even when ``dvc exp run --temp`` or
``--queue`` executes in a temporary copy, so those runs land in the same store.
``NNBP_TRACKING=off`` trains without tracking.

Tracking never costs a training result: the store is checked before training starts (one clear
line if it cannot be used), and a failure later is reported once, after which the run goes on
untracked; MLflow's own log records are one line each, and an exception it logs is left to us to
report. A run is never left RUNNING for good: the run records its host and process (tags
``nnbp.host``, ``nnbp.pid``, ``nnbp.process``), and the start of every run, or
``stages/close_orphan_runs.py``, closes as FAILED the RUNNING runs of this host whose process is
gone (``kill -9``, a store that was down when the run ended).
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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


# DVC's variables for a stage run inside an experiment, recorded as run tags.
DVC_TAGS = {
    "DVC_EXP_NAME": "dvc_experiment",
    "DVC_EXP_BASELINE_REV": "dvc_baseline_rev",
    "DVC_STAGE": "dvc_stage",
}
# Errors that pass: SQLite's lock held by a parallel writer (MLflow waits 20 s for it before it
# says so), a server restarting or overloaded. Retried after each delay, 7 s of pauses in all.
TRANSIENT = (
    "database is locked",
    "database table is locked",
    "connection refused",
    "connection reset",
    "connection aborted",
    "remote end closed",
    "max retries exceeded",
    "temporarily unavailable",
    "timed out",
    "503",
    "502",
    "504",
)
RETRY_DELAYS = (1.0, 2.0, 4.0)
BATCH = 1000  # MLflow's limit of metrics per log_batch


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


class _OneLine(logging.Filter):
    """MLflow's log records as one line each. A record that carries an exception (SQLAlchemy's
    full traceback when the store is locked) is dropped: MLflow raises that exception to us too,
    and it is reported once, in one line, by the caller."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            return False
        record.msg, record.args = _one_line(record.getMessage()), None
        return True


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _quiet_mlflow_logging() -> None:
    for handler in logging.getLogger("mlflow").handlers:  # MLflow's own, set up on import
        if not any(isinstance(f, _OneLine) for f in handler.filters):
            handler.addFilter(_OneLine())


# --- the process behind a run, to tell an orphan from a run still training -----------------

PROCESS_TAGS = ("nnbp.host", "nnbp.pid", "nnbp.process")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), None if there is no such process."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]  # field 22, starttime


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def process_tags() -> dict[str, str]:
    """Tags naming this process so that another one can later tell whether it still runs: its
    host and pid, and (on Linux) its boot, pid namespace and start time, which tell a pid
    reused after a reboot or by another container apart."""
    pid = os.getpid()
    token = {"boot": _read("/proc/sys/kernel/random/boot_id"), "pidns": _pid_namespace()}
    token["start"] = _started(pid)
    process = " ".join(f"{k}={v}" for k, v in token.items() if v)
    return {"nnbp.host": socket.gethostname(), "nnbp.pid": str(pid), "nnbp.process": process}


def process_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the process that ``tags`` (``process_tags``) name still runs; None when this
    process cannot tell (another host or container, or no such tags)."""
    host, pid = tags.get("nnbp.host"), tags.get("nnbp.pid", "")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    then = dict(kv.split("=", 1) for kv in tags.get("nnbp.process", "").split() if "=" in kv)
    if then.get("pidns") != _pid_namespace():
        return None  # the same host name, another pid namespace: its pids mean nothing here
    if "boot" in then and then["boot"] != _read("/proc/sys/kernel/random/boot_id"):
        return False  # the machine rebooted since
    if "start" in then:
        return _started(int(pid)) == then["start"]  # None (gone) or another process
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Orphan:
    run_id: str
    name: str
    host: str
    pid: str


def close_orphans(client: Any, experiment_id: str, by: str) -> list[Orphan]:
    """Close as FAILED every RUNNING run of ``experiment_id`` whose process is gone (this host
    only); its end time is its last logged metric, a tag says what happened."""
    closed, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], "attributes.status = 'RUNNING'", max_results=1000, page_token=token
        )
        for run in page:
            tags = run.data.tags
            if process_alive(tags) is not False:
                continue
            orphan = Orphan(run.info.run_id, run.info.run_name, tags["nnbp.host"], tags["nnbp.pid"])
            stamps = [m.timestamp for m in client.get_metric_history(orphan.run_id, "loss")]
            end = max([run.info.start_time or 0, *stamps]) or None
            why = (
                f"process {orphan.pid} on {orphan.host} ended without closing this run "
                f"(killed, or the store was unreachable); closed as FAILED by {by}"
            )
            client.set_tag(orphan.run_id, "nnbp.orphaned", why)
            client.set_terminated(orphan.run_id, "FAILED", end_time=end)
            closed.append(orphan)
        token = page.token
        if not token:
            return closed


def orphan_note(orphan: Orphan) -> str:
    return (
        f"note: closed MLflow run {orphan.name} ({orphan.run_id[:8]}) as FAILED: its process "
        f"{orphan.pid} on {orphan.host} is gone"
    )


def _client(uri: str) -> Any:
    for key, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    _quiet_mlflow_logging()
    return MlflowClient(tracking_uri=uri)


def close_orphan_runs() -> tuple[str, list[Orphan]] | None:
    """``close_orphans`` in the project's experiment of the current store: (its URI, the runs
    closed); None when tracking is off. ``TrackingError`` when the store cannot be used."""
    uri = tracking_uri()
    if uri is None:
        return None
    _check_reachable(uri)
    try:
        client = _client(uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            return uri, []
        return uri, close_orphans(client, experiment.experiment_id, "close_orphan_runs.py")
    except Exception as e:
        raise TrackingError(f"MLflow store {uri} cannot be used: {first_line(e)}") from None


def _close_orphans_before(client: Any, experiment_id: str, name: str) -> None:
    """``close_orphans`` as a run starts; a failure there never stops the training."""
    by = f"the next run ({os.environ.get('DVC_STAGE') or name})"
    try:
        for orphan in close_orphans(client, experiment_id, by):
            print(orphan_note(orphan))
    except Exception as e:
        print(f"warning: MLflow: orphaned runs not checked ({first_line(e)})", file=sys.stderr)


class Run:
    """One MLflow run, named after a configuration. Use ``Run.start`` to open it."""

    def __init__(self, client: Any, run_id: str, name: str = "") -> None:
        self._client = client
        self.run_id = run_id
        self.name = name
        self._history: list[Any] = []  # every metric logged, with its timestamp, in order
        self._live = True  # False once live logging gave up: the rest waits for end()
        self._unsent: list[str] = []  # what end() could not deliver either

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
        try:
            with _initialising(uri):  # the first use of a store creates its tables
                client = _client(uri)
                experiment_id = retrying(_experiment_id, client, uri)
            _close_orphans_before(client, experiment_id, name)
            all_tags = {
                "git_commit": _git_commit() or "unknown",
                "mlflow.source.name": "dvc.yaml",
                **process_tags(),
            }
            for var, tag in DVC_TAGS.items():
                if os.environ.get(var):
                    all_tags[tag] = os.environ[var]
            all_tags.update(tags or {})
            run = retrying(client.create_run, experiment_id, run_name=name, tags=all_tags)
            from mlflow.entities import Param

            try:
                batch = [Param(k, str(v)) for k, v in params.items()]
                retrying(client.log_batch, run.info.run_id, params=batch)
            except BaseException as e:  # Ctrl-C or a store error: never leave it RUNNING
                status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
                with contextlib.suppress(Exception):
                    client.set_terminated(run.info.run_id, status)
                raise
        except Exception as e:
            raise TrackingError(f"MLflow store {uri} cannot be used: {first_line(e)}") from None
        return cls(client, run.info.run_id, name)

    def _send(self, fn: Any, *args: Any) -> str | None:
        """``fn(*args)`` with retries of transient errors; the error's first line if it fails."""
        try:
            retrying(fn, *args)
            return None
        except Exception as e:
            return first_line(e)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log a point live; if the store stays unusable, keep it for ``end`` to resend."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self._history.extend(batch)
        if self._live and (error := self._send(self._client.log_batch, self.run_id, batch)):
            self._live = False
            print(
                f"warning: MLflow logging failed ({error}); training goes on, and its metrics "
                "will be sent again when the run ends",
                file=sys.stderr,
            )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if error := self._send(self._client.log_artifact, self.run_id, str(path), artifact_path):
            self._unsent.append(f"artifact {Path(path).name} ({error})")

    def end(self, status: str = "FINISHED") -> None:
        """Close the run as FINISHED, FAILED or KILLED, after resending the whole metric history
        if live logging broke (identical points are stored once, so this cannot duplicate).
        Whatever still cannot be sent is named in one warning line."""
        if not self._live:
            for i in range(0, len(self._history), BATCH):
                chunk = self._history[i : i + BATCH]
                if error := self._send(self._client.log_batch, self.run_id, chunk):
                    steps = sorted({m.step for m in self._history[i:]})
                    self._unsent.append(f"metrics at steps {steps[0]}..{steps[-1]} ({error})")
                    break
        if error := self._send(self._client.set_terminated, self.run_id, status):
            self._unsent.append(
                f"its {status} status, so it shows RUNNING until the next training run or "
                f"`python stages/close_orphan_runs.py` closes it as FAILED ({error})"
            )
        if self._unsent:
            print(
                f"warning: MLflow run {self.name} ({self.run_id}) is incomplete: could not send "
                f"{'; '.join(self._unsent)}; the stage's outputs are written all the same",
                file=sys.stderr,
            )


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


def _experiment_id(client: Any, uri: str) -> str:
    """The project's experiment, created on first use; a parallel creator may win the race."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ:
        location = (project_root() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=location)
    except Exception:
        experiment = client.get_experiment_by_name(EXPERIMENT)  # created by a sibling meanwhile
        if experiment is None:
            raise
        return experiment.experiment_id


def is_transient(e: BaseException) -> bool:
    """A store error worth retrying: a locked SQLite file, a server restarting or overloaded."""
    text = f"{type(e).__name__} {e}".lower()
    return any(marker in text for marker in TRANSIENT)


def retrying(fn: Any, *args: Any, delays: tuple[float, ...] | None = None, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, retried after each of ``delays`` seconds on a transient error."""
    for delay in (*(RETRY_DELAYS if delays is None else delays), None):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if delay is None or not is_transient(e):
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")
