"""Stage `evaluate`: accuracies, loss and confusion matrix of every trained configuration.

``--metrics`` (DVC metrics) maps each configuration to ``train_acc``, ``test_acc`` (percent) and
``loss`` (the lab's training cost, regularization included); ``--table`` is the results table,
then this run beside the lab's published results (``nnbp.reports``); ``--confusion`` holds each
test confusion matrix (rows: true class 1..K). All three, or none.
"""

import click

from nnbp import config, reports
from nnbp.artifacts import Prepared, load_models
from nnbp.cli import Stage, user_errors
from nnbp.evaluation import evaluate
from nnbp.files import atomic_paths, write_json, write_text

FILE = click.Path(dir_okay=False)


@click.command(cls=Stage)
@click.option(
    "--prepared", type=click.Path(file_okay=False), default="data/prepared", show_default=True
)
@click.option(
    "--models", "models_dir", type=click.Path(file_okay=False), default="models", show_default=True
)
@click.option(
    "--metrics", "metrics_path", type=FILE, default="reports/metrics.json", show_default=True
)
@click.option("--table", "table_path", type=FILE, default="reports/results.md", show_default=True)
@click.option(
    "--confusion", "confusion_path", type=FILE, default="reports/confusion.json", show_default=True
)
@user_errors
def main(
    prepared: str, models_dir: str, metrics_path: str, table_path: str, confusion_path: str
) -> None:
    threads = config.Evaluation.read(config.read("evaluate")).threads
    data = Prepared.load(prepared)
    models = load_models(models_dir, features=data.features, classes=data.classes)
    results = {name: evaluate(model, data, threads) for name, model in models.items()}
    metrics = {name: result.metrics for name, result in results.items()}
    for name, m in metrics.items():
        click.echo(
            f"{name}: train {m['train_acc']:.2f}%, test {m['test_acc']:.2f}%, loss {m['loss']:.4f}"
        )
    n_train, n_test = data.X_train.shape[1], data.X_test.shape[1]
    with atomic_paths(confusion_path, table_path, metrics_path) as (confusion, table, metrics_tmp):
        write_json(confusion, {name: r.confusion.tolist() for name, r in results.items()})
        write_text(table, reports.results(models, metrics, n_train, n_test))
        write_json(metrics_tmp, metrics)


if __name__ == "__main__":
    main()
