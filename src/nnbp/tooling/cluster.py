"""``nnbp-sweep``: a grid of DVC experiments run by a Dask cluster, one task per experiment.

The grid is expanded by DVC's own code, exactly as ``dvc exp run --queue -S`` expands it
(``expand``). Each experiment is named after its baseline commit and its params (``name_of``:
the params files at the commit with its overrides applied, by DVC's code too), so the same grid
submitted again finds the experiments already on the git remote and runs only the others, and a
task that Dask runs twice lands once (``task``).

Before anything is submitted: the commit must be on the git remote (the workers clone it), the
``-S`` values must be overrides DVC can apply, ``--sort-by`` a metric. Then one task per
experiment not on the remote yet, progress while they run (done / running / failed, from the
tasks' events), and a table of every experiment of the grid, sorted by the metric, its refs
fetched so that ``dvc exp show`` lists them here.

Without ``--scheduler`` a Dask cluster starts on this machine (``LocalCluster``): with a git
remote it shares the experiments like any cluster; without one its tasks clone this repository
and push the experiments back into it, as ``dvc exp run --queue`` would leave them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import METRICS, Metrics, parse_metrics
from ..dvcfiles import PARAMS_FILE
from ..errors import ConfigError, UserError, first_line
from . import git
from .task import METRICS_FILE, Experiment, ExperimentFailed, Outcome
from .task import run as run_task
from .team import RemoteError
from .tracking.store import tracking_uri

NAME_PREFIX = "sweep"
LOCAL_CLUSTER_DIR = ".dvc/tmp/cluster"  # the local cluster's slots, beside DVC's own temp dirs
TICK = 0.5  # seconds between two looks at the tasks


class SweepError(UserError):
    """The sweep cannot start, or some of its experiments failed; one line."""


# --- the grid ----------------------------------------------------------------------------------


def expand(settings: Sequence[str]) -> list[dict[str, list[str]]]:
    """The experiments ``dvc exp run --queue -S SETTING ...`` queues, in its order: each a
    mapping of params file -> its overrides (``lamb=0.001``), one value each. DVC's own
    expansion (``dvc.repo.experiments.run``): Hydra's sweep syntax, the product of the ``-S``."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps, to_hydra_overrides

    for setting in settings:  # each alone first, so that an error names the one at fault
        try:
            to_hydra_overrides([setting.partition(":")[2] if _has_file(setting) else setting])
        except Exception as e:
            raise ConfigError(
                f"-S {setting!r}: not an override DVC can read ({first_line(e)}); the syntax is "
                "[FILE:]KEY=VALUE, or KEY=V1,V2 for a sweep"
            ) from None
    path_overrides = to_path_overrides(settings)
    sweep = any(
        o.is_sweep_override()
        for overrides in path_overrides.values()
        for o in to_hydra_overrides(overrides)
    )
    if not sweep:
        return [path_overrides]
    try:
        points = get_hydra_sweeps(path_overrides)
    except Exception as e:  # a glob sweep, which DVC refuses too
        raise ConfigError(f"-S: {first_line(e)}") from None
    return [{path: list(overrides) for path, overrides in point.items()} for point in points]


def _has_file(setting: str) -> bool:
    """Whether ``setting`` names its params file (``other.yaml:key=1``), as DVC tells."""
    return ":" in setting.partition("=")[0]


def arguments(point: Mapping[str, list[str]]) -> tuple[str, ...]:
    """The ``-S`` arguments of one experiment (``other.yaml:key=1`` for another file)."""
    return tuple(
        o if Path(path) == PARAMS_FILE else f"{path}:{o}"
        for path, overrides in point.items()
        for o in overrides
    )


def name_of(commit: str, point: Mapping[str, list[str]], root: Path) -> str:
    """The experiment's name: a digest of its baseline commit and its params, the params files
    of ``commit`` with ``point``'s overrides applied by DVC. ``lamb=0.001 seed=1`` and ``seed=1
    lamb=0.001`` are one experiment. ``ConfigError`` (one line) for an override DVC refuses
    (a key the file does not have...)."""
    from dvc.utils.hydra import apply_overrides
    from dvc.utils.serialize import LOADERS

    params: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="nnbp-sweep-") as tmp:
        for path, overrides in sorted(point.items()):
            copy = Path(tmp) / Path(path).name
            try:
                copy.write_text(git.run("show", f"{commit}:{path}", cwd=root))
            except git.GitError:
                raise ConfigError(f"-S {path}:...: {path} is not in commit {commit[:7]}") from None
            try:
                apply_overrides(copy, overrides)
            except Exception as e:
                cause = e.__cause__ or e
                raise ConfigError(
                    f"-S {' '.join(overrides)}: DVC cannot apply it to {path} "
                    f"({first_line(cause)}); `+KEY=VALUE` adds a key"
                ) from None
            params[path] = LOADERS[copy.suffix.lower()](str(copy))
    identity = json.dumps(
        {"baseline": commit, "params": _as_python_compares(params)}, sort_keys=True, default=str
    )
    return f"{NAME_PREFIX}-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"


def _as_python_compares(value: Any) -> Any:
    """``value`` with its numbers as floats: ``lamb=0`` and the file's ``lamb: 0.0`` are equal
    to Python, and to DVC, which compares params so (and so re-runs nothing for them)."""
    if isinstance(value, Mapping):
        return {k: _as_python_compares(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_python_compares(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# --- what to sort by ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SortKey:
    """``METRIC`` (its mean over the configurations) or ``CONFIG.METRIC``."""

    metric: str
    config: str | None = None

    @classmethod
    def parse(cls, text: str, configs: Sequence[str]) -> SortKey:
        config, _, metric = text.rpartition(".")
        if metric not in METRICS:
            raise ConfigError(
                f"--sort-by {text!r}: no metric {metric!r} (one of {', '.join(METRICS)}, "
                "alone for its mean over the configurations, or CONFIG.METRIC)"
            )
        if config and configs and config not in configs:
            raise ConfigError(
                f"--sort-by {text!r}: no configuration {config!r} in the baseline's "
                f"{METRICS_FILE} ({', '.join(configs)})"
            )
        return cls(metric, config or None)

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]["better"] == "higher"

    def value(self, metrics: Metrics) -> float | None:
        if self.config is not None:
            return (metrics.get(self.config) or {}).get(self.metric)
        values = [m[self.metric] for m in metrics.values() if m.get(self.metric) is not None]
        return sum(values) / len(values) if values else None

    def __str__(self) -> str:
        return f"{self.config}.{self.metric}" if self.config else f"mean {self.metric}"


# --- where the experiments go ------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where the workers clone from and the experiments land: the team's git remote, or (no
    remote: this machine only) this repository."""

    source: str  # what a slot clones
    remote: str | None  # the git remote's name; None: this repository
    root: Path

    @property
    def label(self) -> str:
        return f"git remote '{self.remote}'" if self.remote else "this repository"

    def refs(self, prefix: str) -> set[str]:
        """The refs under ``prefix`` that are there."""
        if self.remote is None:
            listed = git.run("for-each-ref", "--format=%(refname)", prefix, cwd=self.root)
            return set(listed.split())
        listed = git.run("ls-remote", "--refs", self.remote, f"{prefix}*", cwd=self.root)
        return {line.split()[1] for line in listed.splitlines() if line.strip()}

    def fetch(self, refs: Sequence[str]) -> None:
        """The experiments' refs into this repository (what ``dvc exp pull --no-cache`` does),
        for ``dvc exp show`` and the table."""
        if self.remote is not None and refs:
            git.run("fetch", "--quiet", self.remote, *(f"+{r}:{r}" for r in refs), cwd=self.root)


def find_target(git_remote: str, on_cluster: bool, root: Path, commit: str) -> Target:
    """The team's git remote ``git_remote`` once it is checked to hold ``commit``; without such
    a remote, this repository, which only a cluster on this machine can use."""
    remotes = git.run("remote", cwd=root).split()
    if git_remote not in remotes:
        if on_cluster:
            raise RemoteError(
                f"a cluster's workers clone the team's git remote, and this repository has no "
                f"git remote {git_remote!r} (`git remote add {git_remote} URL`, or "
                "--git-remote NAME); nothing was submitted"
            )
        return Target(str(root), None, root)
    url = git.run("remote", "get-url", git_remote, cwd=root).strip()
    if Path(url).is_dir():  # a folder (a test's, or a shared disk's): the same for every worker
        url = str(Path(url).resolve())
    try:
        git.run("fetch", "--quiet", git_remote, cwd=root)
    except git.GitError as e:
        raise RemoteError(
            f"git remote {git_remote!r} ({url}) cannot be reached: {e.detail}; "
            "nothing was submitted"
        ) from None
    on_remote = git.run(
        "for-each-ref",
        "--contains",
        commit,
        "--format=%(refname)",
        f"refs/remotes/{git_remote}/",
        cwd=root,
    )
    if not on_remote.strip():
        raise RemoteError(
            f"commit {commit[:7]} is not on git remote {git_remote!r}, whose workers clone it: "
            f"push it first (`git push {git_remote} HEAD:BRANCH`); nothing was submitted"
        )
    return Target(url, git_remote, root)


# --- the cluster -------------------------------------------------------------------------------


@contextlib.contextmanager
def dask_client(scheduler: str | None, jobs: int) -> Iterator[Any]:
    """A client of the scheduler at ``scheduler``, or of a cluster started on this machine (one
    worker, ``jobs`` task slots) and closed after the block. Dask's own connect timeout
    (``distributed.comm.timeouts.connect``) bounds the wait for a scheduler."""
    from distributed import Client, LocalCluster

    # Its log lines (a lost scheduler's are tracebacks) would wrap ours, which say it in one;
    # Dask's configuration gives some of its loggers levels of their own.
    for name in [*logging.root.manager.loggerDict, "distributed"]:
        if name.partition(".")[0] == "distributed":
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if scheduler is None:
        with (
            LocalCluster(
                n_workers=1,
                threads_per_worker=jobs,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.CRITICAL,  # a failed task is our line, not its log
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = Client(scheduler)
    except (OSError, TimeoutError) as e:
        raise SweepError(
            f"Dask scheduler {scheduler} cannot be reached ({first_line(e)}): start it "
            "(`dask scheduler`), fix --scheduler or DASK_SCHEDULER_ADDRESS, or leave both out "
            "to sweep on this machine; nothing was submitted"
        ) from None
    with client:
        yield client


# --- following the tasks -----------------------------------------------------------------------


@dataclass
class Row:
    """One experiment of the grid in the table."""

    name: str
    settings: tuple[str, ...]
    status: str = "waiting"  # waiting, running, landed, earlier, found, failed, lost
    active: bool = False  # its task runs now (between its "started" and "ended" events)
    machine: str = ""
    error: str = ""
    metrics: Metrics | None = None
    seconds: Mapping[str, float] = field(default_factory=dict)


class Progress:
    """The sweep as it goes, one line per change, each opened by the counts."""

    def __init__(self, rows: Mapping[str, Row], echo: Callable[[str], None]) -> None:
        self.rows, self.echo = rows, echo

    def counts(self) -> str:
        rows = self.rows.values()
        count = {
            "done": sum(r.status in ("landed", "found") for r in rows),
            "running": sum(r.active for r in rows),
            "failed": sum(r.status == "failed" for r in rows),
            "waiting": sum(r.status == "waiting" for r in rows),
        }
        return ", ".join(f"{n} {s}" for s, n in count.items())

    def say(self, name: str, what: str) -> None:
        self.echo(f"[{self.counts()}] {name} {what}")

    def started(self, name: str, machine: str) -> None:
        row = self.rows.get(name)
        if row is None or row.status not in ("waiting", "running"):
            return
        again = row.status == "running"  # a second start: the first attempt's worker died
        row.status, previous, row.machine, row.active = "running", row.machine, machine, True
        note = f" (again: its worker on {previous} was lost)" if again else ""
        self.say(name, f"started on {machine}{note}: {' '.join(row.settings)}")

    def finished(self, outcome: Outcome) -> None:
        row = self.rows[outcome.name]
        row.machine, row.seconds, row.metrics = outcome.machine, outcome.seconds, outcome.metrics
        row.active = False
        if outcome.found:
            row.status = "found"
            self.say(row.name, f"was already on the remote when it started on {row.machine}")
            return
        row.status = "landed"
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in outcome.seconds.items())
        self.say(row.name, f"landed from {row.machine} ({phases})")

    def failed(self, name: str, error: BaseException) -> None:
        row = self.rows[name]
        row.status, row.error, row.active = "failed", _why(error), False
        if isinstance(error, ExperimentFailed):
            row.machine = error.machine
            where = f" on {error.machine} (its log there: {error.log})"
        else:
            where = ""
        self.say(name, f"failed{where}: {row.error}")


def _why(error: BaseException) -> str:
    """A task's failure in one line."""
    from distributed import KilledWorker

    if isinstance(error, ExperimentFailed):
        return str(error)
    if isinstance(error, KilledWorker):
        return (
            "every worker that ran it died (Dask gives up after "
            "distributed.scheduler.allowed-failures)"
        )
    return f"{type(error).__name__}: {first_line(error)}"


def follow(
    client: Any, futures: Mapping[Any, str], progress: Progress, topic: str, local: bool
) -> None:
    """Wait for every task, telling the progress; on Ctrl-C, cancel those not started (those
    running go on, unless their workers are this command's ``local`` cluster)."""
    from distributed import CancelledError, wait

    events: queue.SimpleQueue[Mapping[str, str]] = queue.SimpleQueue()
    client.subscribe_topic(topic, lambda event: events.put(event[1]))
    pending = set(futures)
    try:
        while pending:
            try:
                done = wait(pending, timeout=TICK, return_when="FIRST_COMPLETED").done
            except TimeoutError:
                done = set()
            except CancelledError:  # every future at once: the scheduler is gone
                for future in pending:
                    row = progress.rows[futures[future]]
                    row.status, row.active = "lost", False
                    row.error = "the Dask scheduler was lost before it ended"
                progress.echo(
                    f"lost the Dask scheduler: {len(pending)} experiments not done (those "
                    "running may still land; the same command again runs what did not)"
                )
                return
            while not events.empty():
                event = events.get()
                if event["event"] == "started":
                    progress.started(event["name"], event["machine"])
                elif event["name"] in progress.rows:  # ended
                    progress.rows[event["name"]].active = False
            for future in done:
                pending.discard(future)
                name = futures[future]
                if future.status == "finished":
                    progress.finished(future.result())
                elif future.status == "error":
                    progress.failed(name, future.exception())
                else:  # cancelled: the scheduler forgot it (restarted, or lost)
                    progress.rows[name].status = "lost"
                    progress.say(name, "was forgotten by the scheduler (did it restart?)")
    except KeyboardInterrupt:
        rows = progress.rows
        waiting = [f for f in pending if rows[futures[f]].status == "waiting"]
        client.cancel(waiting)
        running = len(pending) - len(waiting)
        machines = ", ".join(sorted({rows[futures[f]].machine for f in pending} - {""}))
        said = f"interrupted: {_count(len(waiting), 'experiment')} not started cancelled"
        if running and local:
            said += f"; {running} running stopped with this machine's cluster"
        elif running:
            said += f"; {running} running on {machines} go on there and land"
        progress.echo(f"{said} (the same command again runs what did not land)")
        raise


# --- the table ---------------------------------------------------------------------------------


def table(rows: Sequence[Row], key: SortKey) -> str:
    """Every experiment: its name, params and the metric ``key`` names for each configuration
    and their mean, best first; those without metrics last, saying why."""
    configs: list[str] = []
    for row in rows:
        configs += [c for c in row.metrics or {} if c not in configs]
    shown = METRICS[key.metric]["shown"]
    header = ["experiment", "params", *(f"{c} {key.metric}" for c in configs)]
    header.append(f"mean {key.metric}")

    def score(row: Row) -> tuple[int, float]:
        value = key.value(row.metrics) if row.metrics else None
        if value is None:
            return (1, 0.0)
        return (0, -value if key.higher_is_better else value)

    lines = []
    for row in sorted(rows, key=score):
        cells = [row.name, " ".join(row.settings)]
        if row.metrics:
            values = [(row.metrics.get(c) or {}).get(key.metric) for c in configs]
            values.append(SortKey(key.metric).value(row.metrics))
            cells += ["" if v is None else f"{v:.{shown}f}" for v in values]
        else:  # no metrics: why, across the metric columns
            cells.append(f"{row.status}: {row.error}" if row.error else row.status)
        lines.append(cells)
    measured = [header, *(c for c in lines if len(c) == len(header))]
    widths = [max(len(c[i]) for c in measured) for i in range(len(header))]
    widths[1] = max([widths[1], *(len(c[1]) for c in lines)])  # a failure's params too

    def fmt(cells: list[str]) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:2], widths[:2], strict=True)]
        right = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=False)]
        return "  ".join(left + (right if len(cells) == len(header) else cells[2:])).rstrip()

    return "\n".join(fmt(cells) for cells in [header, *lines])


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"


# --- the command -------------------------------------------------------------------------------


def sweep(
    settings: Sequence[str],
    *,
    scheduler: str | None,
    jobs: int,
    git_remote: str,
    dvc_remote: str | None,
    sort_by: str,
    timeout: float,
    echo: Callable[[str], None],
) -> None:
    """Run the grid of ``settings`` on the cluster and print its table (``nnbp-sweep``);
    ``SweepError`` when an experiment failed, once the others have landed."""
    root = git.top_level()
    commit = git.head()
    if root is None or commit is None:
        raise SweepError("not inside a git repository with a commit: run this in a clone")
    if not settings:
        raise ConfigError("name the grid with -S KEY=V1,V2 (as `dvc exp run --queue -S`)")
    points = expand(settings)
    try:
        baseline = parse_metrics(git.show(commit, METRICS_FILE, cwd=root), METRICS_FILE)
    except (git.GitError, UserError):
        baseline = {}
    key = SortKey.parse(sort_by, list(baseline))
    rows: dict[str, Row] = {}
    for point in points:  # the same params twice are one experiment
        name = name_of(commit, point, root)
        rows.setdefault(name, Row(name, arguments(point)))
    target = find_target(git_remote, scheduler is not None, root, commit)
    if git.answer("status", "--porcelain", "--untracked-files=no", cwd=root):
        echo(f"note: the sweep runs commit {commit[:7]}; uncommitted changes are not part of it")

    from dvc.repo.experiments.refs import ExpRefInfo

    prefix = str(ExpRefInfo(commit)) + "/"
    earlier = target.refs(prefix)
    for row in rows.values():
        if prefix + row.name in earlier:
            row.status = "earlier"
    todo = [row for row in rows.values() if row.status == "waiting"]
    where = scheduler or f"a Dask cluster on this machine ({_count(jobs, 'task slot')})"
    echo(
        f"{_count(len(rows), 'experiment')} of commit {commit[:7]}: {len(rows) - len(todo)} "
        f"already in {target.label}, {len(todo)} to run on {where}"
    )
    if todo:
        _submit(todo, rows, target, commit, scheduler, jobs, dvc_remote, timeout, echo)

    landed = [r for r in rows.values() if r.status in ("landed", "earlier", "found")]
    target.fetch([prefix + r.name for r in landed])
    for row in landed:
        text = git.show(prefix + row.name, METRICS_FILE, cwd=root)
        row.metrics = parse_metrics(text, f"{row.name}:{METRICS_FILE}")
    echo("")
    echo(table(list(rows.values()), key))
    show = "dvc exp show"
    if key.config:
        order = "desc" if key.higher_is_better else "asc"
        show += f" --sort-by {key.config}.{key.metric} --sort-order {order}"
    echo(f"\n{len(landed)} of {len(rows)} experiments are in {target.label}; here: {show}")
    failed = [r for r in rows.values() if r.status not in ("landed", "earlier", "found")]
    if failed:
        raise SweepError(
            f"{len(failed)} of {len(rows)} experiments did not land ({failed[0].name}: "
            f"{failed[0].error or failed[0].status}); the same command runs them again"
        )


def _submit(
    todo: Sequence[Row],
    rows: Mapping[str, Row],
    target: Target,
    commit: str,
    scheduler: str | None,
    jobs: int,
    dvc_remote: str | None,
    timeout: float,
    echo: Callable[[str], None],
) -> None:
    """One task per experiment of ``todo``, followed to its end."""
    topic = f"nnbp-sweep-{uuid.uuid4().hex[:12]}"
    local: dict[str, Any] = {}
    if scheduler is None:  # this machine: this repository's DVC cache and MLflow store, which
        from dvc.repo import Repo  # a clone's would not be (its own, in the clone)

        with Repo(str(target.root)) as repo:
            local["cache"] = repo.cache.local_cache_dir  # `dvc cache dir`
        uri = tracking_uri()
        local["env"] = (("MLFLOW_TRACKING_URI", uri),) if uri else ()
        # the local cluster's slots, beside DVC's own temporary copies, unless told otherwise
        os.environ.setdefault("NNBP_CLUSTER_DIR", str(target.root / LOCAL_CLUSTER_DIR))
    experiments = [
        Experiment(
            row.name,
            commit,
            row.settings,
            target.source,
            shared=target.remote is not None,
            dvc_remote=dvc_remote,
            topic=topic,
            timeout=timeout,
            **local,
        )
        for row in todo
    ]
    with dask_client(scheduler, jobs) as client:
        workers = client.scheduler_info().get("workers", {})
        if not workers:
            echo("no worker is connected yet: the experiments wait for one (`dask worker ...`)")
        futures = {
            client.submit(run_task, exp, key=f"{topic}-{exp.name}", pure=False): exp.name
            for exp in experiments
        }
        follow(client, futures, Progress(rows, echo), topic, local=scheduler is None)
    sys.stdout.flush()
