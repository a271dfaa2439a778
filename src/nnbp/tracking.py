"""The one place that talks to MLflow.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (a shared server, say), otherwise the SQLite
store ``mlflow.db`` at the project root, with artifacts in ``mlartifacts/`` beside it. The root
is DVC's ``DVC_ROOT``, which DVC points at the workspace even when ``dvc exp run --temp`` or
``--queue`` executes in a temporary copy, so those runs land in the same store.
``NNBP_TRACKING=off`` trains without tracking.

Tracking never costs a training result: the store is checked before training starts (one clear
line if it cannot be used, a server's refused credentials included), and a failure later is
reported once, after which the run goes on untracked.

What a run holds: the hyperparameters, the training and test sets as dataset inputs, the loss and
accuracies at every log point, figures and history as artifacts, and the trained network as an
MLflow Model (a LoggedModel, pyfunc "models from code": ``nnbp/mlflow_model.py`` with the weights
file that DVC tracks as its artifact). ``register`` makes the best one ``models:/NAME@champion``.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import http.client
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


def _experiment_id(client: Any, uri: str) -> str:
    """The experiment's id, created (and tagged) if it does not exist yet."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ:
            location = (project_root() / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(
            EXPERIMENT, artifact_location=location, tags=EXPERIMENT_TAGS
        )
    else:
        experiment_id = experiment.experiment_id
        for key, value in EXPERIMENT_TAGS.items():  # stores made before the tags existed
            if experiment.tags.get(key) != value:
                client.set_experiment_tag(experiment_id, key, value)
    return experiment_id


class Run:
    """One MLflow run, named after a configuration. Use ``Run.start`` to open it."""

    def __init__(self, client: Any, run_id: str, uri: str) -> None:
        self._client = client
        self.run_id = run_id
        self._uri = uri
        self._broken = False

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
        for key, value in MLFLOW_DEFAULTS.items():
            os.environ.setdefault(key, value)
        try:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            experiment_id = _experiment_id(client, uri)
            all_tags = {
                "git_commit": _git_commit() or "unknown",
                "mlflow.source.name": "dvc.yaml",
                # who ran it: the server account, else the login (MLflow's own fluent default)
                "mlflow.user": os.environ.get("MLFLOW_TRACKING_USERNAME") or _login(),
            }
            if os.environ.get("DVC_EXP_NAME"):
                all_tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
            if os.environ.get("DVC_STAGE"):
                all_tags["dvc_stage"] = os.environ["DVC_STAGE"]
            all_tags.update(tags or {})
            run = client.create_run(experiment_id, run_name=run_name(name), tags=all_tags)
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
        return cls(client, run.info.run_id, uri)

    def _guard(self, action: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._broken:
            return None
        try:
            return fn(*args, **kwargs)
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

    def log_datasets(
        self, data_path: str, splits: Mapping[str, tuple[np.ndarray, np.ndarray]]
    ) -> None:
        """Log each split (context: ``"training"``, ``"test"``) as a dataset input named after
        the data file, its digest the file's MD5 (what DVC records), its source the file.

        ``splits`` maps a context to ``(X, y)``, X (n, d) as trained on and y (n,) the labels.
        """
        self._guard("logging the datasets", self._log_datasets, data_path, splits)

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
        return self._guard(
            "logging the model", self._log_model, name, Path(weights_path), input_example, step
        )

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
        """Close the run as FINISHED, FAILED or KILLED."""
        self._guard("closing the run", self._client.set_terminated, self.run_id, status)


def register(weights_path: str | Path, model_name: str, alias: str = "champion") -> str:
    """Register the LoggedModel of ``weights_path`` as a version of ``model_name`` and point
    ``alias`` at it; returns a one-line summary with its ``models:/NAME@ALIAS`` URI.

    The model is found by the MD5 of the weights file (each LoggedModel carries it), so it is the
    one trained from exactly these bytes, however DVC came by them. Registering the model that
    ``alias`` already points to does nothing. ``TrackingError`` (one line) when tracking is off,
    the store cannot be used, or no run logged these weights.
    """
    uri = tracking_uri()
    if uri is None:
        raise TrackingError(f"{OPT_OUT}=off: there is no MLflow store to register a model in")
    _check_reachable(uri)
    for key, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(key, value)
    md5 = file_md5(weights_path)
    try:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        found = []
        if experiment is not None:
            found = client.search_logged_models(
                experiment_ids=[experiment.experiment_id],
                filter_string=f"tags.`{WEIGHTS_MD5_TAG}` = '{md5}'",
                order_by=[{"field_name": "creation_timestamp", "ascending": False}],
                max_results=1,
            )
        if not found:
            raise TrackingError(
                f"{weights_path}: no MLflow model of these weights (MD5 {md5}) in {uri}; train "
                "it with tracking on (dvc repro --force on its train stage), then register it"
            )
        model = found[0]
        try:
            current = client.get_model_version_by_alias(model_name, alias)
        except MlflowException:
            current = None  # no such model or alias yet
        # The version's source is the model's URI (a SQL store leaves its model_id empty).
        if current is not None and model.model_id in (current.model_id, _model_id(current.source)):
            version = current
            what = "already"
        else:
            import mlflow

            # mlflow.register_model, not the client's create_model_version: it also tags the
            # LoggedModel with its version, which the UI's model list shows.
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            version = mlflow.register_model(model.model_uri, model_name)
            client.set_registered_model_alias(model_name, alias, version.version)
            what = "now"
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(f"MLflow store {uri} cannot be used: {first_line(e)}") from None
    return (
        f"{weights_path} is {what} {model_name} version {version.version} "
        f"(models:/{model_name}@{alias}, logged model {model.model_id})"
    )


def _model_id(source: str | None) -> str | None:
    return source.removeprefix("models:/") if source and source.startswith("models:/m-") else None


def champion(metrics: Mapping[str, Mapping[str, float]], key: str = "test_acc") -> str:
    """The configuration with the highest ``key`` (the experiment's primary metric) in the
    evaluate stage's metrics; a tie goes to the first, i.e. the smaller network."""
    if not metrics:
        raise TrackingError("no configuration in the metrics: nothing to register")
    return max(metrics, key=lambda name: metrics[name][key])
