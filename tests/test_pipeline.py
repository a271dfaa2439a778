"""The whole pipeline, run by DVC as a user runs it, in a temporary copy of the repository.

One module-scoped copy is reproduced once with few iterations; the tests then check what a new
user checks: outputs, a no-op second run, bitwise reproducibility, experiments, and the MLflow
store. They are slow (a minute or two) and marked so.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import zoom

from nnbp.artifacts import Prepared, TrainedModel
from nnbp.backprop import predict
from nnbp.files import file_md5
from nnbp.tooling.tracking.store import EXPERIMENT, WEIGHTS_MD5_TAG
from tests.conftest import BIN, ROOT, clean_env, copy_repo, dvc, git, run, set_params

ITERS, LOG_EVERY = 40, 20
CONFIGS = ("h25", "h100", "h100_l2")
TRACKED = clean_env(NNBP_TRACKING="on")  # the default store: mlflow.db in the copy

pytestmark = pytest.mark.slow


def _dvc(root: Path, *args: str) -> str:
    return dvc(root, *args, env=TRACKED)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_repo(tmp_path_factory.mktemp("pipeline"), iters=ITERS, log_every=LOG_EVERY)
    _dvc(root, "repro")
    return root


def _metrics(root: Path) -> dict[str, dict[str, float]]:
    return json.loads((root / "reports" / "metrics.json").read_text())


def _runs(root: Path) -> list[tuple[str, str, str]]:
    """(configuration, status, run id) of every MLflow run in the default store, oldest first."""
    with sqlite3.connect(root / "mlflow.db") as db:
        return db.execute(
            "SELECT p.value, r.status, r.run_uuid FROM runs r JOIN params p"
            " ON p.run_uuid = r.run_uuid AND p.key = 'config' ORDER BY r.start_time"
        ).fetchall()


def _run_names(root: Path, run_ids: list[str]) -> list[str]:
    with sqlite3.connect(root / "mlflow.db") as db:
        return [
            db.execute("SELECT name FROM runs WHERE run_uuid = ?", (i,)).fetchone()[0]
            for i in run_ids
        ]


def test_repro_writes_every_output(repo: Path) -> None:
    metrics = _metrics(repo)
    assert list(metrics) == list(CONFIGS)
    for name in CONFIGS:
        assert set(metrics[name]) == {"train_acc", "test_acc", "loss"}
        assert (repo / "models" / f"{name}.npz").is_file()
        history = json.loads((repo / "reports" / "history" / f"{name}.json").read_text())
        assert [row["step"] for row in history] == list(range(0, ITERS + 1, LOG_EVERY))
    for figure in ("train_images", "test_images", "features", "curves"):
        assert (repo / "reports" / "figures" / f"{figure}.png").stat().st_size > 1000
    assert "| h100_l2 | 64-100-10 | 0.005 |" in (repo / "reports" / "results.md").read_text()
    # 40 iterations are enough to learn something on the digits
    assert all(metrics[name]["test_acc"] > 30 for name in CONFIGS)


def test_second_repro_runs_nothing(repo: Path) -> None:
    out = _dvc(repo, "repro")
    assert "Running stage" not in out
    assert "up to date" in out


def test_forced_repro_is_bitwise_identical(repo: Path) -> None:
    lock = (repo / "dvc.lock").read_bytes()
    metrics = (repo / "reports" / "metrics.json").read_bytes()
    _dvc(repo, "repro", "-f")
    assert (repo / "dvc.lock").read_bytes() == lock
    assert (repo / "reports" / "metrics.json").read_bytes() == metrics


def test_one_thread_and_two_give_the_same_dvc_lock_byte_for_byte(repo: Path) -> None:
    """`threads` changes how fast, never what: no stage declares it, no output moves."""
    params = (repo / "params.yaml").read_text()
    try:
        locks, models = [], []
        for threads in (1, 2):
            set_params(repo, threads=threads)
            _dvc(repo, "repro", "-f")
            locks.append((repo / "dvc.lock").read_bytes())
            models.append({p.name: p.read_bytes() for p in (repo / "models").glob("*.npz")})
    finally:
        (repo / "params.yaml").write_text(params)
    assert locks[0] == locks[1]
    assert models[0] == models[1] and len(models[0]) == len(CONFIGS)
    assert "threads" not in locks[0].decode()
    assert "Running stage" not in _dvc(repo, "repro")  # back to auto: nothing to re-run


def test_each_configuration_is_one_finished_mlflow_run_with_step_metrics(repo: Path) -> None:
    runs = _runs(repo)
    first = runs[:3]
    assert [name for name, _, _ in first] == list(CONFIGS)
    assert all(status == "FINISHED" for _, status, _ in first)
    commit = git(repo, "rev-parse", "--short=7", "HEAD").strip()
    names = _run_names(repo, [run_id for _, _, run_id in first])
    assert names == [f"{name} (repro {commit})" for name in CONFIGS]
    with sqlite3.connect(repo / "mlflow.db") as db:
        for name, _, run_id in first:
            steps = db.execute(
                "SELECT key, step FROM metrics WHERE run_uuid = ? ORDER BY key, step", (run_id,)
            ).fetchall()
            # the step metrics, no final_* copies of their last values; and the system metrics
            keys = {k for k, _ in steps}
            assert {k for k in keys if not k.startswith("system/")} == {
                "loss",
                "train_acc",
                "test_acc",
            }
            assert {"system/process_cpu_cores", "system/cpu_utilization_percentage"} <= keys
            for key in ("loss", "train_acc", "test_acc"):
                assert [s for k, s in steps if k == key] == list(range(0, ITERS + 1, LOG_EVERY))
            params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)))
            assert params["config"] == name
            assert params["lamb"] == ("0.005" if name == "h100_l2" else "0.0")
            assert len(params["data_md5"]) == 32
            tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)))
            assert len(tags["git_commit"]) == 40
            artifacts = db.execute(
                "SELECT artifact_uri FROM runs WHERE run_uuid = ?", (run_id,)
            ).fetchone()[0]
            folder = Path(artifacts.removeprefix("file://"))
            assert folder.is_relative_to(repo / "mlartifacts")
            found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
            assert found == {
                "figures/features.png",
                "figures/curves.png",
                f"history/{name}.json",
            }


def test_each_run_logs_its_model_and_its_datasets(repo: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.experiment.primaryMetric.name"] == "test_acc"
    digest = file_md5(repo / "data" / "digits.npz")
    for name, _, run_id in _runs(repo)[:3]:
        run = client.get_run(run_id)
        inputs = {
            i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags})
            for i in run.inputs.dataset_inputs
        }
        assert inputs == {
            "digits.npz:training": (digest, {"mlflow.data.context": "training"}),
            "digits.npz:test": (digest, {"mlflow.data.context": "test"}),
        }
        (output,) = run.outputs.model_outputs
        assert output.step == ITERS
        model = client.get_logged_model(output.model_id)
        assert (model.name, model.source_run_id, model.status.name) == (name, run_id, "READY")
        assert model.tags[WEIGHTS_MD5_TAG] == file_md5(repo / "models" / f"{name}.npz")
        assert {m.key for m in model.metrics} == {"loss", "train_acc", "test_acc"}
        stored = Path(model.artifact_location.removeprefix("file://"))
        assert stored.is_relative_to(repo / "mlartifacts")
        files = {p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()}
        # models from code: the model file, the network's code and the weights; no pickle
        assert {"MLmodel", "mlflow_model.py", "code/nnbp_model/artifacts.py"} <= files
        assert f"artifacts/{name}.npz" in files
        assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
        assert (stored / "artifacts" / f"{name}.npz").read_bytes() == (
            repo / "models" / f"{name}.npz"
        ).read_bytes()


def test_registration_is_opt_in_and_makes_the_best_configuration_the_champion(
    repo: Path,
) -> None:
    import mlflow

    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = mlflow.MlflowClient(store, registry_uri=store)
    assert client.search_registered_models() == []  # dvc repro registers nothing by default
    out = _dvc(repo, "exp", "run", "-S", "mlflow.register=true")
    metrics = _metrics(repo)
    best = max(metrics, key=lambda name: metrics[name]["test_acc"])
    assert f"best configuration: {best}" in out
    version = client.get_model_version_by_alias("tp5-digits", "champion")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        model = mlflow.pyfunc.load_model("models:/tp5-digits@champion")
    finally:
        mlflow.set_tracking_uri(previous)
    weights = list(TrainedModel.load(repo / "models" / f"{best}.npz").weights)
    X = Prepared.load(repo / "data" / "prepared").X_test
    digits = (predict(weights, X) + 1) % 10
    np.testing.assert_array_equal(model.predict(X.T), digits)
    # The same weights again: the champion stays the same version.
    assert "is already tp5-digits version" in _dvc(
        repo, "repro", "--force", "--single-item", "register"
    )
    again = client.get_model_version_by_alias("tp5-digits", "champion")
    assert again.version == version.version
    _dvc(repo, "exp", "run", "-S", "mlflow.register=false")  # as the other tests expect it


def test_exp_run_lamb_changes_only_the_unpinned_configurations(repo: Path) -> None:
    before = _metrics(repo)
    _dvc(repo, "exp", "run", "-S", "lamb=0.005", "--name", "all-l2")
    after = _metrics(repo)
    assert after["h100_l2"] == before["h100_l2"]
    for name in ("h25", "h100"):
        assert after[name]["loss"] != before[name]["loss"]
    # h100 with lamb 0.005 is exactly the h100_l2 configuration
    assert after["h100"] == after["h100_l2"]
    tagged = _runs(repo)[-3:]
    names = _run_names(repo, [run_id for _, _, run_id in tagged])
    assert names == [f"{name} (all-l2)" for name in CONFIGS]
    with sqlite3.connect(repo / "mlflow.db") as db:
        for _, _, run_id in tagged:
            tag = db.execute(
                "SELECT value FROM tags WHERE run_uuid = ? AND key = 'dvc_experiment'", (run_id,)
            ).fetchone()
            assert tag == ("all-l2",)


def test_exp_run_gradient_exact_changes_every_configuration(repo: Path) -> None:
    _dvc(repo, "exp", "run", "-S", "gradient=lab", "-S", "lamb=0.0")  # the default rule
    lab = _metrics(repo)
    _dvc(repo, "exp", "run", "-S", "gradient=exact")
    exact = _metrics(repo)
    for name in CONFIGS:
        assert lab[name]["loss"] != exact[name]["loss"]


def _wait_for_queue(root: Path, timeout: float = 900) -> str:
    """Poll `dvc queue status` until nothing is queued or running; its last output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _dvc(root, "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        time.sleep(2)
    pytest.fail(f"the queue did not drain in {timeout} s:\n{status}")


def test_grid_sweep_in_two_workers_lands_every_run_complete(repo: Path) -> None:
    baseline = git(repo, "rev-parse", "HEAD").strip()
    out = _dvc(repo, "exp", "run", "--queue", "-S", "lamb=0.001,0.002,0.003")
    assert out.count("Queued experiment") == 3
    _dvc(repo, "queue", "start", "-j", "2")
    status = _wait_for_queue(repo)
    assert status.count("Success") >= 3 and "Failed" not in status
    # `dvc exp show` lists the three experiments with their metrics
    shown = json.loads(_dvc(repo, "exp", "show", "--json"))
    exps = {
        e["name"]: rev["data"]
        for base in shown
        for e in base.get("experiments") or []
        for rev in e["revs"]
        if rev["data"]["params"]["params.yaml"]["data"]["lamb"] in (0.001, 0.002, 0.003)
    }
    assert len(exps) == 3
    for data in exps.values():
        assert set(data["metrics"]["reports/metrics.json"]["data"]) == set(CONFIGS)
    # MLflow: one FINISHED run per configuration and experiment, with every log point and the
    # experiment's name and baseline commit; no run anywhere in the store is left RUNNING
    with sqlite3.connect(repo / "mlflow.db") as db:
        tags = db.execute(
            "SELECT run_uuid, key, value FROM tags WHERE key IN "
            "('dvc_experiment', 'dvc_baseline_rev')"
        ).fetchall()
        by_run: dict[str, dict[str, str]] = {}
        for run_id, key, value in tags:
            by_run.setdefault(run_id, {})[key] = value
        swept = {r: t for r, t in by_run.items() if t.get("dvc_experiment") in exps}
        assert len(swept) == 9
        for run_id, run_tags in swept.items():
            assert run_tags["dvc_baseline_rev"] == baseline
            status, config = db.execute(
                "SELECT status, (SELECT value FROM params WHERE run_uuid = runs.run_uuid "
                "AND key = 'config') FROM runs WHERE run_uuid = ?",
                (run_id,),
            ).fetchone()
            assert status == "FINISHED" and config in CONFIGS
            steps = db.execute(
                "SELECT key, step FROM metrics WHERE run_uuid = ? ORDER BY key, step", (run_id,)
            ).fetchall()
            for key in ("loss", "train_acc", "test_acc"):
                assert [s for k, s in steps if k == key] == list(range(0, ITERS + 1, LOG_EVERY))
        assert db.execute("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'").fetchone() == (0,)


def test_temp_experiment_logs_to_the_workspace_store(repo: Path) -> None:
    """`--temp` runs in a copy under .dvc/tmp that DVC deletes afterwards: the runs, their
    params and their artifacts must be in the workspace's store, not in that copy."""
    count = len(_runs(repo))
    _dvc(repo, "exp", "run", "--temp", "-S", "seed=1", "--name", "temp-seed1")
    runs = _runs(repo)
    assert len(runs) == count + 3
    new = runs[-3:]
    assert [name for name, _, _ in new] == list(CONFIGS)
    assert all(status == "FINISHED" for _, status, _ in new)
    with sqlite3.connect(repo / "mlflow.db") as db:
        for name, _, run_id in new:
            params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)))
            assert params["seed"] == "1", name
            tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)))
            assert tags["dvc_experiment"] == "temp-seed1", name
            (uri,) = db.execute(
                "SELECT artifact_uri FROM runs WHERE run_uuid = ?", (run_id,)
            ).fetchone()
            folder = Path(uri.removeprefix("file://"))
            assert folder.is_relative_to(repo / "mlartifacts"), uri
            assert (folder / "history" / f"{name}.json").stat().st_size > 0
            assert (folder / "history" / f"{name}.json").stat().st_size > 0


def _vega_specs(page: str) -> dict[str, dict]:
    """The Vega-Lite spec of each chart on a `dvc plots show` page, by plot id."""
    body = page[page.rindex("<body>") :]  # the inlined scripts hold "<body>" in strings too
    specs = {}
    for match in re.finditer(r'<div id = "([^"]+)">\s*<script[^>]*>\s*var spec = ', body):
        spec, _ = json.JSONDecoder().raw_decode(body, match.end())
        specs[match.group(1)] = spec
    return specs


def test_plots_show_renders_offline_a_chart_per_metric_with_every_configuration(
    repo: Path,
) -> None:
    shown = run([str(BIN / "dvc"), "plots", "show", "-o", "plots-page"], repo, TRACKED)
    # DVC reports a plot it cannot render on stderr ("WARNING: ...", "ERROR: ..."), exit 0.
    for stream in (shown.stdout, shown.stderr):
        assert not re.search(r"failed|error|warning", stream, re.I), stream
    assert shown.stderr.strip() == "", shown.stderr
    page = (repo / "plots-page" / "index.html").read_text()
    # Offline: no script is fetched, Vega, Vega-Lite and vega-embed are in the page.
    assert not re.findall(r"<script[^>]*\bsrc=", page)
    assert "cdn.jsdelivr.net" not in page
    for script in ("vega5.js", "vega-lite5.js", "vega-embed6.js"):
        assert f"<script>/* {script} */" in page
    specs = _vega_specs(page)
    assert set(specs) == {"loss", "train_acc", "test_acc"}
    for metric, spec in specs.items():
        # the loss on a chart of its own, not on the accuracies' 0-100 axis
        assert spec["encoding"]["y"]["field"] == metric
        assert {row["field"] for row in spec["data"]["values"]} == {metric}
        shown = [row["configuration"] for row in spec["data"]["values"]]
        assert sorted(set(shown)) == sorted(CONFIGS)
        assert len(shown) == len(CONFIGS) * len(range(0, ITERS + 1, LOG_EVERY))
        assert spec["encoding"]["color"]["field"] == "configuration"
    assert "curves.png" in page and "features.png" in page


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
    _dvc(repo, "exp", "run", "-S", f"data.path={path.relative_to(repo)}", "-S", "gradient=exact")
    table = (repo / "reports" / "results.md").read_text()
    assert "| h25 | 400-25-10 |" in table
    assert "| h100_l2 | 400-100-10 | 0.005 |" in table
    assert all(_metrics(repo)[name]["test_acc"] > 30 for name in CONFIGS)
    # DVC hashes the file: unchanged, nothing runs; changed, the pipeline runs again
    assert "Running stage" not in _dvc(repo, "repro")
    with np.load(path) as data:
        arrays = dict(data)
    np.savez(path, **{**arrays, "X_train": arrays["X_train"] * 2})
    assert "Running stage 'prepare'" in _dvc(repo, "repro")


def test_readmes_way_back_to_the_baseline_restores_it(repo: Path) -> None:
    # (last in this module: it commits the copy's current state as its baseline)
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--no-verify", "-m", "baseline")
    files = ("params.yaml", "dvc.lock", "reports/metrics.json", "reports/results.md")
    committed = {f: (repo / f).read_bytes() for f in files}
    _dvc(repo, "exp", "run", "-S", "lamb=0.004")
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
        env=TRACKED,
        check=True,
        capture_output=True,
    )
    assert {f: (repo / f).read_bytes() for f in files} == committed
    status = _dvc(repo, "status")
    assert "up to date" in status, status
