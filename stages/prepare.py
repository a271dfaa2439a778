"""Stage `prepare`: validate the data file, z-score it, one-hot the labels (sections 3, 4.2).

Writes ``train.npz`` (X (d, n) z-scored, Y (K, n) one-hot, y (n,) in 0..K-1, image_shape) and
``test.npz`` (X (d, m), y (m,)) under ``--out-dir``.
"""

import click
import numpy as np

from nnbp.backprop import ZSCORE_MODES, one_hot, zscore
from nnbp.cli import user_errors
from nnbp.data import image_shape, load_dataset
from nnbp.io import save_npz


@click.command()
@click.option("--data", "path", required=True, help="The data file (.npz or .mat): data.path.")
@click.option("--classes", type=click.IntRange(min=2), default=10, show_default=True)
@click.option(
    "--n-train",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Training examples taken from a .mat file (an .npz is split already).",
)
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option(
    "--zscore", "mode", type=click.Choice(ZSCORE_MODES), default="per_example", show_default=True
)
@click.option(
    "--image-shape", "shape_spec", default="auto", show_default=True, help="'auto' (square) or HxW."
)
@click.option("--out-dir", type=click.Path(file_okay=False), required=True)
@user_errors
def main(
    path: str,
    classes: int,
    n_train: int,
    split_seed: int,
    mode: str,
    shape_spec: str,
    out_dir: str,
) -> None:
    ds = load_dataset(path, classes=classes, n_train=n_train, split_seed=split_seed)
    shape = image_shape(ds.X_train.shape[0], shape_spec, source=path)
    X_train = zscore(ds.X_train, mode)
    X_test = zscore(ds.X_test, mode, reference=ds.X_train)
    y_train, y_test = ds.y_train - 1, ds.y_test - 1  # 1..K in files, 0..K-1 inside
    save_npz(f"{out_dir}/test.npz", X=X_test, y=y_test)
    save_npz(
        f"{out_dir}/train.npz",
        X=X_train,
        Y=one_hot(y_train, classes),
        y=y_train,
        image_shape=np.array(shape),
    )
    click.echo(
        f"{path}: {X_train.shape[1]} training and {X_test.shape[1]} test examples, "
        f"{X_train.shape[0]} features ({shape[0]}x{shape[1]} images), {classes} classes"
    )


if __name__ == "__main__":
    main()
