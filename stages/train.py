"""Stage `train@NAME`: train configuration NAME by full-batch backprop and log it to MLflow.

NAME comes from DVC (``DVC_STAGE=train@NAME``) or, run by hand, from the command line; its
values are the training defaults of params.yaml with ``configs.NAME``'s pins applied. Writes
``MODELS/NAME.npz`` and ``HISTORIES/NAME.json`` (every log point), both or neither. The MLflow
run also gets the model, its history and its own figures (features and curves).
"""

from pathlib import Path

import click

from nnbp import config
from nnbp.artifacts import History, LogPoint, Prepared, save_trained
from nnbp.tooling.cli import Progress, Stage, path_option, stop_point
from nnbp.tooling.tracking.run import Run, training_params
from nnbp.training import train

EXAMPLES = 5  # test images in the MLflow Model's input example


@click.command(cls=Stage)
@click.argument("name", required=False)
@path_option("--prepared", "data/prepared", folder=True)
@path_option("--models", "models", folder=True)
@path_option("--histories", "reports/history", folder=True)
def main(name: str | None, prepared: str, models: str, histories: str) -> None:
    name = name or config.configuration_of_stage()
    if name is None:
        raise click.UsageError("which configuration? give its NAME (a key of configs)")
    params = config.read(f"train@{name}")
    training = config.Training.read(params, name)
    data_path = config.Data.read(params).path
    threads = config.Runtime.read(params).threads
    data = Prepared.load(prepared)
    model_path, history_path = Path(models) / f"{name}.npz", Path(histories) / f"{name}.json"
    points: list[LogPoint] = []
    # The run is opened, or the store refused, before any training. A signal stops the stage
    # at its next iteration or wait for the store (stop_point), never inside either.
    params = training_params(training, threads, data_path, data)
    with Run.start(name, params, stop_check=stop_point) as run:
        run.log_datasets(data_path, data)
        with run.system_metrics(), Progress(training.iters, name) as bar:

            def on_point(point: LogPoint) -> None:
                points.append(point)
                run.log_point(point)
                bar.show(point)

            model = train(training, data, on_point, threads, stop_check=stop_point)
        history = History(tuple(points))
        save_trained(model, history, model_path, history_path)
        run.log_model(model_path, data.X_test[:, :EXAMPLES].T, step=points[-1].iteration)
        run.log_artifact(history_path, "history")
        if run.enabled:  # the run's own figures: its features and curves (matplotlib: slow)
            from nnbp import figures

            for file, figure in figures.run_figures(name, model, history, data.image_shape).items():
                run.log_figure(figure, f"figures/{file}")
    last = points[-1].scores
    click.echo(
        f"{name}: loss {last.loss:.4f}, train acc {last.train_acc:.2f}%, "
        f"test acc {last.test_acc:.2f}% after {training.iters} iterations"
    )


if __name__ == "__main__":
    main()
