"""The whole pipeline, run by DVC as a user runs it, in a temporary copy of the repository.

The read-only checks look at the session's shared run (``pipeline``: the digits, few iterations,
tracked): outputs, a no-op second run, the MLflow store, `dvc plots show`. The experiments run
in this module's own copy of that run (``repo``, its MLflow store emptied), one after the other:
they change its params, outputs and store, as a user's experiments do.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import zoom

from nnbp.artifacts import Prepared, TrainedModel
from nnbp.backprop import predict
from nnbp.files import file_md5
from nnbp.tooling.tracking.store import EXPERIMENT, WEIGHTS_MD5_TAG
from tests.params import set_params
from tests.project import ROOT, Pipeline, clean_env, dvc, git, tracked_env, wait_for_queue
from tests.store import runs

ITERS, LOG_EVERY, CONFIGS = Pipeline.ITERS, Pipeline.LOG_EVERY, Pipeline.CONFIGS
STEPS = list(range(0, ITERS + 1, LOG_EVERY))
TRACKED = tracked_env()  # the default store: mlflow.db in the copy
UNTRACKED = clean_env()

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shared run, outputs and DVC cache included, without its MLflow store."""
    root = tmp_path_factory.mktemp("experiments") / "repo"
    shutil.copytree(pipeline.root, root, symlinks=True)
    (root / "mlflow.db").unlink()
    shutil.rmtree(root / "mlartifacts")
    return root


def _metrics(root: Path) -> dict[str, dict[str, float]]:
    return json.loads((root / "reports" / "metrics.json").read_text())


def test_repro_writes_every_output(pipeline: Pipeline) -> None:
    root = pipeline.root
    metrics = _metrics(root)
    assert list(metrics) == list(CONFIGS)
    for name in CONFIGS:
        assert set(metrics[name]) == {"train_acc", "test_acc", "loss"}
        assert (root / "models" / f"{name}.npz").is_file()
        history = json.loads((root / "reports" / "history" / f"{name}.json").read_text())
        assert [row["step"] for row in history] == STEPS
    for figure in ("train_images", "test_images", "features", "curves"):
        assert (root / "reports" / "figures" / f"{figure}.png").stat().st_size > 1000
    assert "| h100_l2 | 64-100-10 | 0.005 |" in (root / "reports" / "results.md").read_text()
    # 40 iterations are enough to learn something on the digits
    assert all(metrics[name]["test_acc"] > 30 for name in CONFIGS)


def test_second_repro_runs_nothing(pipeline: Pipeline) -> None:
    out = dvc(pipeline.root, "repro", env=pipeline.env)
    assert "Running stage" not in out
    assert "up to date" in out


def test_each_configuration_is_one_finished_mlflow_run_with_step_metrics(
    pipeline: Pipeline,
) -> None:
    root = pipeline.root
    found = runs(root / "mlflow.db")
    assert [run.config for run in found] == list(CONFIGS)
    assert all(run.status == "FINISHED" for run in found)
    commit = git(root, "rev-parse", "--short=7", "HEAD").strip()
    assert [run.name for run in found] == [f"{name} (repro {commit})" for name in CONFIGS]
    for run in found:
        # the step metrics, no final_* copies of their last values; and the system metrics
        assert {k for k in run.steps if not k.startswith("system/")} == {
            "loss",
            "train_acc",
            "test_acc",
        }
        assert {"system/process_cpu_cores", "system/cpu_utilization_percentage"} <= set(run.steps)
        for key in ("loss", "train_acc", "test_acc"):
            assert run.steps[key] == STEPS
        assert run.params["lamb"] == ("0.005" if run.config == "h100_l2" else "0.0")
        assert len(run.params["data_md5"]) == 32
        assert len(run.tags["git_commit"]) == 40


def test_each_run_logs_its_model_its_datasets_and_its_figures(pipeline: Pipeline) -> None:
    import mlflow

    root = pipeline.root
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.experiment.primaryMetric.name"] == "test_acc"
    digest = file_md5(root / "data" / "digits.npz")
    for found in runs(root / "mlflow.db"):
        name, run = found.config, client.get_run(found.run_id)
        folder = Path(found.artifact_uri.removeprefix("file://"))
        assert folder.is_relative_to(root / "mlartifacts")
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert files == {"figures/features.png", "figures/curves.png", f"history/{name}.json"}
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
        assert (model.name, model.source_run_id, model.status.name) == (name, found.run_id, "READY")
        assert model.tags[WEIGHTS_MD5_TAG] == file_md5(root / "models" / f"{name}.npz")
        assert {m.key for m in model.metrics} == {"loss", "train_acc", "test_acc"}
        stored = Path(model.artifact_location.removeprefix("file://"))
        assert stored.is_relative_to(root / "mlartifacts")
        files = {p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()}
        # models from code: the model file, the network's code and the weights; no pickle
        assert {"MLmodel", "mlflow_model.py", "code/nnbp_model/artifacts.py"} <= files
        assert f"artifacts/{name}.npz" in files
        assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
        assert (stored / "artifacts" / f"{name}.npz").read_bytes() == (
            root / "models" / f"{name}.npz"
        ).read_bytes()


def test_registration_is_opt_in_and_makes_the_best_configuration_the_champion(
    pipeline: Pipeline,
) -> None:
    """In the shared run (its models are the ones its runs logged); its params.yaml and dvc.lock
    are put back as they were afterwards (the registry keeps the champion)."""
    import mlflow

    root = pipeline.root
    kept = {f: (root / f).read_bytes() for f in ("params.yaml", "dvc.lock")}
    store = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(store, registry_uri=store)
    assert client.search_registered_models() == []  # dvc repro registers nothing by default
    try:
        out = dvc(root, "exp", "run", "-S", "mlflow.register=true", env=pipeline.env)
        metrics = _metrics(root)
        best = max(metrics, key=lambda name: metrics[name]["test_acc"])
        assert f"best configuration: {best}" in out
        assert "Running stage 'train" not in out  # only the register stage's params changed
        version = client.get_model_version_by_alias("tp5-digits", "champion")
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(store)
        try:
            model = mlflow.pyfunc.load_model("models:/tp5-digits@champion")
        finally:
            mlflow.set_tracking_uri(previous)
        weights = list(TrainedModel.load(root / "models" / f"{best}.npz").weights)
        X = Prepared.load(root / "data" / "prepared").X_test
        digits = (predict(weights, X) + 1) % 10
        np.testing.assert_array_equal(model.predict(X.T), digits)
        # The same weights again: the champion stays the same version.
        again = dvc(root, "repro", "--force", "--single-item", "register", env=pipeline.env)
        assert "is already tp5-digits version" in again
        assert client.get_model_version_by_alias("tp5-digits", "champion").version == (
            version.version
        )
    finally:
        for f, content in kept.items():
            (root / f).write_bytes(content)


def _vega_specs(page: str) -> dict[str, dict]:
    """The Vega-Lite spec of each chart on a `dvc plots show` page, by plot id."""
    body = page[page.rindex("<body>") :]  # the inlined scripts hold "<body>" in strings too
    specs = {}
    for match in re.finditer(r'<div id = "([^"]+)">\s*<script[^>]*>\s*var spec = ', body):
        spec, _ = json.JSONDecoder().raw_decode(body, match.end())
        specs[match.group(1)] = spec
    return specs


def test_plots_show_renders_offline_a_chart_per_metric_with_every_configuration(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    shown = subprocess.run(
        ["dvc", "plots", "show", "-o", str(tmp_path / "plots")],
        cwd=pipeline.root,
        env=pipeline.env,
        capture_output=True,
        text=True,
        check=True,
    )
    # DVC reports a plot it cannot render on stderr ("WARNING: ...", "ERROR: ..."), exit 0.
    for stream in (shown.stdout, shown.stderr):
        assert not re.search(r"failed|error|warning", stream, re.I), stream
    assert shown.stderr.strip() == "", shown.stderr
    page = (tmp_path / "plots" / "index.html").read_text()
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
        drawn = [row["configuration"] for row in spec["data"]["values"]]
        assert sorted(set(drawn)) == sorted(CONFIGS)
        assert len(drawn) == len(CONFIGS) * len(STEPS)
        assert spec["encoding"]["color"]["field"] == "configuration"
    assert "curves.png" in page and "features.png" in page


# --- experiments, in this module's own copy, one after the other ------------------------------


def test_forced_repro_on_one_thread_untracked_gives_the_same_dvc_lock(
    pipeline: Pipeline, repo: Path
) -> None:
    """`threads` changes how fast, never what (no stage declares it), and so does tracking: the
    shared run (threads auto, tracked) and this one (one thread, untracked) make the same
    bytes. (test_stage_deps.py runs two threads.)"""
    params = (repo / "params.yaml").read_text()
    try:
        set_params(repo, {"threads": 1})
        dvc(repo, "repro", "-f", env=UNTRACKED)
    finally:
        (repo / "params.yaml").write_text(params)
    assert (repo / "dvc.lock").read_bytes() == (pipeline.root / "dvc.lock").read_bytes()
    assert "threads" not in (repo / "dvc.lock").read_text()
    for name in CONFIGS:
        model = f"models/{name}.npz"
        assert (repo / model).read_bytes() == (pipeline.root / model).read_bytes()
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


def test_grid_sweep_in_two_workers_lands_every_run_complete(repo: Path) -> None:
    baseline = git(repo, "rev-parse", "HEAD").strip()
    out = dvc(repo, "exp", "run", "--queue", "-S", "lamb=0.001,0.002,0.003", env=TRACKED)
    assert out.count("Queued experiment") == 3
    dvc(repo, "queue", "start", "-j", "2", env=TRACKED)
    status = wait_for_queue(repo, TRACKED)
    assert status.count("Success") >= 3 and "Failed" not in status
    # `dvc exp show` lists the three experiments with their metrics
    shown = json.loads(dvc(repo, "exp", "show", "--json", env=TRACKED))
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
    found = runs(repo / "mlflow.db")
    swept = [run for run in found if run.tags.get("dvc_experiment") in exps]
    assert sorted(run.config for run in swept) == sorted(CONFIGS * 3)
    for run in swept:
        assert run.tags["dvc_baseline_rev"] == baseline
        assert run.status == "FINISHED"
        for key in ("loss", "train_acc", "test_acc"):
            assert run.steps[key] == STEPS
    assert [run for run in found if run.status == "RUNNING"] == []


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
    # (last in this module: it commits the copy's current state as its baseline)
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--no-verify", "-m", "baseline")
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
