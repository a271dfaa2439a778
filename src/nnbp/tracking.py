"""The one place that talks to MLflow (with ``nnbp.orphans`` and ``nnbp.registry``).

Where runs go: ``MLFLOW_TRACKING_URI`` when set (a shared server, say), otherwise the SQLite
store ``mlflow.db`` at the project root, with artifacts in ``mlartifacts/`` beside it. The root
is DVC's ``DVC_ROOT``, which DVC points at the workspace even when ``dvc exp run --temp`` or
``--queue`` executes in a temporary copy, so those runs land in the same store.
``NNBP_TRACKING=off`` trains without tracking.

Tracking never costs a training result: the store is checked before training starts (one clear
line if it cannot be used, a server's refused credentials included). A transient store error (a
locked SQLite file, a server restarting) is retried; if live logging still fails, training goes
on, the run keeps its whole history and sends it again when it ends, and whatever still cannot
be sent is named in one line. MLflow's own log records are one line each. A run is never left
RUNNING for good: each records its process (``nnbp.orphans``), and the start of every run, or
``stages/close_orphan_runs.py``, closes as FAILED the RUNNING runs whose process is gone.

What a run holds: the hyperparameters, the training and test sets as dataset inputs, the loss and
accuracies at every log point, figures and history as artifacts, and the trained network as an
MLflow Model (a LoggedModel, pyfunc "models from code": ``nnbp/mlflow_model.py`` with the weights
file that DVC tracks as its artifact). ``nnbp.registry`` makes the best one
``models:/NAME@champion``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import getpass
import http.client
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nnbp.data import file_md5, first_line
from nnbp.orphans import Orphan, close_orphans, orphan_note, process_tags

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
MODEL_FILE = Path(__file__).with_name("mlflow_model.py")  # the pyfunc model, as code
NETWORK_MODULE = "nnbp_backprop"  # nnbp/backprop.py in the model, as MODEL_FILE imports it

# Set before MLflow is imported (a user's own setting wins). MLflow logs at INFO by default
# ("Creating initial MLflow database tables..."), which would wrap a one-line error; and its HTTP
# client retries for minutes, where a dead server should cost seconds.
MLFLOW_DEFAULTS = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # model logging would print bars
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


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Environment variables set for the block, restored after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


def _login() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no user name in the environment or the password database
        return "unknown"


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
        with urllib.request.urlopen(request, timeout=10) as response:
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


def run_name(config: str) -> str:
    """A run name that tells experiments apart: the configuration, then the DVC experiment
    (``dvc exp run``) or, for ``dvc repro``, the commit trained from."""
    if os.environ.get("DVC_EXP_NAME"):
        return f"{config} ({os.environ['DVC_EXP_NAME']})"
    commit = _git_commit()
    return f"{config} (repro {commit[:7]})" if commit else config


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

    def __init__(self, client: Any, run_id: str, name: str = "", uri: str = "") -> None:
        self._client = client
        self.run_id = run_id
        self.name = name
        self._uri = uri
        self._history: list[Any] = []  # every metric logged, with its timestamp, in order
        self._live = True  # False once live logging gave up: the rest waits for end()
        self._unsent: list[str] = []  # what end() could not deliver either

    @classmethod
    def start(
        cls, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
    ) -> Run | None:
        """Open a run of configuration ``name`` with ``params`` and tags; None when tracking is
        off. The run's name adds the DVC experiment (``run_name``); ``params`` keep ``config``.

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
                # who ran it: the server account, else the login (MLflow's own fluent default)
                "mlflow.user": os.environ.get("MLFLOW_TRACKING_USERNAME") or _login(),
                **process_tags(),
            }
            for var, tag in DVC_TAGS.items():
                if os.environ.get(var):
                    all_tags[tag] = os.environ[var]
            all_tags.update(tags or {})
            run = retrying(client.create_run, experiment_id, run_name=run_name(name), tags=all_tags)
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
        return cls(client, run.info.run_id, name, uri)

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

    def log_datasets(
        self, data_path: str, splits: Mapping[str, tuple[np.ndarray, np.ndarray]]
    ) -> None:
        """Log each split (context: ``"training"``, ``"test"``) as a dataset input named after
        the data file, its digest the file's MD5 (what DVC records), its source the file.

        ``splits`` maps a context to ``(X, y)``, X (n, d) as trained on and y (n,) the labels.
        """
        if error := self._send(self._log_datasets, data_path, splits):
            self._unsent.append(f"the datasets ({error})")

    def _log_datasets(
        self, data_path: str, splits: Mapping[str, tuple[np.ndarray, np.ndarray]]
    ) -> None:
        import mlflow.data
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        digest, file = file_md5(data_path), Path(data_path).name
        inputs = []
        for context, (X, y) in splits.items():
            with warnings.catch_warnings():  # a local path is 'local' under two schemes
                warnings.simplefilter("ignore", UserWarning)
                dataset = mlflow.data.from_numpy(
                    X,
                    targets=y,
                    source=data_path,
                    # MLflow keeps one input per name and digest: the split tells them apart.
                    name=f"{file}:{context}",
                    digest=digest,
                )
            entity = Dataset(**dataset.to_dict())
            inputs.append(DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        self._client.log_inputs(self.run_id, datasets=inputs)

    def log_model(
        self, name: str, weights_path: str | Path, input_example: np.ndarray, step: int
    ) -> str | None:
        """Log the network of ``weights_path`` as an MLflow Model named ``name``, linked to this
        run with the metrics of ``step``; returns its ``models:/`` URI (None if it failed).

        Models from code: MLflow stores ``mlflow_model.py`` and runs it on load, with the
        weights file as an artifact and ``nnbp.backprop`` as its code; nothing is pickled.
        ``input_example`` is a few images as rows (n, d); the signature is (n, d) float64
        images in, (n,) int64 digits out.
        """
        uri: list[str] = []
        args = (name, Path(weights_path), input_example, step)
        if error := self._send(lambda: uri.append(self._log_model(*args))):
            self._unsent.append(f"the MLflow Model ({error})")
        return uri[0] if uri else None

    def _log_model(
        self, name: str, weights_path: Path, input_example: np.ndarray, step: int
    ) -> str:
        import mlflow
        import mlflow.pyfunc
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        import nnbp.backprop

        d = input_example.shape[1]
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float64), (-1, d))]),  # unnamed: an array,
            outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),  # not a dict of them
        )
        # Given, the requirements are not inferred (which loads the model in a subprocess).
        requirements = [f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"]
        with tempfile.TemporaryDirectory() as tmp:
            code = Path(tmp) / f"{NETWORK_MODULE}.py"  # the network, as the model file imports it
            shutil.copy(nnbp.backprop.__file__, code)
            mlflow.set_tracking_uri(self._uri)
            # log_model logs to the active run: resume ours, and hand it back to ``end``.
            mlflow.start_run(run_id=self.run_id)
            try:
                info = mlflow.pyfunc.log_model(
                    name=name,
                    python_model=str(MODEL_FILE),
                    artifacts={"weights": str(weights_path)},
                    code_paths=[str(code)],
                    signature=signature,
                    input_example=input_example,
                    pip_requirements=requirements,
                    tags={WEIGHTS_MD5_TAG: file_md5(weights_path)},
                    step=step,
                )
            finally:
                # Leave the fluent state; ``end`` sets the real status and prints the run's link.
                with _env(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true"):
                    mlflow.end_run()
        return info.model_uri

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
    """The project's experiment, created (and tagged) on first use; a parallel creator may win
    the race."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        for key, value in EXPERIMENT_TAGS.items():  # stores made before the tags existed
            if experiment.tags.get(key) != value:
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ:
        location = (project_root() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(
            EXPERIMENT, artifact_location=location, tags=EXPERIMENT_TAGS
        )
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
