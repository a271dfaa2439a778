"""A grid of experiments through DVC's queue, two workers at once, tracked to the workspace's
MLflow store: every experiment lands in `dvc exp show` with its metrics, and every run of it in
MLflow, complete, with its experiment's name and baseline; the queue's workers are stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.project import Pipeline, baseline_copy, dvc, git, tracked_env, wait_for_queue
from tests.store import runs

# One configuration: what a queue does with an experiment is the same for three.
CONFIGS = ("h25",)
STEPS = list(range(0, Pipeline.ITERS + 1, Pipeline.LOG_EVERY))
TRACKED = tracked_env()  # the default store: mlflow.db in the copy

pytestmark = pytest.mark.slow


def test_grid_sweep_in_two_workers_lands_every_run_complete(tmp_path: Path) -> None:
    repo = baseline_copy(tmp_path / "repo", configs={name: {"hidden": [25]} for name in CONFIGS})
    baseline = git(repo, "rev-parse", "HEAD").strip()
    out = dvc(repo, "exp", "run", "--queue", "-S", "lamb=0.001,0.002", env=TRACKED)
    assert out.count("Queued experiment") == 2
    dvc(repo, "queue", "start", "-j", "2", env=TRACKED)
    status = wait_for_queue(repo, TRACKED)
    assert status.count("Success") >= 2 and "Failed" not in status
    # `dvc exp show` lists the two experiments with their metrics
    shown = json.loads(dvc(repo, "exp", "show", "--json", env=TRACKED))
    exps = {
        e["name"]: rev["data"]
        for base in shown
        for e in base.get("experiments") or []
        for rev in e["revs"]
        if rev["data"]["params"]["params.yaml"]["data"]["lamb"] in (0.001, 0.002)
    }
    assert len(exps) == 2
    for data in exps.values():
        assert set(data["metrics"]["reports/metrics.json"]["data"]) == set(CONFIGS)
    # MLflow: one FINISHED run per configuration and experiment, with every log point and the
    # experiment's name and baseline commit; no run anywhere in the store is left RUNNING
    found = runs(repo / "mlflow.db")
    swept = [run for run in found if run.tags.get("dvc_experiment") in exps]
    assert sorted(run.config for run in swept) == sorted(CONFIGS * 2)
    for run in swept:
        assert run.tags["dvc_baseline_rev"] == baseline
        assert run.status == "FINISHED"
        for key in ("loss", "train_acc", "test_acc"):
            assert run.steps[key] == STEPS
    assert [run for run in found if run.status == "RUNNING"] == []
