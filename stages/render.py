"""Stage `render`: the lab's PNG figures under ``--out-dir`` (``nnbp.figures.lab_figures``:
100 training and 100 test images, every configuration's first-layer features, the curves), and
every history in one table for ``dvc plots`` (``--curves``). All, or none."""

from pathlib import Path

import click

from nnbp import config, figures, plots
from nnbp.artifacts import History, Prepared, load_models
from nnbp.files import atomic_paths, write_json
from nnbp.labdata import load_dataset
from nnbp.tooling.cli import Stage, path_option


@click.command(cls=Stage)
@path_option("--prepared", "data/prepared", folder=True)
@path_option("--models", "models", folder=True, dest="models_dir")
@path_option("--histories", "reports/history", folder=True, dest="history_dir")
@path_option("--out-dir", "reports/figures", folder=True)
@path_option("--curves", "reports/curves.json", dest="curves_path")
def main(prepared: str, models_dir: str, history_dir: str, out_dir: str, curves_path: str) -> None:
    params = config.read("render")
    data, seed = config.Data.read(params), config.Render.read(params).seed
    ds = load_dataset(
        data.path, classes=data.classes, n_train=data.n_train, split_seed=data.split_seed
    )
    train = Prepared.load(prepared)
    models = load_models(models_dir, features=train.features, classes=data.classes)
    histories = {name: History.load(Path(history_dir) / f"{name}.json") for name in models}
    drawn = figures.lab_figures(ds, train.image_shape, models, histories, seed)
    paths = [*(Path(out_dir) / filename for filename in drawn), Path(curves_path)]
    with atomic_paths(*paths) as tmps:
        for tmp, figure in zip(tmps, drawn.values(), strict=False):
            figures.save(figure, tmp)
        write_json(tmps[-1], plots.curve_rows(histories))
    click.echo(f"{out_dir}: {', '.join(drawn)}; {curves_path}")


if __name__ == "__main__":
    main()
