"""One training run in MLflow, as a context manager: FINISHED when its block ends, FAILED on
an error, KILLED on Ctrl-C or SIGTERM. With tracking off (``NNBP_TRACKING=off``) ``Run.start``
gives a run that is not ``enabled``: every call does nothing, and MLflow is not even imported.

Tracking never costs a training result: the store is checked before training starts; a
transient store error is retried (``retry``); if live logging still fails, training goes on, the
run keeps its whole history and sends it again when it ends, and whatever still cannot be sent is
named in one line. A run records its process and keeps a heartbeat (``orphans``, ``heartbeat``)
so that it is never left RUNNING for good, whichever machine it ran on.

What a run holds: the training parameters (``training_params``), the training and test sets as
dataset inputs, the metrics at every log point and the system metrics (``system``), the
trained network as an MLflow Model (``mlflow_model``), and what the stage gives it as artifacts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ...artifacts import LogPoint, Prepared
from ...config import Training
from ...errors import first_line
from ...files import file_md5
from .. import git
from .heartbeat import Heartbeat, interval, machine, timeout
from .orphans import close_orphans, orphan_note, process_tags
from .retry import retrying
from .store import TrackingError, check_store, open_experiment, tracking_uri
from .system import sampling

# DVC's variables for a stage run inside an experiment, recorded as run tags.
DVC_TAGS = {
    "DVC_EXP_NAME": "dvc_experiment",
    "DVC_EXP_BASELINE_REV": "dvc_baseline_rev",
    "DVC_STAGE": "dvc_stage",
}
BATCH = 1000  # MLflow's limit of metrics per log_batch


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
    commit = git.head()
    return f"{config} (repro {commit[:7]})" if commit else config


def run_tags(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a run is tagged with: the commit, who ran it and where (its process, its machine,
    a first heartbeat), the DVC stage and experiment, then ``extra``."""
    tags = {
        "git_commit": git.head() or "unknown",
        "mlflow.source.name": "dvc.yaml",
        # who ran it: the server account, else the login (MLflow's own fluent default)
        "mlflow.user": os.environ.get("MLFLOW_TRACKING_USERNAME") or _login(),
        **process_tags(),
    }
    tags.update({tag: os.environ[var] for var, tag in DVC_TAGS.items() if os.environ.get(var)})
    tags.update(extra or {})
    return tags


def training_params(
    config: Training, threads: int | str, data_path: str, data: Prepared
) -> dict[str, Any]:
    """What a training run logs as params: every training parameter of the schema, the layers,
    the data, and how it ran (threads, and the BLAS kernels that ran, on which the last bits
    depend: ``nnbp.kernels``, which the model file records too)."""
    from ...kernels import in_use
    from ...parallel import thread_count

    values = {k: list(v) if isinstance(v, tuple) else v for k, v in config.model_dump().items()}
    return {
        "config": values.pop("name"),
        "sizes": "-".join(map(str, [data.features, *config.hidden, data.classes])),
        **values,
        "threads": thread_count(threads, config.blocks),
        "blas_kernels": in_use(),
        "data_path": data_path,
        "data_md5": file_md5(data_path),
        "n_train": data.X_train.shape[1],
        "n_test": data.X_test.shape[1],
    }


class Run:
    """One MLflow run of a configuration; ``Run.start`` opens it. Not ``enabled`` (tracking off):
    every call does nothing."""

    def __init__(self, client: Any, run_id: str, name: str, uri: str, beat_every: float) -> None:
        self._client, self.run_id, self.name, self._uri = client, run_id, name, uri
        self._history: list[Any] = []  # every metric logged, with its timestamp, in order
        self._live = True  # False once live logging gave up: the rest waits for end()
        self._unsent: list[str] = []  # what end() could not deliver either
        # training and the system metrics' thread both log; a signal handler ending the run may
        # interrupt the main thread inside log_metrics
        self._logging = threading.RLock()
        self._heartbeat = Heartbeat(client, run_id, beat_every) if client is not None else None

    @property
    def enabled(self) -> bool:
        return self._client is not None

    @classmethod
    def start(
        cls, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
    ) -> Run:
        """Open a run of configuration ``name`` with ``params`` and tags (``run_tags``), after
        closing the runs left RUNNING by processes that are gone; a run that is not enabled when
        tracking is off.

        Raises ``TrackingError`` (one line) when the store cannot be used, before any training.
        """
        uri = tracking_uri()
        if uri is None:
            return cls(None, "", name, "", 0.0)
        beat_every, stale_after = interval(), timeout()  # bad settings: one line, no request
        check_store(uri)
        try:
            client, experiment_id = open_experiment(uri)
            _close_orphans_before(client, experiment_id, name, stale_after)
            run_id = _create(client, experiment_id, run_name(name), params, run_tags(tags))
        except Exception as e:
            raise TrackingError(f"MLflow store {uri} cannot be used: {first_line(e)}") from None
        return cls(client, run_id, name, uri, beat_every)

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

    def _send(self, fn: Callable[..., Any], *args: Any) -> str | None:
        """``fn(*args)`` with retries of transient errors; the error's first line if it fails."""
        try:
            retrying(fn, *args)
            return None
        except Exception as e:
            return first_line(e)

    def log_point(self, point: LogPoint) -> None:
        """A log point's metrics, at its iteration."""
        self.log_metrics(dataclasses.asdict(point.scores), step=point.iteration)

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        """Log a point live; if the store stays unusable, keep it for ``end`` to resend."""
        if not self.enabled:
            return
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
        ``system/...`` metrics (``nnbp.tooling.tracking.system``)."""
        return sampling(self.log_metrics if self.enabled else None)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """The file ``path`` as an artifact of the run, in ``folder``."""
        if not self.enabled:
            return
        if error := self._send(self._client.log_artifact, self.run_id, str(path), folder):
            self._unsent.append(f"artifact {Path(path).name} ({error})")

    def log_figure(self, figure: Any, path: str) -> None:
        """A matplotlib figure as the PNG artifact ``path``."""
        if not self.enabled:
            return
        if error := self._send(self._client.log_figure, self.run_id, figure, path):
            self._unsent.append(f"figure {path} ({error})")

    def log_datasets(self, data_path: str, data: Prepared) -> None:
        """Log the training and test sets (contexts ``training``, ``test``) as dataset inputs
        named after the data file, their digest the file's MD5 (what DVC records), their source
        the file; each as trained on: images as rows (n, d), and labels (n,)."""
        if not self.enabled:
            return
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

    def log_model(self, weights_path: str | Path, input_example: np.ndarray, step: int) -> None:
        """The network of ``weights_path`` as an MLflow Model named after the configuration
        (``mlflow_model``), linked to this run and to the metrics of ``step``; its input example
        a few images as rows (n, d)."""
        if not self.enabled:
            return
        from .mlflow_model import log_model

        model = (self._uri, self.run_id, self.name, weights_path, input_example, step)
        if error := self._send(log_model, *model):
            self._unsent.append(f"the MLflow Model ({error})")

    def end(self, status: str = "FINISHED") -> None:
        """Close the run as FINISHED, FAILED or KILLED, after resending the whole metric history
        if live logging broke (identical points are stored once, so this cannot duplicate).
        Whatever still cannot be sent is named in one warning line."""
        if not self.enabled:
            return
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


def _create(
    client: Any, experiment_id: str, name: str, params: Mapping[str, Any], tags: dict[str, str]
) -> str:
    """A new RUNNING run with ``params``; its id. A run whose params could not be logged is
    closed at once (KILLED on Ctrl-C, else FAILED), never left RUNNING."""
    from mlflow.entities import Param

    run = retrying(client.create_run, experiment_id, run_name=name, tags=tags)
    try:
        batch = [Param(k, str(v)) for k, v in params.items()]
        retrying(client.log_batch, run.info.run_id, params=batch)
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):
            client.set_terminated(run.info.run_id, status)
        raise
    return run.info.run_id


def _close_orphans_before(client: Any, experiment_id: str, name: str, stale_after: float) -> None:
    """``close_orphans`` as a run starts; a failure there never stops the training."""
    by = f"the next run ({os.environ.get('DVC_STAGE') or name}) on {machine()}"
    try:
        for orphan in close_orphans(client, experiment_id, by, stale_after):
            print(orphan_note(orphan))
    except Exception as e:
        print(f"warning: MLflow: orphaned runs not checked ({first_line(e)})", file=sys.stderr)
