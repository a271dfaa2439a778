"""Issue 11, findings 1, 4 and 5: no parameter ever reaches a shell as code, every training
default can be pinned in a configuration, and a configuration name is a plain file name.

The fast tests run `stages/check_params.py` (the check every dvc.yaml command runs first) on the
real dvc.yaml with a params.yaml changed one value at a time, and the train stage in-process. The
`slow` tests attack a copy of the project through `dvc exp run -S` and `dvc repro` as the issue
did, and look for the file the injected command would have created.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from nnbp.backprop import DTYPES, GRADIENT_RULES
from tests.conftest import BIN, GIT_ID, ROOT, clean_env, copy_repo
from tests.errors_helpers import (
    TRAIN_ARGS,
    assert_one_line_error,
    error_lines,
    invoke,
    make_workspace,
    set_param,
    snapshot,
    stage_env,
    with_option,
)

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
DVC_YAML = (ROOT / "dvc.yaml").read_text()
# Every `${...}` of dvc.yaml's stages but the foreach ones: the parameters that reach a command.
INTERPOLATED = sorted(
    set(re.findall(r"\$\{([^}]+)\}", json.dumps(yaml.safe_load(DVC_YAML)["stages"])))
    - {"key", "item", "configs"}
)
# What a configuration may pin: `hidden` and every top-level training default.
PINNABLE = ["hidden", *(k for k, v in PARAMS.items() if not isinstance(v, dict | list))]
ATTACK = "x'; touch PWNED; '"


def _set(params: dict, dotted: str, value: Any) -> dict:
    new = copy.deepcopy(params)
    *parents, last = dotted.split(".")
    node = new
    for p in parents:
        node = node[p]
    node[last] = value
    return new


def _check(tmp_path: Path, params: dict, dvcfile: str = DVC_YAML):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "dvc.yaml").write_text(dvcfile)
    return invoke("check_params", cwd=tmp_path)


def test_the_project_s_own_parameters_pass_the_check(tmp_path: Path):
    assert {"data.path", "render.seed", "log_every", "tau"} <= set(INTERPOLATED)
    proc = _check(tmp_path, PARAMS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


@pytest.mark.parametrize("param", INTERPOLATED)
def test_a_quote_in_any_interpolated_parameter_is_refused_naming_it(tmp_path: Path, param: str):
    proc = _check(tmp_path, _set(PARAMS, param, ATTACK))
    assert_one_line_error(proc, f"Error: params.yaml: {param} = ", "holds a single quote", status=1)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("data\\x.npz", "holds a backslash"),
        ("data/a\nb.npz", "holds a newline or another control character"),
        ("data/a\u2028b.npz", "holds a newline or another control character"),
        (["a", "b"], "must be a single number or string, got a list"),
        ({"a": "x';touch PWNED;'"}, "must be a single number or string, got a mapping"),
    ],
    ids=["backslash", "newline", "line separator", "list", "mapping"],
)
def test_a_value_that_cannot_be_quoted_safely_is_refused(tmp_path: Path, value, message):
    for param in ("data.path", "render.seed"):
        proc = _check(tmp_path, _set(PARAMS, param, value))
        assert_one_line_error(proc, f"Error: params.yaml: {param}", message, status=1)


@pytest.mark.parametrize(
    "value",
    ["data/a;touch PWNED;x.npz", "data/$(touch PWNED).npz", "data/`touch PWNED`.npz", "a b"],
)
def test_shell_syntax_without_a_quote_passes_the_check_as_plain_text(tmp_path: Path, value):
    """Between single quotes these are literal characters: the check lets them through."""
    proc = _check(tmp_path, _set(PARAMS, "data.path", value))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"hidden": [25], "gradient": ATTACK}, "configs.h25.gradient = "),
        ({"hidden": [25], "x;touch PWNED": 1}, "configs.h25: 'x;touch PWNED' is not a training"),
        ({"hidden": [25], "lamb": True}, "configs.h25.lamb must be a number or a string, got True"),
        ({"hidden": [25], "lamb": {"a": 1}}, "configs.h25.lamb must be a number or a string"),
        ({"hidden": [25], "tau": [0.1, 0.2]}, "configs.h25.tau must be a number or a string"),
        ({"hidden": [25, "1'"]}, 'configs.h25.hidden = "1\'" holds a single quote'),
        ({"hiden": [25]}, "configs.h25: 'hiden' is not a training parameter"),
        (25, "configs.h25 must be a mapping of training parameters"),
    ],
    ids=[
        "quote",
        "key",
        "boolean",
        "mapping",
        "list for one value",
        "list item",
        "misspelt key",
        "not a mapping",
    ],
)
def test_a_configuration_that_cannot_be_unpacked_safely_is_refused(tmp_path: Path, config, message):
    proc = _check(tmp_path, _set(PARAMS, "configs.h25", config))
    assert_one_line_error(proc, f"Error: params.yaml: {message}", status=1)


@pytest.mark.parametrize("name", ["a/b", "..", ".hidden", "-x", "a b", "a.b", "a'b", "h25;ls"])
def test_a_configuration_name_that_is_not_a_plain_file_name_is_refused(tmp_path: Path, name):
    params = copy.deepcopy(PARAMS)
    params["configs"][name] = {"hidden": [3]}
    proc = _check(tmp_path, params)
    line = assert_one_line_error(
        proc, f"Error: params.yaml: configs: configuration name {name!r} is not a plain file name"
    )
    assert f"models/{name}.npz" in line


def test_a_dvc_yaml_command_with_an_unquoted_parameter_is_refused(tmp_path: Path):
    unquoted = DVC_YAML.replace("--data '${data.path}'", "--data ${data.path}", 1)
    assert unquoted != DVC_YAML
    proc = _check(tmp_path, PARAMS, unquoted)
    assert_one_line_error(
        proc, "Error: dvc.yaml: stage prepare: ${data.path} is not between single quotes", status=1
    )


def test_every_dvc_yaml_command_runs_the_check_first():
    stages = yaml.safe_load(DVC_YAML)["stages"]
    for name, stage in stages.items():
        cmd = stage.get("do", stage)["cmd"]
        assert isinstance(cmd, list), name
        assert cmd[0] == "python stages/check_params.py", name


# --- the train stage: names and pins ---------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workspace")
    make_workspace(root)
    return root


@pytest.mark.parametrize("name", ["a/b", "../x", "-x"])
def test_train_refuses_a_name_that_is_not_a_plain_file_name(workspace: Path, name: str):
    before = snapshot(workspace)
    args = with_option(TRAIN_ARGS, "--name", name)
    proc = invoke("train", *with_option(args, "--model", f"models/{name}.npz"), cwd=workspace)
    assert_one_line_error(
        proc, f"Error: Invalid value for '--name': configuration name {name!r}", status=2
    )
    assert snapshot(workspace) == before


# A value other than the default for every key (the enums come from the code).
PIN_VALUES = {
    "hidden": ["7", "5"],
    "tau": ["0.3"],
    "iters": ["12"],
    "lamb": ["0.001"],
    "seed": ["3"],
    "gradient": [next(r for r in GRADIENT_RULES if r != PARAMS["gradient"])],
    "dtype": [next(d for d in DTYPES if d != PARAMS["dtype"])],
    "log_every": ["4"],
    "threads": ["2"],
}


def test_every_pinnable_key_has_a_test_value():
    assert sorted(PIN_VALUES) == sorted(PINNABLE)


@pytest.mark.parametrize("key", PINNABLE)
def test_train_takes_each_params_key_spelt_as_in_params_yaml(
    workspace: Path, tmp_path: Path, key: str
):
    """`${item}` gives `--log_every 4`: each key, spelt as in params.yaml, is an option."""
    args = with_option(TRAIN_ARGS, "--model", str(tmp_path / "m.npz"))
    args = with_option(args, "--history", str(tmp_path / "h.json"))
    if key == "hidden":  # --hidden accumulates (one per layer): the pin replaces the default
        args = with_option(args, "--hidden")
    for value in PIN_VALUES[key]:
        args += [f"--{key}", value]
    proc = invoke("train", *args, cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "m.npz") as model:
        recorded = {k: model[k] for k in model.files}
    history = json.loads((tmp_path / "h.json").read_text())
    got = {
        "hidden": [str(s) for s in recorded["sizes"][1:-1]],
        "tau": [str(float(recorded["tau"]))],
        "iters": [str(int(recorded["iters"]))],
        "lamb": [str(float(recorded["lamb"]))],
        "gradient": [str(recorded["gradient"])],
        "dtype": [recorded["W1"].dtype.name],
        "log_every": [str(history[1]["step"])],
        "threads": [str(int(recorded["threads"]))],
    }
    if key == "seed":
        args0 = with_option(args[:-2], "--model", str(tmp_path / "m0.npz"))
        assert invoke("train", *args0, cwd=workspace).returncode == 0
        with np.load(tmp_path / "m0.npz") as m0:
            assert not np.array_equal(m0["W1"], recorded["W1"]), "--seed had no effect"
    else:
        assert got[key] == PIN_VALUES[key]


# --- through DVC (slow) ----------------------------------------------------------------------


def _dvc(repo: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "dvc"), *args],
        cwd=repo,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project after `dvc repro` (20 iterations), with the issue's file names."""
    repo = copy_repo(tmp_path_factory.mktemp("attack") / "repo", iters=20, log_every=10)
    proc = _dvc(repo, "repro")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("a;touch PWNED1;x.npz", "my data.npz", "a'b.npz"):
        shutil.copy(repo / "data/digits.npz", repo / "data" / name)
    _git(repo, "add", "--all")
    _git(repo, "commit", "--quiet", "-m", "reproduced")
    return repo


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *GIT_ID, *args], cwd=repo, env=clean_env(), check=True)


@pytest.fixture
def attacked(project: Path):
    """The project; afterwards no injected command may have run. The workspace is then reset
    to the reproduced commit (params, lock and outputs) for the next test."""
    yield project
    leaked = sorted(str(p.relative_to(project)) for p in project.rglob("PWNED*"))
    for name in leaked:  # so that the next test starts clean
        (project / name).unlink()
    _git(project, "checkout", "--quiet", "--force", "HEAD", "--", ".")
    proc = _dvc(project, "checkout", "--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert leaked == [], "a command hidden in a parameter ran"


def _outputs(repo: Path) -> dict[str, str]:
    return snapshot(repo, ("data/prepared", "models", "reports"))


@pytest.mark.slow
def test_issue_s_semicolon_path_is_a_file_name_not_a_command(attacked: Path):
    proc = _dvc(attacked, "exp", "run", "-S", "data.path='data/a;touch PWNED1;x.npz'")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--data 'data/a;touch PWNED1;x.npz'" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "setting",
    [
        'data.path="data/a\'b.npz"',
        "render.seed=\"1'; touch PWNED2; '\"",
        "+configs.h25.gradient=\"exact';touch PWNED3;'\"",
        "tau=\"0.2'$(touch PWNED4)'\"",
    ],
    ids=["data.path", "render.seed", "configs.h25.gradient", "tau"],
)
def test_exp_run_refuses_a_quote_in_one_line_before_any_command(attacked: Path, setting: str):
    before = _outputs(attacked)
    proc = _dvc(attacked, "exp", "run", "-S", setting)
    assert proc.returncode != 0
    ours = [line for line in error_lines(proc.stderr) if line.startswith("Error:")]
    param = setting.lstrip("+").split("=")[0]
    assert len(ours) == 1 and ours[0].startswith(f"Error: params.yaml: {param} = "), proc.stderr
    assert "holds a single quote" in ours[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    # Only the check ran: the stage's own command never started.
    assert re.findall(r"^> (.*)$", proc.stdout, re.M) == ["python stages/check_params.py"]
    assert _outputs(attacked) == before


@pytest.mark.slow
def test_backticks_and_dollar_parens_stay_text(attacked: Path):
    for value in ("1`touch PWNED5`", "$(touch PWNED6)"):
        proc = _dvc(attacked, "exp", "run", "-S", f"render.seed='{value}'")
        assert proc.returncode != 0
        assert f"Invalid value for '--seed': '{value}' is not a valid integer" in proc.stderr


@pytest.mark.slow
def test_repro_single_item_still_runs_the_check(attacked: Path):
    """`dvc repro -s` skips upstream stages; the check lives in every command, so it still runs."""
    set_param(attacked, "seed", "\"0'; touch PWNED7; '\"", indent="  ")  # render.seed
    proc = _dvc(attacked, "repro", "-s", "render")
    assert proc.returncode != 0
    assert "Error: params.yaml: render.seed = " in proc.stderr


@pytest.mark.slow
def test_a_shell_key_in_a_configuration_is_refused_before_any_command(attacked: Path):
    text = (attacked / "params.yaml").read_text()
    pinned = "  h25:\n    hidden: [25]\n    'x;touch PWNED8': 1\n"
    text = text.replace("  h25:\n    hidden: [25]\n", pinned, 1)
    (attacked / "params.yaml").write_text(text)
    proc = _dvc(attacked, "repro")
    assert proc.returncode != 0
    assert "Error: params.yaml: configs.h25: 'x;touch PWNED8' is not a training parameter" in (
        proc.stderr
    )


@pytest.mark.slow
def test_a_path_with_spaces_runs_the_pipeline(attacked: Path):
    proc = _dvc(attacked, "exp", "run", "-S", "data.path=data/my data.npz")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--data 'data/my data.npz'" in proc.stdout
    assert "Running stage 'render'" in proc.stdout


@pytest.mark.slow
def test_a_render_seed_change_re_runs_only_render(attacked: Path):
    proc = _dvc(attacked, "exp", "run", "-S", "render.seed=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.findall(r"^Running stage '([^']+)'", proc.stdout, re.M) == ["render"]


@pytest.mark.slow
def test_a_configuration_named_a_slash_b_is_refused_before_training(attacked: Path):
    text = (attacked / "params.yaml").read_text()
    text = text.replace("  h25:\n", "  a/b:\n    hidden: [3]\n  h25:\n", 1)
    (attacked / "params.yaml").write_text(text)
    before = _outputs(attacked)
    proc = _dvc(attacked, "repro")
    assert proc.returncode != 0
    ours = [line for line in error_lines(proc.stderr) if line.startswith("Error:")]
    assert ours == [
        "Error: params.yaml: configs: configuration name 'a/b' is not a plain file name "
        "(letters, digits, '_' and '-', not starting with '-'); it would name models/a/b.npz; "
        "rename it"
    ], proc.stderr
    assert not (attacked / "models" / "a").exists()
    assert _outputs(attacked) == before


@pytest.mark.slow
def test_every_training_default_can_be_pinned_in_a_configuration(attacked: Path, tmp_path: Path):
    """h25 pins every key at once; the MLflow run and the model record the pinned values."""
    pins = PIN_VALUES
    lines = []
    for key, values in pins.items():
        flow = "[" + ", ".join(values) + "]" if key == "hidden" else values[0]
        lines.append(f"    {key}: {flow}\n")
    text = (attacked / "params.yaml").read_text()
    text = text.replace("  h25:\n    hidden: [25]\n", "  h25:\n" + "".join(lines), 1)
    (attacked / "params.yaml").write_text(text)
    db = tmp_path / "mlflow.db"
    proc = _dvc(attacked, "repro", "train@h25", env=stage_env(f"sqlite:///{db}"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with sqlite3.connect(db) as con:
        logged = dict(con.execute("SELECT key, value FROM params"))
    expected = {k: v[0] for k, v in pins.items() if k != "hidden"}
    assert {k: logged[k] for k in expected} == expected
    assert logged["hidden"] == "[7, 5]"
    history = json.loads((attacked / "reports/history/h25.json").read_text())
    assert [row["step"] for row in history] == [0, 4, 8, 12]
