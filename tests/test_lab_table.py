"""The lab's published results, set beside this run's by the evaluate stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nnbp.artifacts import Prepared, TrainedModel
from nnbp.backprop import init_weights
from nnbp.lab import PUBLISHED, published_for
from nnbp.labdata import one_hot
from nnbp.reports import comparison_table
from tests.project import project_files, run_stage

LAB_PROBLEM = dict(tau=0.2, iters=5000, n_train=1000, n_test=4000)


def test_each_of_the_labs_runs_is_found_by_what_it_trained() -> None:
    assert published_for([400, 25, 10], 0.0, **LAB_PROBLEM) is PUBLISHED[0]
    assert published_for([400, 100, 10], 0.0, **LAB_PROBLEM) is PUBLISHED[1]
    assert published_for([400, 100, 10], 0.005, **LAB_PROBLEM) is PUBLISHED[2]


@pytest.mark.parametrize(
    "change",
    [
        dict(sizes=[400, 50, 10]),
        dict(sizes=[64, 25, 10]),
        dict(sizes=[400, 100, 50, 10]),
        dict(lamb=0.001),
        dict(tau=0.1),
        dict(iters=1000),
        dict(n_train=2000),
        dict(n_test=797),
    ],
    ids=str,
)
def test_a_configuration_the_lab_did_not_run_has_no_published_counterpart(change) -> None:
    args = dict(sizes=[400, 25, 10], lamb=0.0, **LAB_PROBLEM) | change
    assert published_for(**args) is None


def test_comparison_table_gives_lab_ours_and_signed_change() -> None:
    ours = {"train_acc": 93.0, "test_acc": 84.25, "loss": 0.5}
    table = comparison_table(
        {"h25": (PUBLISHED[0], "lab", ours), "mine": (None, "exact", ours)}
    ).splitlines()
    assert table[2] == (
        "| h25 | 25 hidden units | lab | 94.50 / 93.00 / -1.50 | 83.00 / 84.25 / +1.25 "
        "| 0.4507 / 0.5000 / +0.0493 |"
    )
    assert table[3] == (
        "| mine | none (not one of the lab's runs) | exact | - / 93.00 / - | - / 84.25 / - "
        "| - / 0.5000 / - |"
    )


def _model(path: Path, hidden: int, lamb: float, gradient: str) -> None:
    """A model of the lab's problem (its hyperparameters), untrained: the table is about what a
    model records, the metrics are whatever they are."""
    weights = init_weights([400, hidden, 10], np.random.default_rng(hidden))
    hyper = {"lamb": lamb, "tau": 0.2, "iters": 5000, "gradient": gradient, "blocks": 4}
    TrainedModel(tuple(weights), hyper).save(path)


def test_evaluate_writes_the_lab_table_beside_the_results(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y, y_test = rng.integers(0, 10, 1000), rng.integers(0, 10, 4000)
    X, X_test = rng.standard_normal((400, 1000)), rng.standard_normal((400, 4000))
    Prepared(X, one_hot(y, 10), y, X_test, y_test, (20, 20)).save(tmp_path / "prepared")
    _model(tmp_path / "models/h25.npz", 25, 0.0, "lab")
    _model(tmp_path / "models/h100_l2.npz", 100, 0.005, "exact")
    _model(tmp_path / "models/h50.npz", 50, 0.0, "lab")
    project_files(tmp_path)
    proc = run_stage(
        "evaluate",
        *("--prepared", "prepared", "--models", "models", "--metrics", "metrics.json"),
        *("--table", "results.md", "--confusion", "confusion.json"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "results.md").read_text()
    ours, lab = text.split("## Beside the lab's published results")
    assert "| h25 | 400-25-10 | 0 |" in ours
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lab.splitlines() if "|" in line}
    assert rows["h25"].startswith("| h25 | 25 hidden units | lab | 94.50 / ")
    assert rows["h100_l2"].startswith("| h100_l2 | 100 hidden, lamb 0.005 | exact | 95.80 / ")
    assert rows["h50"].startswith("| h50 | none (not one of the lab's runs) | lab | - / ")
    # the change is ours minus the lab's, from the same metrics the table above reports
    test_acc = float(ours.split("| h25 |")[1].split("|")[3])  # layers, lamb, train, test
    change = float(rows["h25"].split(" | ")[4].split(" / ")[2])
    assert change == pytest.approx(test_acc - 83.0, abs=0.011)  # both rounded to 0.01
