"""Experiments, as a user runs them in a workspace: `dvc exp run -S` in the workspace and
`--temp` beside it, the lab's own data file, and the way back to the baseline. They run one after
the other in this module's copy of the repository (``repo``: the digits, few iterations, the
baseline reproduced untracked), changing its params, outputs and MLflow store as a user's
experiments do. The queue is in test_queue.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import zoom

from tests.params import set_params
from tests.project import (
    ROOT,
    Pipeline,
    baseline_copy,
    clean_env,
    dvc,
    git,
    tracked_env,
)
from tests.store import runs

CONFIGS = Pipeline.CONFIGS
TRACKED = tracked_env()  # the default store: mlflow.db in the copy
UNTRACKED = clean_env()

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return baseline_copy(tmp_path_factory.mktemp("experiments") / "repo")


def _metrics(root: Path) -> dict[str, dict[str, float]]:
    return json.loads((root / "reports" / "metrics.json").read_text())


def test_forced_repro_on_one_thread_gives_the_same_dvc_lock(repo: Path) -> None:
    """`threads` changes how fast, never what (no stage declares it): the baseline (threads
    auto) and this run (one thread) make the same bytes. (test_stage_deps.py runs two threads,
    tracked against untracked.)"""
    lock = (repo / "dvc.lock").read_bytes()
    models = {name: (repo / f"models/{name}.npz").read_bytes() for name in CONFIGS}
    params = (repo / "params.yaml").read_text()
    try:
        set_params(repo, {"threads": 1})
        dvc(repo, "repro", "-f", env=UNTRACKED)
    finally:
        (repo / "params.yaml").write_text(params)
    assert (repo / "dvc.lock").read_bytes() == lock
    assert "threads" not in lock.decode()
    assert {name: (repo / f"models/{name}.npz").read_bytes() for name in CONFIGS} == models
    assert "Running stage" not in dvc(repo, "repro", env=UNTRACKED)  # auto again: no re-run


def test_exp_run_lamb_changes_only_the_unpinned_configurations(repo: Path) -> None:
    before = _metrics(repo)
    dvc(repo, "exp", "run", "-S", "lamb=0.005", "--name", "all-l2", env=TRACKED)
    after = _metrics(repo)
    assert after["h100_l2"] == before["h100_l2"]
    for name in ("h25", "h100"):
        assert after[name]["loss"] != before[name]["loss"]
    # h100 with lamb 0.005 is exactly the h100_l2 configuration
    assert after["h100"] == after["h100_l2"]
    tagged = runs(repo / "mlflow.db")[-3:]
    assert [run.name for run in tagged] == [f"{name} (all-l2)" for name in CONFIGS]
    assert all(run.tags["dvc_experiment"] == "all-l2" for run in tagged)


def test_exp_run_gradient_exact_changes_every_configuration(repo: Path) -> None:
    dvc(repo, "exp", "run", "-S", "gradient=lab", "-S", "lamb=0.0", env=UNTRACKED)  # the default
    lab = _metrics(repo)
    dvc(repo, "exp", "run", "-S", "gradient=exact", env=UNTRACKED)
    exact = _metrics(repo)
    for name in CONFIGS:
        assert lab[name]["loss"] != exact[name]["loss"]


def test_temp_experiment_logs_to_the_workspace_store(repo: Path) -> None:
    """`--temp` runs in a copy under .dvc/tmp that DVC deletes afterwards: the runs, their
    params and their artifacts must be in the workspace's store, not in that copy."""
    count = len(runs(repo / "mlflow.db"))
    dvc(repo, "exp", "run", "--temp", "-S", "seed=1", "--name", "temp-seed1", env=TRACKED)
    found = runs(repo / "mlflow.db")
    assert len(found) == count + 3
    new = found[-3:]
    assert [run.config for run in new] == list(CONFIGS)
    for run in new:
        assert run.status == "FINISHED"
        assert run.params["seed"] == "1"
        assert run.tags["dvc_experiment"] == "temp-seed1"
        folder = Path(run.artifact_uri.removeprefix("file://"))
        assert folder.is_relative_to(repo / "mlartifacts"), run.artifact_uri
        assert (folder / "history" / f"{run.config}.json").stat().st_size > 0


def _lab_layout_file(repo: Path) -> Path:
    """A file in the lab's layout and of its kind: 20x20 images (the digits, upsampled), X (400, n)
    with each image column-major, y (n, 1) in 1..10."""
    arrays = {}
    with np.load(repo / "data" / "digits.npz") as digits:
        for split in ("train", "test"):
            images = digits[f"X_{split}"].T.reshape(-1, 8, 8)  # each row: image.T, row-major
            big = zoom(images, (1, 2.5, 2.5), order=1)
            arrays[f"X_{split}"] = big.reshape(len(big), -1).T
            arrays[f"y_{split}"] = digits[f"y_{split}"]
    path = repo / "data" / "nn_train_test_sets.npz"
    np.savez(path, **arrays)
    return path


def test_lab_file_runs_with_the_documented_command(repo: Path) -> None:
    path = _lab_layout_file(repo)
    command = ["exp", "run", "-S", f"data.path={path.relative_to(repo)}", "-S", "gradient=exact"]
    dvc(repo, *command, env=UNTRACKED)
    table = (repo / "reports" / "results.md").read_text()
    assert "| h25 | 400-25-10 |" in table
    assert "| h100_l2 | 400-100-10 | 0.005 |" in table
    assert all(_metrics(repo)[name]["test_acc"] > 30 for name in CONFIGS)
    # DVC hashes the file: unchanged, nothing runs; changed, the pipeline runs again
    assert "Running stage" not in dvc(repo, "repro", env=UNTRACKED)
    with np.load(path) as data:
        arrays = dict(data)
    np.savez(path, **{**arrays, "X_train": arrays["X_train"] * 2})
    assert "Running stage 'prepare'" in dvc(repo, "repro", env=UNTRACKED)


def test_readmes_way_back_to_the_baseline_restores_it(repo: Path) -> None:
    # The copy's current state, whatever the tests before left in it, is the baseline
    # (``--allow-empty``: they may have left it as committed).
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--no-verify", "--allow-empty", "-m", "baseline")
    files = ("params.yaml", "dvc.lock", "reports/metrics.json", "reports/results.md")
    committed = {f: (repo / f).read_bytes() for f in files}
    dvc(repo, "exp", "run", "-S", "lamb=0.004", env=UNTRACKED)
    assert (repo / "params.yaml").read_bytes() != committed["params.yaml"]  # DVC left it so
    # docs/experiments.md's command, as written there (and in the README, the same)
    written = {
        page: [
            line
            for line in (ROOT / page).read_text().splitlines()
            if line.startswith("git checkout -- params.yaml")
        ]
        for page in ("docs/experiments.md", "README.md")
    }
    assert written["docs/experiments.md"], "docs/experiments.md lost the way back"
    assert len({line for lines in written.values() for line in lines}) == 1, written
    way_back = written["docs/experiments.md"][0]
    subprocess.run(
        way_back,
        shell=True,
        cwd=repo,
        env=UNTRACKED,
        check=True,
        capture_output=True,
    )
    assert {f: (repo / f).read_bytes() for f in files} == committed
    status = dvc(repo, "status", env=UNTRACKED)
    assert "up to date" in status, status
