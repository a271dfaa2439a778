"""Stage `data`: write an embedded data set (``nnbp.datasets``) as the lab's data file.

``data.source: mnist`` (the default, the lab's problem) gives 5,000 real MNIST digits at 20x20
pixels; ``digits`` scikit-learn's 1,797 8x8 digits. The file is laid out as the lab's
``nn_train_test_sets.npz``: ``X_*`` features x examples, each image flattened column-major,
``y_*`` of shape (n, 1) in 1..10 where 10 stands for the digit 0, split into ``data.n_train``
training examples and the rest for testing (shuffled with ``data.split_seed``).
"""

import click

from nnbp import config, datasets
from nnbp.files import save_npz
from nnbp.tooling.cli import Stage, path_option


@click.command(cls=Stage)
@path_option("--out", "data/digits.npz")
def main(out: str) -> None:
    data = config.Data.read(config.read("data"))
    arrays = datasets.load(data.source, data.n_train, data.split_seed)
    save_npz(out, **arrays)
    side = datasets.SIDE[data.source]
    click.echo(
        f"{out}: {arrays['X_train'].shape[1]} training and {arrays['X_test'].shape[1]} test "
        f"images of {side}x{side} pixels ({data.source})"
    )


if __name__ == "__main__":
    main()
