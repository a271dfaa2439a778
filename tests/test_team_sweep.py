"""A sweep spread over two machines, as the README's team section runs it: a bare git repository
as the git remote, moto's S3 server behind a DVC remote (dvc-s3), the team's MLflow server
(basic auth); two worker clones, each with its own DVC cache, queueing and running a slice of the
seed grid and sharing it; a reviewer's clone that lists every experiment, applies the best one
and gets its model's bytes. Then the remote failures a team meets, each in one line.

The two "machines" are clones on this host, told apart by NNBP_MACHINE.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nnbp.files import file_md5
from nnbp.tooling.tracking.store import EXPERIMENT
from tests.project import clean_env, copy_repo, sh, wait_for_queue
from tests.servers import S3, Api, start_s3_server, stop_server

ITERS, LOG_EVERY = 20, 10
# One configuration: what is shared is the same for three. The copy's dvc.lock keeps the
# entries of the two removed ones (DVC does), whose outputs nobody pushes: nnbp-apply must not
# ask for them.
CONFIGS = ("h25",)
# Three experiments, two trained: seed 0 is the baseline's (DVC restores its outputs), and each
# machine trains one while the other does.
SLICES = {"machine-a": "seed=0,1", "machine-b": "seed=2"}
SEEDS = sorted(int(s) for grid in SLICES.values() for s in grid.removeprefix("seed=").split(","))


@dataclass
class Team:
    origin: Path  # the bare git repository
    s3: S3
    server: object  # tests.servers.Server
    member: dict[str, str]  # MLFLOW_TRACKING_* of the member
    lead: Path
    root: Path

    def env(self, machine: str, **extra: str) -> dict[str, str]:
        return clean_env(**self.member, **self.s3.env(), NNBP_MACHINE=machine, **extra)

    def api(self) -> Api:
        m = self.member
        return Api(self.server.url, m["MLFLOW_TRACKING_USERNAME"], m["MLFLOW_TRACKING_PASSWORD"])


@pytest.fixture(scope="module")
def team(tmp_path_factory, team_tracking) -> Iterator[Team]:
    """The remotes set up once, as the README's team section does it, and the baseline shared."""
    server, member = team_tracking
    root = tmp_path_factory.mktemp("team")
    s3_proc, s3 = start_s3_server(root)
    try:
        origin = root / "tp5.git"
        subprocess.run(
            ["git", "init", "--quiet", "--bare", "--initial-branch=main", str(origin)], check=True
        )
        configs = {name: {"hidden": [25]} for name in CONFIGS}
        lead = copy_repo(root / "lead", iters=ITERS, log_every=LOG_EVERY, configs=configs)
        t = Team(origin, s3, server, member, lead, root)
        env = t.env("lead")
        sh(lead, env, "git", "remote", "add", "origin", str(origin))
        sh(lead, env, "dvc", "remote", "add", "-d", "team", f"s3://{s3.bucket}/dvc")
        sh(lead, env, "dvc", "remote", "modify", "team", "endpointurl", s3.url)
        sh(lead, env, "dvc", "repro")
        sh(lead, env, "git", "add", ".dvc/config", "dvc.lock", "reports")
        sh(lead, env, "git", "commit", "--quiet", "-m", "the team's remotes, the baseline")
        sh(lead, env, "dvc", "push")
        sh(lead, env, "git", "push", "--quiet", "origin", "main")
        yield t
    finally:
        stop_server(s3_proc)


def _clone(team: Team, name: str, env: dict[str, str]) -> Path:
    sh(team.root, env, "git", "clone", "--quiet", str(team.origin), name)
    return team.root / name


def _experiments(clone: Path, env: dict[str, str]) -> dict[str, dict]:
    """name -> {"params": ..., "metrics": ...} of each experiment `dvc exp show` lists."""
    shown = json.loads(sh(clone, env, "dvc", "exp", "show", "--json").stdout)
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            (rev,) = exp["revs"]
            data = rev["data"]
            found[exp["name"]] = {
                "params": data["params"]["params.yaml"]["data"],
                "metrics": data["metrics"]["reports/metrics.json"]["data"],
            }
    return found


@pytest.mark.slow
def test_a_sweep_over_two_machines_reaches_the_reviewer_and_mlflow_once(team: Team):
    started = time.monotonic()
    workers = {}
    for machine, grid in SLICES.items():
        env = team.env(machine)
        clone = _clone(team, machine, env)
        sh(clone, env, "dvc", "pull")
        sh(clone, env, "dvc", "exp", "run", "--queue", "-S", grid)
        workers[machine] = (clone, env)
    for clone, env in workers.values():  # both machines at once
        sh(clone, env, "dvc", "queue", "start", "-j", "1")
    for clone, env in workers.values():
        status = wait_for_queue(clone, env)
        assert "Success" in status and "Failed" not in status, status
    swept = time.monotonic() - started
    names = {}
    for machine, (clone, env) in workers.items():
        shared = sh(clone, env, "nnbp-share", "origin")
        assert "shared through git remote 'origin' and DVC remote 'team'" in shared.stdout
        names[machine] = set(_experiments(clone, env))

    reviewer_env = team.env("reviewer")
    reviewer = _clone(team, "reviewer", reviewer_env)
    sh(reviewer, reviewer_env, "dvc", "exp", "pull", "--no-cache", "origin")
    listed = _experiments(reviewer, reviewer_env)
    assert set(listed) == names["machine-a"] | names["machine-b"]
    assert sorted(e["params"]["seed"] for e in listed.values()) == SEEDS
    for exp in listed.values():
        assert set(exp["metrics"]) == set(CONFIGS)
        assert all(0 < exp["metrics"][c]["test_acc"] <= 100 for c in CONFIGS)

    best = max(listed, key=lambda n: listed[n]["metrics"]["h25"]["test_acc"])
    sh(reviewer, reviewer_env, "nnbp-apply", "origin", best)
    machine = next(m for m, found in names.items() if best in found)
    clone, env = workers[machine]
    sh(clone, env, "dvc", "exp", "apply", best)  # the worker's own bytes, from its own cache
    for config in CONFIGS:
        mine = (reviewer / "models" / f"{config}.npz").read_bytes()
        assert mine == (clone / "models" / f"{config}.npz").read_bytes(), config
    assert (
        json.loads((reviewer / "reports" / "metrics.json").read_text()) == listed[best]["metrics"]
    )

    # MLflow: every experiment's runs once, finished and complete, named after its machine.
    api = team.api()
    experiment = api.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    body = {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000}
    runs = api.post("runs/search", body)["runs"]
    by_exp: dict[str | None, list[dict]] = {}
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        by_exp.setdefault(tags.get("dvc_experiment"), []).append({**run, "tags": tags})
    baseline_rev = sh(team.lead, reviewer_env, "git", "rev-parse", "HEAD").stdout.strip()
    data_md5 = file_md5(team.lead / "data" / "digits.npz")
    seed_0 = next(n for n, e in listed.items() if e["params"]["seed"] == 0)
    # seed 0 is the baseline's params: DVC restores the baseline's outputs and trains nothing
    assert seed_0 not in by_exp
    assert listed[seed_0]["metrics"] == json.loads(
        (team.lead / "reports" / "metrics.json").read_text()
    )
    expected = {None: "lead"} | {n: m for m, found in names.items() for n in found if n != seed_0}
    assert set(by_exp) == set(expected)
    for name, machine in expected.items():
        found = by_exp[name]
        configs = sorted(
            {p["key"]: p["value"] for p in r["data"]["params"]}["config"] for r in found
        )
        assert configs == sorted(CONFIGS), (name, configs)  # each once
        for run in found:
            assert run["info"]["status"] == "FINISHED", name
            assert run["tags"]["nnbp.machine"] == machine
            if name is not None:
                assert run["tags"]["dvc_baseline_rev"] == baseline_rev
                assert run["info"]["run_name"].endswith(f" ({name})")
            steps = api.get("metrics/get-history", run_id=run["info"]["run_id"], metric_key="loss")
            assert sorted(m["step"] for m in steps["metrics"]) == list(
                range(0, ITERS + 1, LOG_EVERY)
            )
            assert run["outputs"]["model_outputs"], name  # the MLflow Model was logged
            digests = {i["dataset"]["digest"] for i in run["inputs"]["dataset_inputs"]}
            assert digests == {data_md5}, name  # the same data on every machine
    # the UI's search box, as the README spells it
    for machine in SLICES:
        body["filter"] = f"tags.`nnbp.machine` = '{machine}'"
        found = api.post("runs/search", body)["runs"]
        expected_names = {n for n in names[machine] if n != seed_0}
        assert {r["info"]["run_name"].split(" (")[1][:-1] for r in found} == expected_names
        assert len(found) == len(CONFIGS) * len(expected_names)
    print(
        f"\nsweep of {len(listed)} experiments on 2 machines: {swept:.0f} s; "
        f"whole test {time.monotonic() - started:.0f} s"
    )


def _one_experiment(team: Team, name: str, machine: str) -> tuple[Path, dict[str, str]]:
    """A clone of ``machine`` that ran experiment ``name`` (untracked, seed 9)."""
    env = team.env(machine)
    clone = _clone(team, machine, env)
    sh(clone, env, "dvc", "pull")
    sh(
        clone,
        {**env, "NNBP_TRACKING": "off"},
        "dvc",
        "exp",
        "run",
        "--temp",
        "-n",
        name,
        "-S",
        "seed=9",
    )
    return clone, env


@pytest.fixture
def off_origin(team: Team) -> Iterator[list[str]]:
    """Experiments a test pushes to the git remote, taken off it again after the test (the
    sweep's reviewer lists every experiment there)."""
    pushed: list[str] = []
    yield pushed
    for name in pushed:
        sh(
            team.lead,
            team.env("lead"),
            "dvc",
            "exp",
            "remove",
            "--git-remote",
            "origin",
            name,
            ok=False,
        )


def _exp_refs(team: Team) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-remote", str(team.origin), "refs/exps/*"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split("/")[-1] for line in listed.splitlines()]


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.slow
def test_remote_failures_are_one_line_naming_the_remote_and_push_nothing(team: Team, off_origin):
    clone, env = _one_experiment(team, "refused", "machine-c")
    off_origin.append("refused")
    url = f"s3://{team.s3.bucket}/dvc"

    # refused credentials: nothing is pushed, not even the experiment's ref
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    line = _one_error_line(sh(clone, wrong, "nnbp-share", "origin", "refused", ok=False))
    assert line.startswith(f"Error: DVC remote 'team' ({url}) refused the credentials (")
    assert "AWS_ACCESS_KEY_ID" in line and "nothing was pushed" in line
    assert "refused" not in _exp_refs(team)
    # what plain `dvc exp push` does instead: the ref goes out, its outputs do not, and its
    # line names no remote
    plain = sh(clone, wrong, "dvc", "exp", "push", "origin", "refused", ok=False)
    assert plain.returncode != 0
    assert "ERROR: failed to push cache: Forbidden" in plain.stderr
    assert "team" not in plain.stderr
    assert "refused" in _exp_refs(team)

    # a bucket that does not exist
    sh(clone, env, "dvc", "remote", "modify", "--local", "team", "url", "s3://no-such-bucket/dvc")
    line = _one_error_line(sh(clone, env, "nnbp-share", "origin", "refused", ok=False))
    assert line == (
        "Error: DVC remote 'team' (s3://no-such-bucket/dvc): 'no-such-bucket' does not exist "
        "(a bucket is made with the storage provider's tools); nothing was pushed"
    )


@pytest.mark.slow
def test_applying_an_experiment_whose_outputs_were_never_pushed_changes_nothing(
    team: Team, off_origin
):
    clone, env = _one_experiment(team, "unshared", "machine-d")
    off_origin.append("unshared")
    sh(clone, env, "dvc", "exp", "push", "--no-cache", "origin", "unshared")  # ref only

    reviewer_env = team.env("reviewer-2")
    reviewer = _clone(team, "reviewer-2", reviewer_env)
    sh(reviewer, reviewer_env, "dvc", "pull")

    def snapshot() -> dict[str, bytes]:
        return {
            str(p.relative_to(reviewer)): p.read_bytes()
            for p in sorted(reviewer.rglob("*"))
            if p.is_file() and ".git" not in p.parts and ".dvc" not in p.parts
        }

    before = snapshot()
    line = _one_error_line(sh(reviewer, reviewer_env, "nnbp-apply", "origin", "unshared", ok=False))
    assert line.startswith("Error: experiment 'unshared''s outputs ")
    assert "models/h25.npz" in line
    assert f"are not on DVC remote 'team' (s3://{team.s3.bucket}/dvc)" in line
    assert line.endswith("nothing was applied, the workspace is as it was")
    assert snapshot() == before
    assert sh(reviewer, reviewer_env, "git", "status", "--porcelain").stdout == ""
