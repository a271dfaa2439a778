"""Stage `register`: opt-in, make the best configuration's MLflow Model the registered champion.

With ``mlflow.register: true`` (``dvc exp run -S mlflow.register=true``), the configuration with
the best test accuracy in ``--metrics`` is registered as a version of ``mlflow.model_name`` and
the alias ``champion`` points at it: ``mlflow.pyfunc.load_model("models:/NAME@champion")``. The
model is the one its training run logged from exactly the weights in ``--models``
(``nnbp.tooling.tracking.registry``). Otherwise it only says what it would register.
"""

from pathlib import Path

import click

from nnbp import config
from nnbp.artifacts import load_metrics
from nnbp.tooling.cli import Stage, path_option
from nnbp.tooling.tracking.registry import champion, register

ALIAS = "champion"


@click.command(cls=Stage)
@path_option("--metrics", "reports/metrics.json", dest="metrics_path")
@path_option("--models", "models", folder=True, dest="models_dir")
def main(metrics_path: str, models_dir: str) -> None:
    registry = config.Registry.read(config.read("register"))
    metrics = load_metrics(metrics_path)
    best = champion(metrics)
    score = f"{best} (test acc {metrics[best]['test_acc']:.2f}%)"
    if not registry.enabled:
        click.echo(
            f"best configuration: {score}; not registered (mlflow.register is false; "
            "`dvc exp run -S mlflow.register=true` registers it)"
        )
        return
    weights = Path(models_dir) / f"{best}.npz"
    click.echo(f"best configuration: {score}; {register(weights, registry.model_name, ALIAS)}")


if __name__ == "__main__":
    main()
