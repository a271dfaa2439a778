"""Stage `data`: write the embedded default data set in the lab's layout.

scikit-learn ships 1,797 real 8x8 handwritten digits. They are written as the lab's
``nn_train_test_sets.npz`` is laid out: ``X_*`` features x examples with each image flattened
column-major (as the lab's ``display_data`` expects), ``y_*`` of shape (n, 1) in 1..10 where 10
stands for the digit 0, split into ``--n-train`` training examples and the rest for testing.
"""

import click
import numpy as np
from sklearn.datasets import load_digits

from nnbp.cli import Stage, user_errors
from nnbp.data import split
from nnbp.io import save_npz


@click.command(cls=Stage)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The .npz to write.")
@click.option("--n-train", type=click.IntRange(1, 1796), default=1000, show_default=True)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the split."
)
@user_errors
def main(out: str, n_train: int, seed: int) -> None:
    digits = load_digits()
    X = digits.images.transpose(0, 2, 1).reshape(len(digits.images), -1).T  # column-major
    y = np.where(digits.target == 0, 10, digits.target).astype(np.int64)[:, None]
    train, test = split(X.shape[1], n_train, seed)
    save_npz(out, X_train=X[:, train], y_train=y[train], X_test=X[:, test], y_test=y[test])
    click.echo(f"{out}: {len(train)} training and {len(test)} test images of 8x8 pixels")


if __name__ == "__main__":
    main()
