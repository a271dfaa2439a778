"""Stage `evaluate`: accuracies, loss and confusion matrix of every trained configuration.

``--metrics`` (DVC metrics) maps each configuration to ``train_acc``, ``test_acc`` (percent) and
``loss`` (the lab's training cost, regularization included); ``--table`` is the results table,
then this run beside the lab's published results (``nnbp.reports``); ``--confusion`` holds each
test confusion matrix (rows: true class 1..K). All three, or none.
"""

import click

from nnbp import config, reports
from nnbp.artifacts import Prepared, load_models
from nnbp.evaluation import evaluate
from nnbp.files import atomic_paths, write_json, write_text
from nnbp.parallel import Pool, thread_count
from nnbp.tooling.cli import Stage, path_option


@click.command(cls=Stage)
@path_option("--prepared", "data/prepared", folder=True)
@path_option("--models", "models", folder=True, dest="models_dir")
@path_option("--metrics", "reports/metrics.json", dest="metrics_path")
@path_option("--table", "reports/results.md", dest="table_path")
@path_option("--confusion", "reports/confusion.json", dest="confusion_path")
def main(
    prepared: str, models_dir: str, metrics_path: str, table_path: str, confusion_path: str
) -> None:
    threads = config.Runtime.read(config.read("evaluate")).threads
    data = Prepared.load(prepared)
    models = load_models(models_dir, features=data.features, classes=data.classes)
    most = max(model.hyper["blocks"] for model in models.values())
    with Pool(thread_count(threads, most)) as pool:
        results = {name: evaluate(model, data, pool.map) for name, model in models.items()}
    metrics = {name: result.scores.metrics() for name, result in results.items()}
    for name, r in results.items():
        s = r.scores
        click.echo(f"{name}: train {s.train_acc:.2f}%, test {s.test_acc:.2f}%, loss {s.loss:.4f}")
    n_train, n_test = data.X_train.shape[1], data.X_test.shape[1]
    with atomic_paths(confusion_path, table_path, metrics_path) as (confusion, table, metrics_tmp):
        write_json(confusion, {name: r.confusion.tolist() for name, r in results.items()})
        write_text(table, reports.results(models, metrics, n_train, n_test))
        write_json(metrics_tmp, metrics)


if __name__ == "__main__":
    main()
