"""Stage `data`: write an embedded data set (``nnbp.datasets``) as the lab's data file.

``--source mnist`` (the default, the lab's problem) gives 5,000 real MNIST digits at 20x20 pixels;
``--source digits`` scikit-learn's 1,797 8x8 digits. The file is laid out as the lab's
``nn_train_test_sets.npz``: ``X_*`` features x examples, each image flattened column-major,
``y_*`` of shape (n, 1) in 1..10 where 10 stands for the digit 0, split into ``--n-train``
training examples and the rest for testing.
"""

import click

from nnbp import datasets
from nnbp.cli import Stage, user_errors
from nnbp.io import save_npz


@click.command(cls=Stage)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The .npz to write.")
@click.option("--source", type=click.Choice(datasets.SOURCES), default="mnist", show_default=True)
@click.option("--n-train", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the split."
)
@user_errors
def main(out: str, source: str, n_train: int, seed: int) -> None:
    size = datasets.SIZE[source]
    if n_train >= size:
        raise click.BadParameter(
            f"{n_train} leaves no test example: {source} has {size} images; allowed: 1..{size - 1}",
            param_hint="'--n-train'",
        )
    arrays = datasets.load(source, n_train, seed)
    save_npz(out, **arrays)
    side = datasets.SIDE[source]
    click.echo(
        f"{out}: {arrays['X_train'].shape[1]} training and {arrays['X_test'].shape[1]} test "
        f"images of {side}x{side} pixels ({source})"
    )


if __name__ == "__main__":
    main()
