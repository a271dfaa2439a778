"""Stage `evaluate`: accuracies, loss and confusion matrix of every trained configuration.

``--metrics`` (JSON, DVC metrics) maps each configuration to ``train_acc``, ``test_acc`` (percent)
and ``loss`` (the lab's training cost, regularization included); ``--table`` is the results table in
Markdown, followed by this run beside the lab's published results (``nnbp.lab``);
``--confusion`` holds each test confusion matrix (rows: true class 1..K).
"""

import click
import numpy as np
from threadpoolctl import threadpool_limits

from nnbp.backprop import accuracy, loss, predict
from nnbp.cli import Stage, user_errors
from nnbp.data import read_models, read_prepared
from nnbp.io import atomic_paths, write_json, write_text
from nnbp.lab import comparison_table, published_for


@click.command(cls=Stage)
@click.option("--prepared", type=click.Path(file_okay=False), required=True)
@click.option("--models", "models_dir", type=click.Path(file_okay=False), required=True)
@click.option("--metrics", "metrics_path", type=click.Path(dir_okay=False), required=True)
@click.option("--table", "table_path", type=click.Path(dir_okay=False), required=True)
@click.option("--confusion", "confusion_path", type=click.Path(dir_okay=False), required=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@user_errors
def main(
    prepared: str,
    models_dir: str,
    metrics_path: str,
    table_path: str,
    confusion_path: str,
    threads: int,
) -> None:
    with threadpool_limits(threads, user_api="blas"):  # the same products as training: same bits
        _evaluate(prepared, models_dir, metrics_path, table_path, confusion_path)


def _evaluate(
    prepared: str, models_dir: str, metrics_path: str, table_path: str, confusion_path: str
) -> None:
    train, test = read_prepared(prepared)
    K = train["Y"].shape[0]
    models = read_models(models_dir, features=train["X"].shape[0], classes=K)  # lab's order

    n_train, n_test = train["X"].shape[1], test["X"].shape[1]
    metrics, confusion, against_lab = {}, {}, {}
    rows = [
        "| configuration | layers | lamb | train acc (%) | test acc (%) | loss |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in models:
        weights, meta = models[name]
        lamb = float(meta["lamb"])
        y_pred = predict(weights, test["X"])
        m = {
            "train_acc": round(accuracy(predict(weights, train["X"]), train["y"]), 4),
            "test_acc": round(accuracy(y_pred, test["y"]), 4),
            "loss": round(loss(weights, train["X"], train["Y"], lamb), 6),
        }
        metrics[name] = m
        matrix = np.zeros((K, K), dtype=np.int64)
        np.add.at(matrix, (test["y"], y_pred), 1)
        confusion[name] = matrix.tolist()
        sizes = [int(s) for s in meta["sizes"]]
        tau, iters = float(meta.get("tau", "nan")), int(meta.get("iters", -1))
        run = published_for(sizes, lamb, tau, iters, n_train, n_test)
        against_lab[name] = (run, str(meta.get("gradient", "?")), m)
        layers = "-".join(map(str, sizes))
        rows.append(
            f"| {name} | {layers} | {lamb:g} | {m['train_acc']:.2f} | "
            f"{m['test_acc']:.2f} | {m['loss']:.4f} |"
        )
        click.echo(
            f"{name}: train {m['train_acc']:.2f}%, test {m['test_acc']:.2f}%, loss {m['loss']:.4f}"
        )
    paths = (confusion_path, table_path, metrics_path)
    with atomic_paths(*paths) as (confusion_tmp, table_tmp, metrics_tmp):  # all three or none
        write_json(confusion_tmp, confusion)
        write_text(
            table_tmp,
            "## This run\n\n" + "\n".join(rows) + "\n\n"
            "## Beside the lab's published results (its last log lines)\n\n"
            + comparison_table(against_lab)
            + "\n",
        )
        write_json(metrics_tmp, metrics)


if __name__ == "__main__":
    main()
