"""Stage `prepare`: validate the data file, z-score it, one-hot the labels (sections 3, 4.2).

Writes ``train.npz`` (X (d, n) z-scored, Y (K, n) one-hot, y (n,) in 0..K-1, image_shape) and
``test.npz`` (X (d, m), y (m,)) under ``--out-dir``.
"""

import click
import numpy as np

from nnbp.backprop import ZSCORE_MODES, one_hot
from nnbp.cli import Stage, user_errors
from nnbp.data import image_shape, load_dataset, standardise
from nnbp.io import atomic_paths, save_npz


@click.command(cls=Stage)
@click.option("--data", "path", required=True, help="The data file (.npz or .mat): data.path.")
@click.option("--classes", type=click.IntRange(min=2), default=10, show_default=True)
@click.option(
    "--n-train",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Training examples taken from a .mat file (an .npz is split already).",
)
@click.option("--split-seed", type=click.IntRange(min=0), default=0, show_default=True)
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
    X_train, X_test = standardise(ds, mode, source=path)
    y_train, y_test = ds.y_train - 1, ds.y_test - 1  # 1..K in files, 0..K-1 inside
    # Both files or neither: a train.npz beside a stale test.npz would mislead every later stage.
    with atomic_paths(f"{out_dir}/train.npz", f"{out_dir}/test.npz") as (train_tmp, test_tmp):
        save_npz(
            train_tmp,
            X=X_train,
            Y=one_hot(y_train, classes),
            y=y_train,
            image_shape=np.array(shape),
        )
        save_npz(test_tmp, X=X_test, y=y_test)
    click.echo(
        f"{path}: {X_train.shape[1]} training and {X_test.shape[1]} test examples, "
        f"{X_train.shape[0]} features ({shape[0]}x{shape[1]} images), {classes} classes"
    )


if __name__ == "__main__":
    main()
