"""One training run in MLflow, as a context manager: FINISHED when its block ends, FAILED on
an error, KILLED on Ctrl-C or SIGTERM. With tracking off (``NNBP_TRACKING=off``) ``Run.start``
gives a run that is not ``enabled``: every call does nothing, and MLflow is not even imported.

Tracking never costs a training result, nor holds the stage: the store is checked before training
starts; every call to it is made by the run's own thread (``sender``), in order, within the
budgets of ``retry`` (a call, the run's opening, all it sends after training, its KILLED status),
and the main thread waits for it only to open and to close the run, watching for a signal
meanwhile. If live logging fails, training goes on, the run keeps its whole history and
sends it again when it ends, and whatever still cannot be sent is named in one line. A run
records its process and keeps a heartbeat (``orphans``, ``heartbeat``) so that it is never left
RUNNING for good, whichever machine it ran on.

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
from .retry import (
    END_SECONDS,
    KILL_SECONDS,
    OutOfTime,
    describe,
    is_transient,
    retrying,
    start_seconds,
)
from .sender import Call, Sender, Unsent
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

    def __init__(
        self,
        client: Any,
        run_id: str,
        name: str,
        uri: str,
        beat_every: float,
        sender: Sender | None = None,
        stop_check: Callable[[], None] | None = None,
    ) -> None:
        self._client, self.run_id, self.name, self._uri = client, run_id, name, uri
        self._sender, self._stop_check = sender, stop_check
        self._history: list[Any] = []  # every metric logged, with its timestamp, in order
        self._live = True  # False once live logging gave up: the rest waits for end()
        self._reported: list[Call] = []  # calls whose failure end() names
        self._end_by: float | None = None  # when all that follows training must be sent
        self._down = False  # a call of the run's end found the store not answering
        self._lock = threading.Lock()  # training and the system metrics' thread both log
        self._heartbeat = Heartbeat(client, run_id, beat_every) if client is not None else None

    @property
    def enabled(self) -> bool:
        return self._client is not None

    @classmethod
    def start(
        cls,
        name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
        *,
        stop_check: Callable[[], None] | None = None,
    ) -> Run:
        """Open a run of configuration ``name`` with ``params`` and tags (``run_tags``), after
        closing the runs left RUNNING by processes that are gone; a run that is not enabled when
        tracking is off. ``stop_check`` is called while the run waits for the store (it may
        raise to stop the wait: a stage's signal path, ``nnbp.tooling.cli.stop_point``).

        Raises ``TrackingError`` (one line) when the store cannot be used, before any training.
        """
        uri = tracking_uri()
        if uri is None:
            return cls(None, "", name, "", 0.0)
        beat_every, stale_after = interval(), timeout()  # bad settings: one line, no request
        budget = start_seconds(uri)
        sender = Sender()
        creating = threading.Event()  # the opening is past its last point of giving up
        opening = sender.submit(
            _open,
            uri,
            name,
            dict(params),
            dict(tags or {}),
            stale_after,
            creating,
            seconds=budget,
        )
        try:
            opened = sender.wait([opening], time.monotonic() + budget, stop_check)
        except KeyboardInterrupt:
            opening.cancel.set()  # before reading ``creating``: see _open
            # A run being created is closed as KILLED, if the store answers in time; an
            # opening not that far gives up by itself, and the stage need not wait for it.
            sender.close(time.monotonic() + (KILL_SECONDS if creating.is_set() else 0.0))
            raise
        if not opened or opening.error is not None:
            sender.close(time.monotonic())
        if not opened:
            raise TrackingError(f"MLflow store {uri} cannot be used: no answer within {budget:g} s")
        if isinstance(opening.error, TrackingError):
            raise opening.error
        if opening.error is not None:
            raise TrackingError(f"MLflow store {uri} cannot be used: {first_line(opening.error)}")
        client, run_id = opening.value
        return cls(client, run_id, name, uri, beat_every, sender, stop_check)

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

    def _submit(self, fn: Callable[..., Any], *args: Any, label: str) -> Call:
        """Hand ``fn(*args)`` to the run's thread (``_sending``); named by end() if it fails."""
        assert self._sender is not None
        call = self._sender.submit(self._sending, fn, *args, label=label)
        self._reported.append(call)
        return call

    def _sending(
        self, fn: Callable[..., Any], *args: Any, deadline: float, cancel: threading.Event
    ) -> Any:
        """``fn(*args)``, retried until ``deadline``; but once a call of the run's end has spent
        its retries on a store that does not answer, each other makes one attempt (it goes
        through if the store is back, and costs a moment if not)."""
        delays = () if self._down else None
        try:
            return retrying(fn, *args, delays=delays, deadline=deadline, cancel=cancel)
        except Exception as e:
            if self._end_by is not None and is_transient(e):
                self._down = True
            raise

    def _closing(self) -> None:
        """Training has ended: all that is still to send gets ``END_SECONDS`` from now."""
        if self._end_by is None and self._sender is not None:
            self._end_by = time.monotonic() + END_SECONDS
            self._sender.cap(self._end_by)

    def log_point(self, point: LogPoint) -> None:
        """A log point's metrics, at its iteration."""
        self.log_metrics(dataclasses.asdict(point.scores), step=point.iteration)

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        """Log a point live, without waiting for the store; if it stays unusable, the point is
        kept for ``end`` to resend."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        with self._lock:
            self._history.extend(batch)
            if self._live:
                assert self._sender is not None
                self._sender.submit(self._send_live, batch, label="live metrics")

    def _send_live(self, batch: list[Any], *, deadline: float, cancel: threading.Event) -> None:
        if not self._live:
            return  # given up: end() resends the whole history
        try:
            retrying(self._client.log_batch, self.run_id, batch, deadline=deadline, cancel=cancel)
        except Exception as e:
            self._live = False
            if self._end_by is not None:
                return  # training is over: the run's last line names what is missing
            print(
                f"warning: MLflow logging failed ({describe(e)}); training goes on, and its "
                "metrics will be sent again when the run ends",
                file=sys.stderr,
                flush=True,
            )

    def flush(self, seconds: float) -> bool:
        """Wait until everything handed to the run so far is sent, or given up, for ``seconds``
        at most; whether it all is."""
        if not self.enabled:
            return True
        assert self._sender is not None
        mark = self._sender.submit(lambda *, deadline, cancel: None)
        return self._sender.wait([mark], time.monotonic() + seconds, self._stop_check)

    def system_metrics(self) -> contextlib.AbstractContextManager[None]:
        """While the block runs, the machine's and this process's CPU and memory, logged as
        ``system/...`` metrics (``nnbp.tooling.tracking.system``)."""
        return sampling(self.log_metrics if self.enabled else None)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """The file ``path`` as an artifact of the run, in ``folder``."""
        if not self.enabled:
            return
        self._closing()
        label = f"artifact {Path(path).name}"
        self._submit(self._client.log_artifact, self.run_id, str(path), folder, label=label)

    def log_figure(self, figure: Any, path: str) -> None:
        """A matplotlib figure as the PNG artifact ``path``."""
        if not self.enabled:
            return
        self._closing()
        self._submit(self._client.log_figure, self.run_id, figure, path, label=f"figure {path}")

    def log_datasets(self, data_path: str, data: Prepared) -> None:
        """Log the training and test sets (contexts ``training``, ``test``) as dataset inputs
        named after the data file, their digest the file's MD5 (what DVC records), their source
        the file; each as trained on: images as rows (n, d), and labels (n,)."""
        if not self.enabled:
            return
        splits = {"training": (data.X_train.T, data.y_train), "test": (data.X_test.T, data.y_test)}
        self._submit(self._log_datasets, data_path, splits, label="the datasets")

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

        self._closing()
        model = (self._uri, self.run_id, self.name, weights_path, input_example, step)
        self._submit(log_model, *model, label="the MLflow Model")

    def _resend(self, *, deadline: float, cancel: threading.Event) -> None:
        """The whole metric history again, if live logging broke (identical points are stored
        once, so this cannot duplicate); ``Unsent`` naming the steps that could not be sent."""
        if self._live:
            return
        with self._lock:
            history = list(self._history)
        for i in range(0, len(history), BATCH):
            try:
                chunk = history[i : i + BATCH]
                log_batch = self._client.log_batch
                self._sending(log_batch, self.run_id, chunk, deadline=deadline, cancel=cancel)
            except Exception as e:
                steps = sorted({m.step for m in history[i:]})
                raise Unsent(f"metrics at steps {steps[0]}..{steps[-1]}", describe(e)) from e

    def end(self, status: str = "FINISHED") -> None:
        """Close the run as FINISHED, FAILED or KILLED: what is still queued is sent, then the
        metric history if live logging broke, then the status, within ``END_SECONDS`` of the end
        of training; KILLED, the status first, within ``KILL_SECONDS``, and nothing else that
        waits. Whatever could not be sent is named in one warning line. A signal while the run
        waits closes it as KILLED, and is raised."""
        if not self.enabled:
            return
        assert self._heartbeat is not None and self._sender is not None
        self._heartbeat.stop()
        if status == "KILLED":
            self._kill()
            return
        self._closing()
        assert self._end_by is not None
        resend = self._sender.submit(self._resend, label="metrics not sent live")
        self._reported.append(resend)
        label = _status_label(status)
        closed = self._submit(self._client.set_terminated, self.run_id, status, label=label)
        try:
            self._sender.wait(self._reported, self._end_by, self._stop_check)
        except KeyboardInterrupt:
            self._kill(replacing=(resend, closed))
            raise
        self._report()
        self._sender.close(self._end_by)

    def _kill(self, replacing: tuple[Call, ...] = ()) -> None:
        """The KILLED status first, then the history if live logging broke, within
        ``KILL_SECONDS``; what waited in the queue is given up. ``replacing``: the calls of an
        end the signal stopped (its status, its resend), which these two replace: not named as
        lost (the run is not left RUNNING for want of a FINISHED that KILLED replaced)."""
        assert self._sender is not None
        self._reported = [call for call in self._reported if call not in replacing]
        until = time.monotonic() + KILL_SECONDS
        self._end_by = until
        self._sender.cap(until)
        self._sender.drop_pending("the run was stopped first")
        closed = self._submit(
            self._client.set_terminated, self.run_id, "KILLED", label=_status_label("KILLED")
        )
        resend = self._sender.submit(self._resend, label="metrics not sent live")
        self._reported.append(resend)
        self._sender.wait([closed, resend], until)
        self._report()
        self._sender.close(until)

    def _report(self) -> None:
        """One warning line naming what could not be sent, if anything, grouped by why."""
        unsent: dict[str, list[str]] = {}
        for call in self._reported:
            if failure := call.failure():
                what, why = failure
                unsent.setdefault(why, []).append(what)
        self._reported = []
        if unsent:
            groups = "; ".join(f"{_listed(what)} ({why})" for why, what in unsent.items())
            print(
                f"warning: MLflow run {self.name} ({self.run_id}) is incomplete: could not send "
                f"{groups}; the stage's outputs are written all the same",
                file=sys.stderr,
                flush=True,
            )


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _status_label(status: str) -> str:
    return (
        f"its {status} status, so it shows RUNNING until the next training run or "
        "`nnbp-close-orphans` closes it as FAILED"
    )


def _open(
    uri: str,
    name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    stale_after: float,
    creating: threading.Event,
    *,
    deadline: float,
    cancel: threading.Event,
) -> tuple[Any, str]:
    """(a client of ``uri``, a new RUNNING run's id, its ``params`` logged), after the store's
    check and closing the orphans; in the run's thread. ``TrackingError`` (one line) if the
    store cannot be used. ``creating`` is set before ``cancel`` is read, and the main thread
    sets ``cancel`` before it reads ``creating``: either the run is not created, or the main
    thread waits for it. A run whose params could not be logged is closed at once as FAILED,
    and one whose opening was given up (``cancel``: a signal) as KILLED: never left RUNNING."""
    check_store(uri)
    try:
        client, experiment_id = open_experiment(uri, deadline=deadline)  # MLflow's settings set
        from mlflow.entities import Param

        _close_orphans_before(client, experiment_id, name, stale_after)
        creating.set()
        if cancel.is_set():  # a signal: no run to open, nor to close
            raise OutOfTime("the run was stopped first")
        run = retrying(
            client.create_run,
            experiment_id,
            run_name=run_name(name),
            tags=run_tags(tags),
            deadline=deadline,
            cancel=cancel,
        )
        run_id = run.info.run_id
        try:
            batch = [Param(k, str(v)) for k, v in params.items()]
            retrying(client.log_batch, run_id, params=batch, deadline=deadline, cancel=cancel)
        except BaseException:
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, "KILLED" if cancel.is_set() else "FAILED")
            raise
        if cancel.is_set():
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, "KILLED")
    except Exception as e:
        raise TrackingError(f"MLflow store {uri} cannot be used: {describe(e)}") from None
    return client, run_id


def _close_orphans_before(client: Any, experiment_id: str, name: str, stale_after: float) -> None:
    """``close_orphans`` as a run starts; a failure there never stops the training."""
    by = f"the next run ({os.environ.get('DVC_STAGE') or name}) on {machine()}"
    try:
        for orphan in close_orphans(client, experiment_id, by, stale_after):
            print(orphan_note(orphan))
    except Exception as e:
        print(f"warning: MLflow: orphaned runs not checked ({first_line(e)})", file=sys.stderr)
