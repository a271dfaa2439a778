"""No parameter ever reaches a shell as code, every stage reads only what dvc.yaml declares for
it, every training default can be pinned in a configuration, and a configuration name is a plain
file name (issues 11 and 14).

dvc.yaml pastes no parameter into a command line: the stages read params.yaml themselves
(``nnbp.config``), so shell syntax in a value is a file name's characters or a refused value,
never a command. The fast tests check dvc.yaml and run the stages in-process; the `slow` tests
attack a copy of the project through `dvc exp run -S` and `dvc repro` and look for the file the
injected command would have created.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from nnbp import config
from nnbp.artifacts import TrainedModel
from nnbp.backprop import DTYPES, GRADIENT_RULES
from nnbp.dvcfiles import declared, read_yaml
from tests.params import changed_params, set_params
from tests.project import (
    ROOT,
    assert_one_line_error,
    copy_repo,
    dvc_attempt,
    error_lines,
    git,
    invoke,
    snapshot,
    tracked_env,
)
from tests.store import runs

PIPELINE = read_yaml(ROOT / "dvc.yaml")
PARAMS = read_yaml(ROOT / "params.yaml")
STAGES = [
    f"{name}@{key}" if "foreach" in body else name
    for name, body in PIPELINE["stages"].items()
    for key in (PARAMS["configs"] if "foreach" in body else [None])
]


def test_no_dvc_yaml_command_pastes_a_value():
    for name, body in PIPELINE["stages"].items():
        cmd = body.get("do", body)["cmd"]
        assert "${" not in json.dumps(cmd), f"stage {name} interpolates into its command: {cmd}"


def _nested(params: dict, keys: tuple[str, ...]) -> dict:
    """The values of ``keys`` of ``params``, nested again, as dvc.api.params_show gives them."""
    out: dict[str, Any] = {}
    for key in keys:
        *parents, last = key.split(".")
        node, source = out, params
        for part in parents:
            node, source = node.setdefault(part, {}), source[part]
        node[last] = source[last]
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_reads_exactly_what_dvc_declares_for_it(stage: str):
    """nnbp.config's reading of dvc.yaml agrees with DVC's own (dvc.api.params_show)."""
    import dvc.api

    shown = dvc.api.params_show(stages=[stage], repo=str(ROOT))
    assert _nested(PARAMS, declared(stage, ROOT / "dvc.yaml")) == shown


def test_a_stage_reading_an_undeclared_parameter_is_refused_naming_dvc_yaml():
    params = config.read("data", ROOT / "params.yaml", ROOT / "dvc.yaml")
    with pytest.raises(config.ConfigError, match=r"dvc.yaml: stage data reads data.path but "):
        params.get("data.path")  # prepare's parameter; `data` declares three others
    assert set(config.Data.read(params).model_fields_set) == {"source", "n_train", "split_seed"}


@pytest.mark.parametrize("name", ["a/b", "..", ".hidden", "-x", "a b", "a.b", "a'b", "h25;ls"])
def test_a_configuration_name_that_is_not_a_plain_file_name_is_refused(workspace: Path, name: str):
    before = snapshot(workspace)
    with changed_params(workspace, {"configs": {**PARAMS["configs"], name: {"hidden": [3]}}}):
        proc = invoke("train", "--", name, cwd=workspace)
    line = assert_one_line_error(
        proc,
        f"Error: params.yaml: configs: configuration name {name!r} is not a plain file name",
        status=2,
    )
    assert f"models/{name}.npz" in line
    assert snapshot(workspace) == before


# A value other than the default for every key (the enums come from the code).
PIN_VALUES = {
    "hidden": [7, 5],
    "tau": 0.3,
    "iters": 12,
    "lamb": 0.001,
    "seed": 3,
    "gradient": next(r for r in GRADIENT_RULES if r != PARAMS["gradient"]),
    "dtype": next(d for d in DTYPES if d != PARAMS["dtype"]),
    "log_every": 4,
    "blocks": 3,
}


def test_every_pinnable_key_has_a_test_value():
    assert sorted(PIN_VALUES) == sorted(config.Training.fields())


@pytest.mark.parametrize("key", list(PIN_VALUES))
def test_each_key_pinned_in_a_configuration_reaches_the_model(
    workspace: Path, tmp_path: Path, key: str
):
    pins = {"hidden": [25], key: PIN_VALUES[key]}
    with changed_params(workspace, {"configs.h25": pins}):
        proc = invoke(
            "train", "h25", "--models", str(tmp_path), "--histories", str(tmp_path), cwd=workspace
        )
    assert proc.returncode == 0, proc.stderr
    model = TrainedModel.load(tmp_path / "h25.npz")
    history = json.loads((tmp_path / "h25.json").read_text())
    recorded = {
        "hidden": model.hidden,
        **model.hyper,
        "dtype": model.dtype,
        "log_every": history[1]["step"],
    }
    if key == "seed":
        default = TrainedModel.load(workspace / "models/h25.npz")  # seed 0, all else the same
        assert not (model.weights[0] == default.weights[0]).all(), "the seed had no effect"
    else:
        assert recorded[key] == PIN_VALUES[key]


# --- through DVC (slow) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project after `dvc repro` (20 iterations), with the issue's file names."""
    repo = copy_repo(tmp_path_factory.mktemp("attack") / "repo", iters=20, log_every=10)
    proc = dvc_attempt(repo, "repro")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("a;touch PWNED1;x.npz", "my data.npz", "a'b.npz"):
        shutil.copy(repo / "data/digits.npz", repo / "data" / name)
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "-m", "reproduced")
    return repo


@pytest.fixture
def attacked(project: Path):
    """The project; afterwards no injected command may have run. The workspace is then reset
    to the reproduced commit (params, lock and outputs) for the next test."""
    yield project
    leaked = sorted(str(p.relative_to(project)) for p in project.rglob("PWNED*"))
    for name in leaked:  # so that the next test starts clean
        (project / name).unlink()
    git(project, "checkout", "--quiet", "--force", "HEAD", "--", ".")
    proc = dvc_attempt(project, "checkout", "--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert leaked == [], "a command hidden in a parameter ran"


def _outputs(repo: Path) -> dict[str, str]:
    return snapshot(repo, ("data/prepared", "models", "reports"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "path", ["data/a;touch PWNED1;x.npz", "data/a'b.npz", "data/my data.npz"], ids=str
)
def test_a_path_with_shell_syntax_is_a_file_name(attacked: Path, path: str):
    """The issue's semicolon, a quote, a space: the stages read the file by that name."""
    quoted = json.dumps(path)  # Hydra's override grammar takes a double-quoted string
    proc = dvc_attempt(attacked, "exp", "run", "-S", f"data.path={quoted}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{path}: 1000 training and 797 test examples" in proc.stdout
    assert "Running stage 'render'" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "render.seed=\"1'; touch PWNED2; '\"",
            "render.seed = \"1'; touch PWNED2; '\": must be a whole number",
        ),
        (
            "+configs.h25.gradient=\"exact';touch PWNED3;'\"",
            "configs.h25.gradient = \"exact';touch PWNED3;'\": must be 'lab' or 'exact'",
        ),
        ("tau=\"0.2'$(touch PWNED4)'\"", "tau = \"0.2'$(touch PWNED4)'\": must be a number"),
        (
            "render.seed='1`touch PWNED5`'",
            "render.seed = '1`touch PWNED5`': must be a whole number",
        ),
        (
            "render.seed='$(touch PWNED6)'",
            "render.seed = '$(touch PWNED6)': must be a whole number",
        ),
    ],
    ids=["quote", "configuration", "dollar-parens", "backticks", "bare dollar-parens"],
)
def test_exp_run_refuses_a_value_that_is_no_number_in_one_line(
    attacked: Path, setting: str, message: str
):
    before = _outputs(attacked)
    proc = dvc_attempt(attacked, "exp", "run", "-S", setting)
    assert proc.returncode != 0
    ours = [line for line in error_lines(proc.stderr) if line.startswith("Error:")]
    assert ours == [f"Error: params.yaml: {message}"], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert _outputs(attacked) == before


@pytest.mark.slow
def test_repro_single_item_reads_the_value_too(attacked: Path):
    """`dvc repro -s` skips upstream stages; the stage that runs reads its own parameters."""
    set_params(attacked, {"render.seed": "0'; touch PWNED7; '"})
    proc = dvc_attempt(attacked, "repro", "-s", "render")
    assert proc.returncode != 0
    assert "Error: params.yaml: render.seed = " in proc.stderr


@pytest.mark.slow
def test_a_shell_key_in_a_configuration_is_refused_before_training(attacked: Path):
    text = (attacked / "params.yaml").read_text()
    pinned = "  h25:\n    hidden: [25]\n    'x;touch PWNED8': 1\n"
    text = text.replace("  h25:\n    hidden: [25]\n", pinned, 1)
    (attacked / "params.yaml").write_text(text)
    proc = dvc_attempt(attacked, "repro")
    assert proc.returncode != 0
    assert "Error: params.yaml: configs.h25: 'x;touch PWNED8' is not a training parameter" in (
        proc.stderr
    )


@pytest.mark.slow
def test_a_render_seed_change_re_runs_only_render(attacked: Path):
    proc = dvc_attempt(attacked, "exp", "run", "-S", "render.seed=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.findall(r"^Running stage '([^']+)'", proc.stdout, re.M) == ["render"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["a/b", "h25';touch PWNED9;'"], ids=["slash", "quote"])
def test_a_configuration_name_that_is_no_file_name_is_refused_before_training(
    attacked: Path, name: str
):
    text = (attacked / "params.yaml").read_text()
    text = text.replace("  h25:\n", f"  {json.dumps(name)}:\n    hidden: [3]\n  h25:\n", 1)
    (attacked / "params.yaml").write_text(text)
    before = _outputs(attacked)
    proc = dvc_attempt(attacked, "repro", f"train@{name}")
    assert proc.returncode != 0
    ours = [line for line in error_lines(proc.stderr) if line.startswith("Error:")]
    assert ours == [
        f"Error: params.yaml: configs: configuration name {name!r} is not a plain file name "
        f"(letters, digits, '_' and '-', not starting with '-'); it would name models/{name}.npz; "
        "rename it"
    ], proc.stderr
    assert not (attacked / "models" / "a").exists()
    assert _outputs(attacked) == before


@pytest.mark.slow
def test_every_training_default_can_be_pinned_in_a_configuration(attacked: Path, tmp_path: Path):
    """h25 pins every key at once; the MLflow run and the model record the pinned values."""
    lines = [f"    {key}: {json.dumps(value)}\n" for key, value in PIN_VALUES.items()]
    text = (attacked / "params.yaml").read_text()
    text = text.replace("  h25:\n    hidden: [25]\n", "  h25:\n" + "".join(lines), 1)
    (attacked / "params.yaml").write_text(text)
    db = tmp_path / "mlflow.db"
    proc = dvc_attempt(attacked, "repro", "train@h25", env=tracked_env(f"sqlite:///{db}"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = runs(db)
    logged = run.params
    expected = {k: str(v) for k, v in PIN_VALUES.items() if k != "hidden"}
    assert {k: logged[k] for k in expected} == expected
    assert logged["hidden"] == "[7, 5]"
    history = json.loads((attacked / "reports/history/h25.json").read_text())
    assert [row["step"] for row in history] == [0, 4, 8, 12]
