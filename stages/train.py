"""Stage `train@NAME`: train one configuration by full-batch backprop and log it to MLflow.

Writes the weights (``--model``, .npz: W1..WL plus the hyperparameters) and the history of every
log point (``--history``, JSON rows for ``dvc plots``). Options given twice keep the last value,
which is how a configuration in ``params.yaml`` overrides the top-level defaults; each option also
answers to its params.yaml key (``--log_every``), the form ``${item}`` gives it. The MLflow run
gets the data sets as inputs, the metrics of every log point, figures, the history, and the
MLflow Model built from the weights file (``nnbp.tracking``).
"""

import tempfile
from pathlib import Path

import click
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from nnbp import plots
from nnbp.backprop import DTYPES, GRADIENT_RULES, DivergenceError, LogPoint, fit, init_weights
from nnbp.cli import FiniteFloatRange, Stage, config_name, user_errors
from nnbp.data import file_md5, read_prepared
from nnbp.io import atomic_paths, save_npz, write_json
from nnbp.tracking import Run

EXAMPLES = 5  # test images in the MLflow Model's input example


@click.command(cls=Stage)
@click.option(
    "--name",
    required=True,
    callback=config_name,
    help="The configuration's name (a key of `configs`): a plain file name.",
)
@click.option(
    "--hidden",
    type=click.IntRange(min=1),
    multiple=True,
    help="Hidden layer sizes, one --hidden per layer (at least one).",
)
@click.option(
    "--tau", type=FiniteFloatRange(min=0, min_open=True), required=True, help="Learning rate."
)
@click.option("--lamb", type=FiniteFloatRange(min=0), required=True, help="L2 regularization.")
@click.option("--iters", type=click.IntRange(min=1), required=True)
@click.option(
    "--seed", type=click.IntRange(min=0), required=True, help="Seed of the initial weights."
)
@click.option("--gradient", type=click.Choice(GRADIENT_RULES), required=True)
@click.option("--dtype", type=click.Choice(DTYPES), required=True)
@click.option("--log-every", type=click.IntRange(min=1), required=True)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="BLAS threads (the weights' last bits depend on it).",
)
@click.option("--data", "data_path", required=True, help="The raw data file, for the record.")
@click.option("--prepared", type=click.Path(file_okay=False), required=True)
@click.option("--model", "model_path", type=click.Path(dir_okay=False), required=True)
@click.option("--history", "history_path", type=click.Path(dir_okay=False), required=True)
@user_errors
def main(
    name: str,
    hidden: tuple[int, ...],
    tau: float,
    lamb: float,
    iters: int,
    seed: int,
    gradient: str,
    dtype: str,
    log_every: int,
    threads: int,
    data_path: str,
    prepared: str,
    model_path: str,
    history_path: str,
) -> None:
    if not hidden:
        raise click.BadParameter(
            "no hidden layer size given: `hidden` must list at least one size >= 1, e.g. [25]",
            param_hint="'--hidden'",
        )
    if log_every > iters:
        raise click.BadParameter(
            f"{log_every} is more than iters ({iters}); allowed: 1..{iters}",
            param_hint="'--log-every'",
        )
    train, test = read_prepared(prepared)
    sizes = [train["X"].shape[0], *hidden, train["Y"].shape[0]]
    weights = init_weights(sizes, np.random.default_rng(seed))
    params = {
        "config": name,
        "sizes": "-".join(map(str, sizes)),
        "hidden": list(hidden),
        "tau": tau,
        "lamb": lamb,
        "iters": iters,
        "seed": seed,
        "gradient": gradient,
        "dtype": dtype,
        "log_every": log_every,
        "threads": threads,
        "data_path": data_path,
        "data_md5": file_md5(data_path),
        "n_train": train["X"].shape[1],
        "n_test": test["X"].shape[1],
    }
    run = Run.start(name, params)  # fails here, before training, if the store is unusable
    if run is not None:
        run.log_datasets(
            data_path,
            {split: (d["X"].T, d["y"]) for split, d in (("training", train), ("test", test))},
        )
    history: list[dict[str, float | None]] = []
    bar = tqdm(total=iters, desc=name, unit="it", disable=None, leave=False)  # terminals only

    def report(point: LogPoint) -> None:
        row = {
            "step": point.iteration,
            "loss": point.loss,
            "train_acc": point.train_acc,
            "test_acc": point.test_acc,
        }
        history.append(row)
        if run is not None:
            run.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        bar.update(point.iteration - bar.n)
        bar.set_postfix(loss=f"{point.loss:.4f}", acc=f"{point.train_acc:.1f}")

    status = "FAILED"
    try:
        with threadpool_limits(threads, user_api="blas"):
            weights = fit(
                train["X"],
                train["Y"],
                weights,
                tau=tau,
                lamb=lamb,
                iters=iters,
                gradient=gradient,
                dtype=dtype,
                log_every=log_every,
                X_test=test["X"],
                y_test=test["y"],
                callback=report,
            )
        bar.close()
        # The model and its history together, or neither.
        with atomic_paths(model_path, history_path) as (model_tmp, history_tmp):
            save_npz(
                model_tmp,
                **{f"W{i}": W for i, W in enumerate(weights, 1)},
                sizes=np.array(sizes),
                lamb=np.float64(lamb),
                tau=np.float64(tau),
                iters=np.int64(iters),
                gradient=np.str_(gradient),
                threads=np.int64(threads),  # the weights' last bits depend on it
            )
            write_json(history_tmp, history)
        status = "FINISHED"
        if run is not None:
            shape, example = train["image_shape"], test["X"][:, :EXAMPLES].T
            _log_results(run, name, weights, history, shape, model_path, history_path, example)
    except DivergenceError as e:
        raise click.ClickException(
            f"configuration {name} diverged: non-finite loss at iteration {e.iteration} "
            f"(tau={tau}, lamb={lamb}); nothing was written"
        ) from None
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        bar.close()
        if run is not None:
            run.end(status)

    last = history[-1]
    click.echo(
        f"{name}: loss {last['loss']:.4f}, train acc {last['train_acc']:.2f}%, "
        f"test acc {last['test_acc']:.2f}% after {iters} iterations"
    )


def _log_results(
    run: Run,
    name: str,
    weights: list[np.ndarray],
    history: list[dict],
    shape: np.ndarray,
    model_path: str,
    history_path: str,
    example: np.ndarray,
) -> None:
    # The last log point is the run's result: MLflow shows each metric's last value, and the
    # model is linked to the metrics of that step.
    run.log_model(name, model_path, example, step=int(history[-1]["step"]))
    columns = {k: [row[k] for row in history] for k in history[0]}
    with tempfile.TemporaryDirectory() as tmp:
        plots.save(plots.feature_grids({name: weights[0]}, tuple(shape)), f"{tmp}/features.png")
        plots.save(plots.curves({name: columns}), f"{tmp}/curves.png")
        for figure in ("features.png", "curves.png"):
            run.log_artifact(Path(tmp) / figure, "figures")
    run.log_artifact(history_path, "history")


if __name__ == "__main__":
    main()
