"""Stage `register`: opt-in, make the best configuration's MLflow Model the registered champion.

With ``--register true`` (``dvc exp run -S mlflow.register=true``), the configuration with the
best test accuracy in ``--metrics`` is registered as a version of ``--model-name`` and the alias
``champion`` points at it: ``mlflow.pyfunc.load_model("models:/NAME@champion")``. The model is
the one its training run logged from exactly the weights in ``--models`` (``nnbp.registry``).
With ``--register false`` (the default) it only says what it would register.
"""

import json
from pathlib import Path

import click

from nnbp.cli import Stage, user_errors
from nnbp.data import DataError
from nnbp.registry import champion, register

ALIAS = "champion"


@click.command(cls=Stage)
@click.option("--register", "enabled", type=bool, required=True, help="mlflow.register")
@click.option("--model-name", required=True, help="The registered model's name.")
@click.option("--metrics", "metrics_path", type=click.Path(dir_okay=False), required=True)
@click.option("--models", "models_dir", type=click.Path(file_okay=False), required=True)
@user_errors
def main(enabled: bool, model_name: str, metrics_path: str, models_dir: str) -> None:
    try:
        metrics = json.loads(Path(metrics_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{metrics_path}: not readable metrics ({e})") from None
    best = champion(metrics)
    weights = Path(models_dir) / f"{best}.npz"
    score = f"{best} (test acc {metrics[best]['test_acc']:.2f}%)"
    if not enabled:
        click.echo(
            f"best configuration: {score}; not registered (mlflow.register is false; "
            "`dvc exp run -S mlflow.register=true` registers it)"
        )
        return
    click.echo(f"best configuration: {score}; {register(weights, model_name, ALIAS)}")


if __name__ == "__main__":
    main()
