"""The whole pipeline, run by DVC as a user runs it: the session's shared run (``pipeline``: a
copy of the repository, the digits, few iterations, tracked) read as a new user reads it:
outputs, a no-op second run, the MLflow store and its models, `dvc plots show`, and the opt-in
registration. The experiments are in test_experiments.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nnbp.artifacts import Prepared, TrainedModel
from nnbp.backprop import predict
from nnbp.files import file_md5
from nnbp.tooling.tracking.store import EXPERIMENT, WEIGHTS_MD5_TAG
from tests.project import Pipeline, clean_env, dvc, git, tracked_env
from tests.store import runs

ITERS, LOG_EVERY, CONFIGS = Pipeline.ITERS, Pipeline.LOG_EVERY, Pipeline.CONFIGS
STEPS = list(range(0, ITERS + 1, LOG_EVERY))
TRACKED = tracked_env()  # the default store: mlflow.db in the copy
UNTRACKED = clean_env()

pytestmark = pytest.mark.slow


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
