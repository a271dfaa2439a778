"""The lab's published results (TP 5, the final log line of each of its three runs).

They hold for the lab's own problem only: 400 input pixels, 1,000 training and 4,000 test
examples, 10 classes, tau 0.2, 5,000 iterations, and the configuration's hidden size and lamb.
A configuration that differs in any of these has no published counterpart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    """One of the lab's runs: what it trained, and what its last log line printed."""

    title: str
    sizes: tuple[int, ...]
    lamb: float
    train_acc: float
    test_acc: float
    loss: float


# The lab's loop logs every 500 iterations, so its last line repeats iteration 4,500's values.
PUBLISHED = (
    Published("25 hidden units", (400, 25, 10), 0.0, 94.5, 83.0, 0.45070168537842387),
    Published("100 hidden units", (400, 100, 10), 0.0, 98.9, 86.725, 0.20045271104588352),
    Published("100 hidden, lamb 0.005", (400, 100, 10), 0.005, 95.8, 88.475, 1.5716333351535627),
)
TAU, ITERS, N_TRAIN, N_TEST = 0.2, 5000, 1000, 4000


def published_for(
    sizes: Sequence[int], lamb: float, tau: float, iters: int, n_train: int, n_test: int
) -> Published | None:
    """The lab's run of this very configuration on this very problem, if the lab made one."""
    if (tau, iters, n_train, n_test) != (TAU, ITERS, N_TRAIN, N_TEST):
        return None
    for run in PUBLISHED:
        if run.sizes == tuple(sizes) and run.lamb == lamb:
            return run
    return None


def comparison_table(rows: Mapping[str, tuple[Published | None, str, Mapping[str, float]]]) -> str:
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
