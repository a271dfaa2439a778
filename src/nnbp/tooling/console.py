"""The project's commands that are no DVC stage, installed as console scripts:

nnbp-gate                       # reports/metrics.json against the metrics committed at HEAD
nnbp-gate --baseline-ref main   # in a pull request
nnbp-close-orphans              # close the MLflow runs whose process is gone
nnbp-share origin               # dvc exp push, once the DVC remote answers
nnbp-apply origin NAME          # dvc exp pull + dvc exp apply, only if NAME's outputs arrived
nnbp-sweep -S 'lamb=0,0.005' -S 'seed=1,2' --scheduler tcp://HOST:8786   # a grid on a cluster
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import config
from ..artifacts import load_metrics
from ..dvcfiles import read_yaml
from . import cluster, team
from .cli import Tool
from .gate import metrics_at_ref, run_gate
from .task import EXPERIMENT_TIMEOUT
from .tracking.orphans import close_orphan_runs, orphan_note
from .tracking.store import OPT_OUT

FILE = click.Path(dir_okay=False, path_type=Path)
FOLDER = click.Path(file_okay=False, path_type=Path)


@click.command(cls=Tool)
@click.option(
    "--metrics",
    "metrics_path",
    type=FILE,
    default="reports/metrics.json",
    show_default=True,
    help="The new metrics.",
)
@click.option(
    "--baseline-ref",
    default="HEAD",
    show_default=True,
    help="Git revision whose committed metrics file is the baseline (`main` in a PR).",
)
@click.option(
    "--baseline",
    "baseline_path",
    type=FILE,
    help="A metrics file to compare with instead of --baseline-ref.",
)
@click.option(
    "--params",
    "params_path",
    type=FILE,
    default="params.yaml",
    show_default=True,
    help="Where the `gate:` tolerances are.",
)
@click.option(
    "--lock",
    "lock_path",
    type=FILE,
    default="dvc.lock",
    show_default=True,
    help="Checked against the models' own hyperparameters (skipped if absent).",
)
@click.option(
    "--models",
    "models_dir",
    type=FOLDER,
    default="models",
    show_default=True,
    help="The trained models that --lock must describe.",
)
@click.option(
    "--max-test-acc-drop",
    type=click.FloatRange(min=0),
    help="Percentage points test accuracy may fall [params: gate.max_test_acc_drop].",
)
@click.option(
    "--max-train-acc-drop",
    type=click.FloatRange(min=0),
    help="Percentage points training accuracy may fall [gate.max_train_acc_drop].",
)
@click.option(
    "--max-loss-rise",
    type=click.FloatRange(min=0),
    help="Percent (relative) the loss may rise [params: gate.max_loss_rise].",
)
def gate(
    metrics_path: Path,
    baseline_ref: str,
    baseline_path: Path | None,
    params_path: Path,
    lock_path: Path,
    models_dir: Path,
    **overrides: float | None,
) -> None:
    """Fail when the metrics regressed against a baseline beyond the tolerances of `gate:` in
    params.yaml, or when dvc.lock does not describe the models on disk.

    Prints a Markdown table (config, metric, baseline, new, change, verdict) on stdout, one line
    per failure on stderr, and exits 1 if anything failed."""
    given = {k: v for k, v in overrides.items() if v is not None}
    tolerances = given
    if len(given) < len(overrides):  # the rest from params.yaml
        params = config.Params(read_yaml(params_path), ["gate"], source=str(params_path))
        tolerances = {**config.Tolerances.read(params).model_dump(), **given}
    new = load_metrics(metrics_path)
    if baseline_path is not None:
        baseline, source = load_metrics(baseline_path), str(baseline_path)
    else:
        baseline, source = metrics_at_ref(metrics_path, baseline_ref), baseline_ref
    checked = lock_path.is_file() and models_dir.is_dir()
    verdict = run_gate(
        new,
        baseline,
        tolerances,
        title=f"{metrics_path} against {source}",
        lock=lock_path if checked else None,
        models=models_dir if checked else None,
    )
    click.echo(verdict.report)
    for line in verdict.failures:
        click.echo(line, err=True)
    if not verdict.passed:
        sys.exit(1)


@click.command(cls=Tool)
def close_orphans() -> None:
    """Close the MLflow runs left RUNNING by a training process that is gone.

    A run whose process was killed (kill -9, out of memory, a machine that died) or that could
    not be closed because the store was unreachable at the time stays RUNNING. Every training
    run closes such orphans when it starts; this does the same on demand, in the store training
    would use (MLFLOW_TRACKING_URI or the project's mlflow.db): every RUNNING run of this host
    whose process no longer exists, and every run of another host whose heartbeat is older than
    NNBP_HEARTBEAT_TIMEOUT seconds (600), is closed as FAILED, with a tag saying why. Runs still
    training are left alone. One line per closed run."""
    result = close_orphan_runs()
    if result is None:
        click.echo(f"tracking is off ({OPT_OUT}=off): no store to look at")
        return
    uri, closed = result
    for orphan in closed:
        click.echo(orphan_note(orphan))
    if not closed:
        click.echo(f"{uri}: no orphaned run")


@click.command(cls=Tool)
@click.option("-r", "--remote", help="The DVC remote for the outputs [default: the default one].")
@click.argument("git_remote")
@click.argument("experiments", nargs=-1)
def share(remote: str | None, git_remote: str, experiments: tuple[str, ...]) -> None:
    """Push experiments (all of the current commit's when none is named) to GIT_REMOTE and
    their outputs to the DVC remote: `dvc exp push`, once the DVC remote has answered, so that
    refused credentials or a missing bucket stop it in one line before any ref is pushed."""
    label = team.share(git_remote, list(experiments), remote)
    click.echo(f"shared through git remote '{git_remote}' and {label}")


@click.command(cls=Tool)
@click.argument("git_remote")
@click.argument("experiment")
def apply(git_remote: str, experiment: str) -> None:
    """Pull EXPERIMENT from GIT_REMOTE with its outputs (from the DVC remote) and apply it to
    the workspace, only once every output has arrived; otherwise one line, and the workspace is
    left as it was."""
    team.apply(git_remote, experiment)
    click.echo(f"applied experiment {experiment}: its params, metrics and outputs are here")


@click.command(cls=Tool)
@click.option(
    "-S",
    "--set-param",
    "settings",
    multiple=True,
    metavar="[FILE:]KEY=VALUES",
    help="As `dvc exp run --queue -S`: KEY=V1,V2 sweeps; several -S make their product.",
)
@click.option(
    "--scheduler",
    envvar="DASK_SCHEDULER_ADDRESS",
    metavar="tcp://HOST:8786",
    help="The Dask scheduler [DASK_SCHEDULER_ADDRESS; default: a cluster on this machine].",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Task slots of the cluster on this machine (without --scheduler).",
)
@click.option(
    "--git-remote",
    default="origin",
    show_default=True,
    help="The team's git remote, which the workers clone and the experiments go to.",
)
@click.option("-r", "--remote", help="The DVC remote of the outputs [default: the default one].")
@click.option(
    "--sort-by",
    default="test_acc",
    show_default=True,
    metavar="[CONFIG.]METRIC",
    help="The table's order: METRIC's mean over the configurations, or CONFIG.METRIC.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=EXPERIMENT_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="An experiment still running after this is stopped (its run KILLED) and fails.",
)
def sweep(
    settings: tuple[str, ...],
    scheduler: str | None,
    jobs: int,
    git_remote: str,
    remote: str | None,
    sort_by: str,
    timeout: float,
) -> None:
    """Run a grid of DVC experiments on a Dask cluster: one task per experiment, each run in a
    clone of the git remote at this commit and shared there (dvc exp push), its runs in the
    team's MLflow server. Experiments already on the remote are not run again; a worker that
    dies costs only its task, which Dask runs elsewhere. Ends with a table of every experiment,
    best first, and exits 1 if any failed."""
    cluster.sweep(
        list(settings),
        scheduler=scheduler or None,
        jobs=jobs,
        git_remote=git_remote,
        dvc_remote=remote,
        sort_by=sort_by,
        timeout=timeout,
        echo=click.echo,
    )
