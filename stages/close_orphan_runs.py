"""Close the MLflow runs left RUNNING by a training process that is gone.

    python stages/close_orphan_runs.py

A run whose process was killed (``kill -9``, out of memory) or that could not be closed because
the store was unreachable at the time stays RUNNING. Every training run closes such orphans
when it starts; this does the same on demand, in the store training would use
(``MLFLOW_TRACKING_URI`` or the project's ``mlflow.db``): every RUNNING run of this host whose
process no longer exists is closed as FAILED, with a tag saying why. Runs of other hosts, and of
processes still running, are left alone. One line per closed run.
"""

import click

from nnbp.cli import Stage, user_errors
from nnbp.tracking import OPT_OUT, close_orphan_runs, orphan_note


@click.command(cls=Stage)
@user_errors
def main() -> None:
    result = close_orphan_runs()
    if result is None:
        click.echo(f"tracking is off ({OPT_OUT}=off): no store to look at")
        return
    uri, closed = result
    for orphan in closed:
        click.echo(orphan_note(orphan))
    if not closed:
        click.echo(f"{uri}: no orphaned run")


if __name__ == "__main__":
    main()
