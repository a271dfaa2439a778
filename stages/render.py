"""Stage `render`: the PNG figures of the lab under ``--out-dir``.

``train_images.png`` and ``test_images.png`` (100 random images each, section 2),
``features.png`` (the first-layer features of every configuration side by side, section 7) and
``curves.png`` (loss and accuracies against iterations, every configuration on one chart); with
``--curves``, every history in one table too (JSON rows), for ``dvc plots``.
"""

from pathlib import Path

import click
import numpy as np

from nnbp import plots
from nnbp.cli import Stage, user_errors
from nnbp.data import load_dataset, read_history, read_models, read_prepared
from nnbp.io import atomic_paths, write_json


@click.command(cls=Stage)
@click.option("--data", "data_path", required=True, help="The raw data file (data.path).")
@click.option("--classes", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--n-train", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--split-seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--prepared", type=click.Path(file_okay=False), required=True)
@click.option("--models", "models_dir", type=click.Path(file_okay=False), required=True)
@click.option("--histories", "history_dir", type=click.Path(file_okay=False), required=True)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Picks the shown images.",
)
@click.option("--out-dir", type=click.Path(file_okay=False), required=True)
@click.option(
    "--curves",
    "curves_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write every history in one table (JSON rows), for `dvc plots`.",
)
@user_errors
def main(
    data_path: str,
    classes: int,
    n_train: int,
    split_seed: int,
    prepared: str,
    models_dir: str,
    history_dir: str,
    seed: int,
    out_dir: str,
    curves_path: str | None,
) -> None:
    ds = load_dataset(data_path, classes=classes, n_train=n_train, split_seed=split_seed)
    train, _ = read_prepared(prepared)
    shape = tuple(int(s) for s in train["image_shape"])
    models = read_models(models_dir, features=train["X"].shape[0], classes=classes)  # lab's order
    histories = {name: read_history(Path(history_dir) / f"{name}.json") for name in models}

    rng = np.random.default_rng(seed)
    figures = {}
    for split, X in (("train", ds.X_train), ("test", ds.X_test)):
        shown = rng.choice(X.shape[1], size=min(100, X.shape[1]), replace=False)
        figures[f"{split}_images.png"] = plots.image_grid(
            X[:, shown], shape, f"{split.capitalize()} data"
        )
    figures["features.png"] = plots.feature_grids({n: models[n][0][0] for n in models}, shape)
    figures["curves.png"] = plots.curves(histories)
    paths = [Path(out_dir) / filename for filename in figures]
    if curves_path is not None:
        paths.append(Path(curves_path))
    with atomic_paths(*paths) as tmps:  # all or none
        for tmp, fig in zip(tmps, figures.values(), strict=False):
            plots.save(fig, tmp)
        if curves_path is not None:
            write_json(tmps[-1], plots.curve_rows(histories))
    click.echo(f"{out_dir}: {', '.join(figures)}" + (f"; {curves_path}" if curves_path else ""))


if __name__ == "__main__":
    main()
