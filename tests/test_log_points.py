"""Log points and system metrics of a training run: denser logging adds points to the history,
never a bit to the training; a tracked run holds its machine's and its own CPU and memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nnbp.dvcfiles import read_yaml
from tests.params import changed_params
from tests.project import ROOT, run_stage, tracked_env


def _train(workspace: Path, out: Path, **params: int) -> tuple[bytes, list[dict]]:
    """`stages/train.py h25` with ``params`` (untracked): its model's bytes and its history."""
    with changed_params(workspace, params):
        proc = run_stage(
            "train", "h25", "--models", str(out), "--histories", str(out), cwd=workspace
        )
    assert proc.returncode == 0, proc.stderr
    return (out / "h25.npz").read_bytes(), json.loads((out / "h25.json").read_text())


def test_denser_logging_adds_history_points_and_changes_no_bit(workspace: Path, tmp_path: Path):
    sparse, sparse_history = _train(workspace, tmp_path / "sparse", iters=45, log_every=500)
    dense, dense_history = _train(workspace, tmp_path / "dense", iters=45, log_every=10)
    assert dense == sparse  # the weights, bit for bit
    assert [p["step"] for p in sparse_history] == [0, 45]  # 0 and the end, whatever log_every
    assert [p["step"] for p in dense_history] == [0, 10, 20, 30, 40, 45]
    by_step = {p["step"]: p for p in dense_history}
    assert [by_step[p["step"]] for p in sparse_history] == sparse_history  # the same values


def test_params_log_often_enough_to_draw_the_first_hundred_iterations():
    params = read_yaml(ROOT / "params.yaml")
    assert params["log_every"] <= 20, "the first 100 iterations would be a straight segment"
    assert params["iters"] % params["log_every"] == 0


def test_a_tracked_run_logs_its_cores_and_memory_as_system_metrics(workspace: Path, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    out = tmp_path / "out"
    env = tracked_env(f"sqlite:///{db}", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.2")
    with changed_params(workspace, {"iters": 1500, "log_every": 500}):  # about 2 s of training
        paths = ("--models", str(out), "--histories", str(out))
        proc = run_stage("train", "h25", *paths, cwd=workspace, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # sampling says nothing
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs(client.get_experiment_by_name("tp5-neural-networks").experiment_id)
    cores = client.get_metric_history(run.info.run_id, "system/process_cpu_cores")
    assert len(cores) >= 2, cores  # sampled while training, and at its end
    assert [m.step for m in cores] == list(range(len(cores)))
    assert all(0 <= m.value <= (os.cpu_count() or 1) + 0.5 for m in cores), cores
    assert max(m.value for m in cores) > 0.3, cores  # it was training
    for key in (
        "system/cpu_utilization_percentage",
        "system/system_memory_usage_megabytes",
        "system/process_memory_rss_megabytes",
    ):
        values = [m.value for m in client.get_metric_history(run.info.run_id, key)]
        assert len(values) == len(cores) and all(v >= 0 for v in values), (key, values)
    rss = client.get_metric_history(run.info.run_id, "system/process_memory_rss_megabytes")
    assert min(m.value for m in rss) > 20  # a Python process with NumPy and MLflow loaded
