"""The results tables of ``reports/results.md``: this run's, then this run beside the lab's
published results (``nnbp.lab``)."""

from __future__ import annotations

from collections.abc import Mapping

from .artifacts import TrainedModel
from .lab import Published, published_for

Scores = Mapping[str, float]  # train_acc, test_acc, loss


def run_table(models: Mapping[str, TrainedModel], metrics: Mapping[str, Scores]) -> str:
    """Markdown: each configuration's layers, lamb and metrics."""
    lines = [
        "| configuration | layers | lamb | train acc (%) | test acc (%) | loss |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, model in models.items():
        m = metrics[name]
        layers = "-".join(map(str, model.sizes))
        lines.append(
            f"| {name} | {layers} | {model.lamb:g} | {m['train_acc']:.2f} | "
            f"{m['test_acc']:.2f} | {m['loss']:.4f} |"
        )
    return "\n".join(lines)


def comparison_table(rows: Mapping[str, tuple[Published | None, str, Scores]]) -> str:
    """Markdown: each configuration's metrics beside the lab's published ones, with the change.

    ``rows`` maps a configuration to (its published run or None, its update rule, its metrics
    ``train_acc``, ``test_acc`` and ``loss``). A configuration the lab did not run shows dashes.
    """
    head = (
        "| configuration | lab's run | rule | train acc: lab / ours / change "
        "| test acc: lab / ours / change | loss: lab / ours / change |"
    )
    lines = [head, "|---|---|---|---:|---:|---:|"]
    for name, (run, rule, m) in rows.items():
        cells = []
        for key, fmt in (("train_acc", "{:.2f}"), ("test_acc", "{:.2f}"), ("loss", "{:.4f}")):
            ours = fmt.format(m[key])
            if run is None:
                cells.append(f"- / {ours} / -")
            else:
                lab = getattr(run, key)
                change = fmt.replace(":", ":+").format(m[key] - lab)
                cells.append(f"{fmt.format(lab)} / {ours} / {change}")
        title = run.title if run else "none (not one of the lab's runs)"
        lines.append(f"| {name} | {title} | {rule} | {' | '.join(cells)} |")
    return "\n".join(lines)


def results(
    models: Mapping[str, TrainedModel], metrics: Mapping[str, Scores], n_train: int, n_test: int
) -> str:
    """``reports/results.md``: this run's table, then the comparison with the lab's runs of the
    same configurations on the same problem (``n_train`` / ``n_test`` examples)."""
    against_lab = {
        name: (
            published_for(model.sizes, model.lamb, model.tau, model.iters, n_train, n_test),
            model.gradient,
            metrics[name],
        )
        for name, model in models.items()
    }
    return (
        "## This run\n\n" + run_table(models, metrics) + "\n\n"
        "## Beside the lab's published results (its last log lines)\n\n"
        + comparison_table(against_lab)
        + "\n"
    )
