"""The results tables of ``reports/results.md``: this run's, then this run beside the lab's
published results (``nnbp.lab``). A column per metric (``artifacts.REPORTED``)."""

from __future__ import annotations

from collections.abc import Mapping

from .artifacts import METRICS, REPORTED, TrainedModel
from .lab import Published, published_for

Scores = Mapping[str, float]  # a configuration's metrics, as metrics.json holds them


def _title(metric: str) -> str:
    return metric.replace("_", " ")


def _shown(metric: str, value: float, sign: str = "") -> str:
    return f"{value:{sign}.{METRICS[metric]['shown']}f}"


def run_table(models: Mapping[str, TrainedModel], metrics: Mapping[str, Scores]) -> str:
    """Markdown: each configuration's layers, lamb and metrics."""
    titles = [_title(m) + (" (%)" if METRICS[m]["better"] == "higher" else "") for m in REPORTED]
    lines = [
        f"| configuration | layers | lamb | {' | '.join(titles)} |",
        "|---|---|---:|" + "---:|" * len(REPORTED),
    ]
    for name, model in models.items():
        cells = [_shown(m, metrics[name][m]) for m in REPORTED]
        layers = "-".join(map(str, model.sizes))
        lines.append(f"| {name} | {layers} | {model.hyper['lamb']:g} | {' | '.join(cells)} |")
    return "\n".join(lines)


def comparison_table(rows: Mapping[str, tuple[Published | None, str, Scores]]) -> str:
    """Markdown: each configuration's metrics beside the lab's published ones, with the change.

    ``rows`` maps a configuration to (its published run or None, its update rule, its metrics).
    A configuration the lab did not run shows dashes.
    """
    titles = [f"{_title(m)}: lab / ours / change" for m in REPORTED]
    lines = [
        f"| configuration | lab's run | rule | {' | '.join(titles)} |",
        "|---|---|---|" + "---:|" * len(REPORTED),
    ]
    for name, (run, rule, m) in rows.items():
        cells = []
        for key in REPORTED:
            ours = _shown(key, m[key])
            if run is None:
                cells.append(f"- / {ours} / -")
            else:
                lab = getattr(run, key)
                cells.append(f"{_shown(key, lab)} / {ours} / {_shown(key, m[key] - lab, '+')}")
        title = run.title if run else "none (not one of the lab's runs)"
        lines.append(f"| {name} | {title} | {rule} | {' | '.join(cells)} |")
    return "\n".join(lines)


def results(
    models: Mapping[str, TrainedModel], metrics: Mapping[str, Scores], n_train: int, n_test: int
) -> str:
    """``reports/results.md``: this run's table, then the comparison with the lab's runs of the
    same configurations on the same problem (``n_train`` / ``n_test`` examples)."""
    against_lab = {}
    for name, model in models.items():
        h = model.hyper
        published = published_for(model.sizes, h["lamb"], h["tau"], h["iters"], n_train, n_test)
        against_lab[name] = (published, h["gradient"], metrics[name])
    return (
        "## This run\n\n" + run_table(models, metrics) + "\n\n"
        "## Beside the lab's published results (its last log lines)\n\n"
        + comparison_table(against_lab)
        + "\n"
    )
