"""A change costs what it touches: each stage's `deps` in dvc.yaml name the code its outputs are
made of, and nothing else. Read off a real `dvc repro` (the shared ``pipeline``), in which each
stage recorded the nnbp modules it loaded (tests/hooks/sitecustomize.py), imports inside
functions included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nnbp.dvcfiles import read_yaml
from tests.params import set_params
from tests.project import ROOT, Pipeline, dvc

pytestmark = pytest.mark.slow

# Numerics a stage loads although its outputs are not made of them, and the test showing that.
NEUTRAL = {
    "train": {"src/nnbp/figures.py": "test_tracking_changes_no_byte_of_any_output"},
}
TOOLING = "src/nnbp/tooling/"  # changes no byte of any output: no stage depends on it


def _code_deps(lock: dict, stage: str) -> set[str]:
    return {d["path"] for d in lock["stages"][stage]["deps"] if d["path"].startswith("src/")}


def test_each_stage_depends_on_exactly_the_numerics_it_loads(pipeline: Pipeline):
    lock = read_yaml(pipeline.root / "dvc.lock")
    assert set(pipeline.modules) == set(lock["stages"]), "a stage recorded no modules"
    for stage, loaded in pipeline.modules.items():
        neutral = set(NEUTRAL.get(stage.partition("@")[0], {}))
        numerics = {f for f in loaded if not f.startswith(TOOLING)} - neutral
        deps = _code_deps(lock, stage)
        assert numerics - deps == set(), f"{stage} loads code its deps do not name"
        assert deps - numerics == set(), f"{stage}'s deps name code it does not load"
        assert not any(d.startswith(TOOLING) for d in deps)


def test_bytecode_written_beside_the_code_leaves_dvc_status_clean(pipeline: Pipeline):
    """As on a user's machine (Python writes bytecode by default): nnbp ran from the copy's own
    src, wrote its __pycache__ there, and DVC saw no change."""
    assert list((pipeline.root / "src" / "nnbp").glob("__pycache__/*.pyc"))
    out = dvc(pipeline.root, "status", env=pipeline.env)
    assert "Data and pipelines are up to date." in out, out


def _stale(root: Path, env: dict[str, str]) -> set[str]:
    """The stages `dvc status` lists as changed."""
    return set(json.loads(dvc(root, "status", "--json", env=env)))


def test_editing_tooling_re_runs_nothing_and_editing_backprop_stales_what_it_makes(
    pipeline: Pipeline, tmp_path: Path
):
    root = tmp_path / "repo"
    shutil.copytree(pipeline.root, root, symlinks=True)
    tooling = sorted((root / "src/nnbp/tooling").rglob("*.py"))
    assert len(tooling) > 10
    for module in tooling:  # every module of tracking, the gate, team, the console tools...
        with module.open("a") as f:
            f.write("# a comment\n")
    assert _stale(root, pipeline.env) == set()
    with (root / "src/nnbp/backprop.py").open("a") as f:
        f.write("# a comment\n")
    stale = _stale(root, pipeline.env)
    assert stale == {f"train@{name}" for name in Pipeline.CONFIGS} | {"evaluate"}, stale


def test_tracking_changes_no_byte_of_any_output(pipeline: Pipeline, tmp_path: Path):
    """The shared run was tracked (its train stages drew figures for MLflow) on the threads
    `auto` gives; the same pipeline untracked on two threads writes the same bytes: every
    output's hash in dvc.lock is the same. (test_experiments.py runs one thread.)"""
    root = tmp_path / "repo"
    shutil.copytree(pipeline.root, root, symlinks=True)
    set_params(root, {"threads": 2})
    dvc(root, "repro", "-f", env={**pipeline.env, "NNBP_TRACKING": "off"})

    def outs(path: Path) -> dict[str, str]:
        lock = read_yaml(path)
        return {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}

    assert outs(root / "dvc.lock") == outs(pipeline.root / "dvc.lock")
    assert len(outs(root / "dvc.lock")) >= 10


def test_every_neutral_module_has_its_proof():
    for modules in NEUTRAL.values():
        for module, proof in modules.items():
            assert (ROOT / module).is_file()
            assert proof in globals(), proof
