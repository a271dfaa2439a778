"""One training run in MLflow, as a context manager: FINISHED when its block ends, FAILED on
an error, KILLED on Ctrl-C or SIGTERM. ``Run.start`` gives a ``NullRun`` when tracking is off,
which takes the same calls and does nothing.

Tracking never costs a training result: the store is checked before training starts; a
transient store error is retried (``retry``); if live logging still fails, training goes on, the
run keeps its whole history and sends it again when it ends, and whatever still cannot be sent is
named in one line. A run records its process and keeps a heartbeat (``orphans``, ``heartbeat``)
so that it is never left RUNNING for good, whichever machine it ran on.

What a run holds: the hyperparameters, the training and test sets as dataset inputs, the loss and
accuracies at every log point, figures and history as artifacts, and the trained network as an
MLflow Model (``nnbp.mlflow_model``).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from .. import figures
from ..artifacts import History, Prepared, TrainedModel
from ..backprop import LogPoint
from ..config import Training
from ..errors import first_line
from ..files import file_md5
from .heartbeat import Heartbeat, interval, machine, timeout
from .orphans import close_orphans, orphan_note, process_tags
from .retry import retrying
from .store import TrackingError, check_store, git, open_experiment, tracking_uri
from .system import sampling

# DVC's variables for a stage run inside an experiment, recorded as run tags.
DVC_TAGS = {
    "DVC_EXP_NAME": "dvc_experiment",
    "DVC_EXP_BASELINE_REV": "dvc_baseline_rev",
    "DVC_STAGE": "dvc_stage",
}
BATCH = 1000  # MLflow's limit of metrics per log_batch
EXAMPLES = 5  # test images in the MLflow Model's input example


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


def _login() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no user name in the environment or the password database
        return "unknown"


def run_name(config: str) -> str:
    """A run name that tells experiments apart: the configuration, then the DVC experiment
    (``dvc exp run``) or, for ``dvc repro``, the commit trained from."""
    if os.environ.get("DVC_EXP_NAME"):
        return f"{config} ({os.environ['DVC_EXP_NAME']})"
    commit = git("rev-parse", "HEAD")
    return f"{config} (repro {commit[:7]})" if commit else config


def training_params(
    config: Training, threads: int | str, data_path: str, data: Prepared
) -> dict[str, Any]:
    """What a training run logs as params: its configuration, layers, data and how it ran
    (threads, and the BLAS kernels that ran, on which the last bits depend)."""
    from threadpoolctl import threadpool_info

    from ..parallel import thread_count

    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    sizes = [data.features, *config.hidden, data.classes]
    return {
        "config": config.name,
        "sizes": "-".join(map(str, sizes)),
        "hidden": list(config.hidden),
        "tau": config.tau,
        "lamb": config.lamb,
        "iters": config.iters,
        "seed": config.seed,
        "gradient": config.gradient,
        "dtype": config.dtype,
        "log_every": config.log_every,
        "blocks": config.blocks,
        "threads": thread_count(threads, config.blocks),
        "blas_kernels": blas[0].get("architecture", "?") if blas else "?",
        "data_path": data_path,
        "data_md5": file_md5(data_path),
        "n_train": data.X_train.shape[1],
        "n_test": data.X_test.shape[1],
    }


class NullRun:
    """A run when tracking is off: every call does nothing."""

    run_id: str | None = None

    def __enter__(self) -> NullRun:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def log_point(self, point: LogPoint) -> None:
        pass

    def log_datasets(self, data_path: str, data: Prepared) -> None:
        pass

    def log_results(self, *args: Any) -> None:
        pass

    def system_metrics(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def end(self, status: str = "FINISHED") -> None:
        pass


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
        self._logging = threading.RLock()  # training and the system metrics thread both log; a
        # signal handler ending the run may interrupt the main thread inside log_metrics
        self._heartbeat: Heartbeat | None = None

    @classmethod
    def start(
        cls, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
    ) -> Run | NullRun:
        """Open a run of configuration ``name`` with ``params`` and tags; a ``NullRun`` when
        tracking is off. The run's name adds the DVC experiment (``run_name``).

        Raises ``TrackingError`` (one line) when the store cannot be used, before any training.
        """
        uri = tracking_uri()
        if uri is None:
            return NullRun()
        beat_every, stale_after = interval(), timeout()  # bad settings: one line, no request
        check_store(uri)
        try:
            client, experiment_id = open_experiment(uri)
            _close_orphans_before(client, experiment_id, name, stale_after)
            all_tags = {
                "git_commit": git("rev-parse", "HEAD") or "unknown",
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
        started = cls(client, run.info.run_id, name, uri)
        started._heartbeat = Heartbeat(client, run.info.run_id, beat_every)
        return started

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")

    def _send(self, fn: Any, *args: Any) -> str | None:
        """``fn(*args)`` with retries of transient errors; the error's first line if it fails."""
        try:
            retrying(fn, *args)
            return None
        except Exception as e:
            return first_line(e)

    def log_point(self, point: LogPoint) -> None:
        """A log point's loss and accuracies, at its iteration."""
        metrics = {"loss": point.loss, "train_acc": point.train_acc, "test_acc": point.test_acc}
        self.log_metrics(metrics, step=point.iteration)

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        """Log a point live; if the store stays unusable, keep it for ``end`` to resend."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        with self._logging:
            self._history.extend(batch)
            if self._live and (error := self._send(self._client.log_batch, self.run_id, batch)):
                self._live = False
                print(
                    f"warning: MLflow logging failed ({error}); training goes on, and its "
                    "metrics will be sent again when the run ends",
                    file=sys.stderr,
                )

    def system_metrics(self) -> contextlib.AbstractContextManager[None]:
        """While the block runs, the machine's and this process's CPU and memory, logged as
        ``system/...`` metrics (``nnbp.tracking.system``)."""
        return sampling(self.log_metrics)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if error := self._send(self._client.log_artifact, self.run_id, str(path), artifact_path):
            self._unsent.append(f"artifact {Path(path).name} ({error})")

    def log_datasets(self, data_path: str, data: Prepared) -> None:
        """Log the training and test sets (contexts ``training``, ``test``) as dataset inputs
        named after the data file, their digest the file's MD5 (what DVC records), their source
        the file; each as trained on: images as rows (n, d), and labels (n,)."""
        splits = {"training": (data.X_train.T, data.y_train), "test": (data.X_test.T, data.y_test)}
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

    def log_results(
        self,
        model: TrainedModel,
        history: History,
        model_path: Path,
        history_path: Path,
        data: Prepared,
    ) -> None:
        """What training made: the MLflow Model of ``model_path`` (its input example the first
        test images), this run's feature grid and curves, and the history file."""
        # The last log point is the run's result: MLflow shows each metric's last value, and
        # the model is linked to the metrics of that step.
        example = data.X_test[:, :EXAMPLES].T
        self.log_model(self.name, model_path, example, step=history.points[-1].iteration)
        with tempfile.TemporaryDirectory() as tmp:
            for filename, figure in figures.run_figures(
                self.name, model, history, data.image_shape
            ).items():
                figures.save(figure, Path(tmp) / filename)
                self.log_artifact(Path(tmp) / filename, "figures")
        self.log_artifact(history_path, "history")

    def log_model(
        self, name: str, weights_path: str | Path, input_example: np.ndarray, step: int
    ) -> str | None:
        """Log the network of ``weights_path`` as an MLflow Model (``nnbp.mlflow_model``) linked
        to this run; its ``models:/`` URI, or None if that failed (named when the run ends)."""
        uri: list[str] = []
        if error := self._send(
            lambda: uri.append(self._log_model(name, weights_path, input_example, step))
        ):
            self._unsent.append(f"the MLflow Model ({error})")
        return uri[0] if uri else None

    def _log_model(
        self, name: str, weights_path: str | Path, input_example: np.ndarray, step: int
    ) -> str:
        import mlflow

        from .. import mlflow_model

        mlflow.set_tracking_uri(self._uri)
        # log_model logs to the active run: resume ours, and hand it back to ``end``.
        mlflow.start_run(run_id=self.run_id)
        try:
            return mlflow_model.log_model(name, weights_path, input_example, step)
        finally:
            # Leave the fluent state; ``end`` sets the real status and prints the run's link.
            with _env(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true"):
                mlflow.end_run()

    def end(self, status: str = "FINISHED") -> None:
        """Close the run as FINISHED, FAILED or KILLED, after resending the whole metric history
        if live logging broke (identical points are stored once, so this cannot duplicate).
        Whatever still cannot be sent is named in one warning line."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
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
                f"`nnbp-close-orphans` closes it as FAILED ({error})"
            )
        if self._unsent:
            print(
                f"warning: MLflow run {self.name} ({self.run_id}) is incomplete: could not send "
                f"{'; '.join(self._unsent)}; the stage's outputs are written all the same",
                file=sys.stderr,
            )


def _close_orphans_before(client: Any, experiment_id: str, name: str, stale_after: float) -> None:
    """``close_orphans`` as a run starts; a failure there never stops the training."""
    by = f"the next run ({os.environ.get('DVC_STAGE') or name}) on {machine()}"
    try:
        for orphan in close_orphans(client, experiment_id, by, stale_after):
            print(orphan_note(orphan))
    except Exception as e:
        print(f"warning: MLflow: orphaned runs not checked ({first_line(e)})", file=sys.stderr)
