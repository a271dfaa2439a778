"""Stage `prepare`: validate the data file (``data.path``), z-score it, one-hot the labels
(sections 3, 4.2); writes ``train.npz`` and ``test.npz`` (``nnbp.artifacts.Prepared``)."""

import click

from nnbp import config
from nnbp.artifacts import Prepared
from nnbp.labdata import image_shape, load_dataset, one_hot, standardise
from nnbp.tooling.cli import Stage, path_option


@click.command(cls=Stage)
@path_option("--out", "data/prepared", folder=True)
def main(out: str) -> None:
    data = config.Data.read(config.read("prepare"))
    ds = load_dataset(
        data.path, classes=data.classes, n_train=data.n_train, split_seed=data.split_seed
    )
    shape = image_shape(ds.X_train.shape[0], data.shape, source=data.path)
    X_train, X_test = standardise(ds, data.zscore, source=data.path)
    y_train, y_test = ds.y_train - 1, ds.y_test - 1  # 1..K in files, 0..K-1 inside
    Prepared(X_train, one_hot(y_train, data.classes), y_train, X_test, y_test, shape).save(out)
    click.echo(
        f"{data.path}: {X_train.shape[1]} training and {X_test.shape[1]} test examples, "
        f"{X_train.shape[0]} features ({shape[0]}x{shape[1]} images), {data.classes} classes"
    )


if __name__ == "__main__":
    main()
