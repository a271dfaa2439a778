"""The metrics gate (`nnbp-gate`, ``nnbp.tooling.gate``): tolerances, missing configurations, its
errors, and, end to end, that a run degraded on purpose fails it while an unchanged run passes."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from nnbp.dvcfiles import read_yaml
from nnbp.tooling.console import gate as gate_command
from tests.params import set_params
from tests.project import BIN, ROOT, clean_env, dvc, dvc_attempt, git, tracked_env
from tests.servers import stage_processes
from tests.store import wait_for_training

BASE = {
    "h25": {"train_acc": 100.0, "test_acc": 97.867, "loss": 0.05},
    "h100": {"train_acc": 100.0, "test_acc": 98.2434, "loss": 0.035008},
    "h100_l2": {"train_acc": 96.8, "test_acc": 95.9849, "loss": 1.314484},
}
GATE = {"max_test_acc_drop": 0.5, "max_train_acc_drop": 1.0, "max_loss_rise": 2.0}


def _changed(config: str, metric: str, value: float) -> dict:
    new = json.loads(json.dumps(BASE))
    new[config][metric] = value
    return new


@pytest.fixture
def gate(tmp_path, monkeypatch):
    """Run the gate on ``new`` against ``baseline`` (files), tolerances from a params.yaml."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(json.dumps({"iters": 10, "gate": GATE}))

    def run(new, baseline=BASE, *options):
        Path("new.json").write_text(json.dumps(new))
        Path("base.json").write_text(json.dumps(baseline))
        args = ["--metrics", "new.json", "--baseline", "base.json", *options]
        return CliRunner().invoke(gate_command, args)

    return run


def test_unchanged_metrics_pass_and_print_the_table(gate):
    result = gate(BASE)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    header = result.stdout.splitlines()[2]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "config",
        "metric",
        "baseline",
        "new",
        "change",
        "verdict",
    ]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| h")]
    assert len(rows) == 9
    assert all(row.rstrip(" |").endswith("ok") for row in rows)


@pytest.mark.parametrize(
    ("metric", "value"),
    [("test_acc", 99.5), ("train_acc", 99.0), ("loss", 0.01)],
)
def test_improvement_passes(gate, metric, value):
    result = gate(_changed("h100_l2", metric, value))
    assert result.exit_code == 0, result.output
    assert "better" in result.stdout


@pytest.mark.parametrize(
    ("metric", "at_tolerance", "beyond"),
    [
        ("test_acc", 97.867 - 0.5, 97.867 - 0.51),
        ("train_acc", 100.0 - 1.0, 100.0 - 1.01),
        ("loss", 0.05 * 1.02, 0.05 * 1.0201),
    ],
)
def test_tolerance_boundary(gate, metric, at_tolerance, beyond):
    passed = gate(_changed("h25", metric, at_tolerance))
    assert passed.exit_code == 0, passed.output
    failed = gate(_changed("h25", metric, beyond))
    assert failed.exit_code == 1, failed.output
    assert failed.stderr.splitlines() == [failed.stderr.strip()]  # one line: one regression
    assert failed.stderr.startswith(f"regressed: h25 {metric} ")


def test_regression_message_names_metric_values_and_allowance(gate):
    result = gate(_changed("h25", "test_acc", 90.10))
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "regressed: h25 test_acc 97.87 -> 90.10 (-7.77 points, allowed -0.5)"
    )
    assert "REGRESSED" in result.stdout


def test_every_regression_gets_its_own_line(gate):
    new = _changed("h25", "test_acc", 50.0)
    new["h100"]["loss"] = 1.0
    new["h100_l2"]["train_acc"] = 10.0
    result = gate(new)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("regressed: h25 test_acc")
    assert lines[1].startswith("regressed: h100 loss 0.035008 -> 1 (+2756.49%, allowed +2%)")
    assert lines[2].startswith("regressed: h100_l2 train_acc")


@pytest.mark.parametrize("side", ["new", "baseline"])
def test_configuration_missing_on_either_side_fails(gate, side):
    fewer = {k: v for k, v in BASE.items() if k != "h100"}
    result = gate(fewer, BASE) if side == "new" else gate(BASE, fewer)
    assert result.exit_code == 1, result.output
    expected = "new metrics" if side == "new" else "baseline"
    assert result.stderr.strip() == f"missing: configuration h100 is not in the {expected}"


@pytest.mark.parametrize("value", [None, math.nan, "97"])
def test_metric_missing_or_not_a_number_fails(gate, value):
    new = json.loads(json.dumps(BASE))
    if value is None:
        del new["h25"]["loss"]
    else:
        new["h25"]["loss"] = value
    result = gate(new)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("missing: h25 loss")


def test_options_override_params(gate):
    new = _changed("h25", "test_acc", 97.867 - 1)
    assert gate(new).exit_code == 1
    assert gate(new, BASE, "--max-test-acc-drop", "1.5").exit_code == 0


def test_tolerances_come_from_params(gate):
    Path("params.yaml").write_text(json.dumps({"gate": {**GATE, "max_test_acc_drop": 2}}))
    assert gate(_changed("h25", "test_acc", 97.867 - 1)).exit_code == 0
    Path("params.yaml").write_text(json.dumps({"gate": {**GATE, "max_test_acc_drop": 0}}))
    assert gate(_changed("h25", "test_acc", 97.867 - 0.01)).exit_code == 1


def test_the_readme_and_the_gate_page_state_the_tolerances_of_params_yaml():
    gate = read_yaml(ROOT / "params.yaml")["gate"]
    tolerances = [gate["max_test_acc_drop"], gate["max_train_acc_drop"], gate["max_loss_rise"]]
    for page in ("docs/gate.md", "README.md"):
        text = " ".join((ROOT / page).read_text().split())
        stated = re.search(
            r"test accuracy may fall ([\d.]+) points, training accuracy ([\d.]+) points?, the "
            r"loss may rise ([\d.]+) ?%",
            text,
        )
        assert stated, f"{page} no longer states the gate's tolerances"
        assert [float(x) for x in stated.groups()] == tolerances, page


def test_missing_gate_section_is_a_one_line_error(gate):
    Path("params.yaml").write_text(json.dumps({"iters": 10}))
    result = gate(BASE)
    assert result.exit_code == 2
    assert "Error: params.yaml: gate.max_test_acc_drop is missing" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# --- the baseline from git ----------------------------------------------------------------


@pytest.fixture
def metrics_repo(tmp_path, monkeypatch):
    """A git repository: `main` holds BASE, a branch commits a worse h25 test accuracy."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(json.dumps({"gate": GATE}))
    (tmp_path / "reports").mkdir()
    metrics = tmp_path / "reports" / "metrics.json"
    metrics.write_text(json.dumps(BASE))
    git(tmp_path, "init", "--quiet", "--initial-branch=main")
    git(tmp_path, "add", "--all")
    git(tmp_path, "commit", "--quiet", "-m", "baseline")
    git(tmp_path, "switch", "--quiet", "-c", "feature")
    metrics.write_text(json.dumps(_changed("h25", "test_acc", 90.1)))
    git(tmp_path, "commit", "--quiet", "-am", "worse")
    return tmp_path


def test_default_baseline_is_head(metrics_repo):
    result = CliRunner().invoke(gate_command, [])
    assert result.exit_code == 0, result.output
    assert "against HEAD" in result.stdout


def test_baseline_ref_main_catches_the_branch_regression(metrics_repo):
    result = CliRunner().invoke(gate_command, ["--baseline-ref", "main"])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("regressed: h25 test_acc 97.87 -> 90.10")


def test_baseline_ref_works_from_a_subfolder(metrics_repo, monkeypatch):
    monkeypatch.chdir(metrics_repo / "reports")
    args = ["--metrics", "metrics.json", "--params", "../params.yaml", "--baseline-ref", "main"]
    result = CliRunner().invoke(gate_command, args)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("regressed: h25 test_acc 97.87 -> 90.10")


# --- errors: one line, no traceback (the real script, as CI runs it) ------------------------


def _script(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "nnbp-gate"), *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("none", [], "reports/metrics.json: no such metrics file"),
        ("corrupt", [], "reports/metrics.json: not valid JSON"),
        ("list", [], "reports/metrics.json: expected an object"),
        ("ok", ["--baseline-ref", "no-such-ref"], "at no-such-ref cannot be read"),
        ("ok", ["--baseline", "missing.json"], "missing.json: no such metrics file"),
        ("uncommitted", [], "at HEAD cannot be read"),
    ],
)
def test_unusable_files_give_one_line_and_exit_nonzero(metrics_repo, setup, args, message):
    metrics = metrics_repo / "reports" / "metrics.json"
    if setup == "none":
        metrics.unlink()
    elif setup == "corrupt":
        metrics.write_text('{"h25": {"test_acc": 9')
    elif setup == "list":
        metrics.write_text("[1, 2]")
    elif setup == "uncommitted":
        git(metrics_repo, "rm", "--quiet", "--cached", "reports/metrics.json")
        git(metrics_repo, "commit", "--quiet", "-m", "untrack the metrics")
    result = _script(metrics_repo, *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


# --- end to end: the real pipeline in a copy of the repository ------------------------------


@pytest.mark.slow
def test_degraded_run_fails_the_gate_and_an_unchanged_run_passes(repo_copy):
    repo = repo_copy()
    committed = repo.parent / "committed.yaml"
    committed.write_text(git(repo, "show", "HEAD:params.yaml"))
    baseline_iters = read_yaml(committed)["iters"]
    assert baseline_iters > 5, "the committed baseline must come from a longer run"
    env = clean_env()  # NNBP_TRACKING=off: this test is about the metrics, not MLflow

    # 1. Degrade on purpose: 5 iterations instead of the committed run's thousands.
    set_params(repo, {"iters": 5, "log_every": 5})
    dvc(repo, "repro", env=env)
    result = _script(repo)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    failures = result.stderr.strip().splitlines()
    for config in BASE:
        assert any(line.startswith(f"regressed: {config} test_acc ") for line in failures), (
            result.stderr
        )
    assert all(line.startswith("regressed: ") for line in failures)
    assert "REGRESSED" in result.stdout

    # 2. Commit that run as the new baseline, run the pipeline again unchanged: the gate passes.
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "-m", "5 iterations")
    committed = (repo / "reports" / "metrics.json").read_text()
    dvc(repo, "repro", "--force", env=env)
    assert json.loads((repo / "reports" / "metrics.json").read_text()) == json.loads(committed)
    result = _script(repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert "passed: 9 checks" in result.stdout
    # The documented CI command (`dvc metrics diff`) sees no change either.
    diff = subprocess.run(
        [str(BIN / "dvc"), "metrics", "diff", "--md", "HEAD"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "h25" not in diff.stdout


@pytest.mark.slow
def test_a_lock_corrupted_by_two_dvc_commands_fails_the_gate(repo_copy):
    """Issue 11, finding 7, as it happens: `dvc exp run -S iters=10` started while `dvc repro`
    trains is refused by DVC's lock but rewrites params.yaml, and the repro then records
    iters 10 in dvc.lock beside a model trained with 4,000. The training stage is held
    (SIGSTOP) while the second command runs, so the race happens whatever the machine's speed."""
    long = 4000  # a few seconds: the stage is held as soon as it trains
    repo = repo_copy(iters=20, log_every=10)
    dvc(repo, "repro")
    result = _script(repo, "--baseline", "reports/metrics.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dvc.lock: its params are the hyperparameters models/ records" in result.stdout

    set_params(repo, {"iters": long, "log_every": long // 2})
    # Tracked, so that the test knows when training has begun: the stage has read params.yaml.
    db = repo.parent / "mlflow.db"
    with subprocess.Popen(
        [str(BIN / "dvc"), "repro", "train@h25"],
        cwd=repo,
        env=tracked_env(f"sqlite:///{db}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as repro:
        try:
            wait_for_training(db, repro)
            (stage,) = stage_processes(repo)
            os.kill(stage, signal.SIGSTOP)
            try:
                second = dvc_attempt(repo, "exp", "run", "-S", "iters=10", timeout=300)
            finally:
                os.kill(stage, signal.SIGCONT)
            output, _ = repro.communicate(timeout=600)
        finally:
            if repro.poll() is None:
                repro.kill()
    assert second.returncode != 0, "the second DVC command was not refused"
    assert f"after {long} iterations" in output, output
    assert "iters: 10\n" in (repo / "dvc.lock").read_text(), "DVC's race did not happen"

    result = _script(repo, "--baseline", "reports/metrics.json")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"dvc.lock disagrees with models/h25.npz: iters is 10 in dvc.lock but {long} in the "
        "model (two DVC commands in one workspace?); run dvc repro -f train@h25"
    ]
    assert "FAILED: dvc.lock disagrees with the models on 1 value(s)" in result.stdout
