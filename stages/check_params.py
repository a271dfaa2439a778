"""Run first by every command of dvc.yaml: refuse a parameter that cannot reach a shell safely.

DVC pastes parameters into the command lines of dvc.yaml and runs them through a shell; this
check (``nnbp.params.check``) reads dvc.yaml and params.yaml and refuses, in one line naming the
parameter, any value that could be read as shell code, before the stage's own command runs. It
writes nothing and takes no part in any result, so it is not a stage of its own: running it in
every command also covers `dvc repro -s` and `--downstream`, which skip upstream stages.
"""

from pathlib import Path

import click

from nnbp.cli import Stage, user_errors
from nnbp.params import check


@click.command(cls=Stage)
@click.option(
    "--dvcfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default="dvc.yaml",
    show_default=True,
)
@click.option(
    "--params",
    "params_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default="params.yaml",
    show_default=True,
)
@user_errors
def main(dvcfile: Path, params_file: Path) -> None:
    check(dvcfile, params_file)


if __name__ == "__main__":
    main()
