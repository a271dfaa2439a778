"""nnbp-sweep on a Dask cluster of real processes (docs/cluster.md): `dask scheduler`, two `dask
worker` machines under their own host names (tests/cluster.py), the team's bare git remote, moto's
S3 server behind the DVC remote and the team's MLflow server with auth.

One sweep of five experiments, one of them with a bad value, during which machine-b is killed
with SIGKILL while it trains and machine-c joins: the grid lands all the same, every experiment
once, the bad one fails once with its line, the dead worker's processes die with it and its run
is closed as FAILED by its stopped heartbeat. Then what a reviewer sees, and the same grid
again, which runs nothing. And the mistakes a submitter can make, each one line before anything
is submitted.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask
import pytest
from click.testing import CliRunner

from nnbp.tooling.cluster import expand
from nnbp.tooling.console import sweep as sweep_command
from tests.cluster import STALE, Cluster, gone, kill, team_repository
from tests.project import BIN, clean_env, sh
from tests.servers import Api, free_port, start_s3_server, stop_server, wait_until
from tests.store import Run, server_runs

VALUES = ("1", "2", "3", "4")
SEEDS = f"seed={','.join(VALUES)}"
GOOD, ALL = len(VALUES), len(VALUES) + 1  # the grid's experiments: the seeds, and the bad value
BAD = "-1"  # not a seed: the stage says so in one line
BAD_LINE = "params.yaml: seed = -1: must be >= 0"


@dataclass
class Team:
    origin: Path
    submitter: Path  # a member's clone, which submits the grid
    cluster: Cluster
    api: Api
    worker_env: dict[str, str]
    root: Path
    lead: Path  # the lead's clone, with the baseline's outputs in its DVC cache

    def sweep(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        cmd = [str(BIN / "nnbp-sweep"), "--scheduler", self.cluster.address, *args]
        return subprocess.Popen(
            cmd,
            cwd=self.submitter,
            env=env or clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def runs(self, filter_string: str = "") -> list[Run]:
        """The project's MLflow runs on the team's server."""
        return server_runs(self.api, filter_string)

    def exp_refs(self) -> list[str]:
        listed = sh(self.root, clean_env(), "git", "ls-remote", str(self.origin), "refs/exps/*")
        return [line.split("/")[-1] for line in listed.stdout.splitlines()]


@pytest.fixture(scope="module")
def team(tmp_path_factory, team_tracking) -> Iterator[Team]:
    server, member = team_tracking
    root = tmp_path_factory.mktemp("cluster")
    s3_proc, s3 = start_s3_server(root)
    cluster = Cluster(root)
    try:
        cluster.start_scheduler()  # the machines start while the lead sets the team up
        worker_env = clean_env(**member, **s3.env())
        for machine in ("machine-a", "machine-b"):
            cluster.start_worker(machine, worker_env)
        origin, lead = team_repository(root, s3)
        sh(root, clean_env(), "git", "clone", "--quiet", str(origin), "submitter")
        cluster.wait_for_workers(2)
        api = Api(
            server.url, member["MLFLOW_TRACKING_USERNAME"], member["MLFLOW_TRACKING_PASSWORD"]
        )
        yield Team(origin, root / "submitter", cluster, api, worker_env, root, lead)
    finally:
        cluster.stop()
        stop_server(s3_proc)


@dataclass
class Swept:
    result: subprocess.CompletedProcess
    killed: str  # the experiment machine-b was training when it was killed
    gone_at: float  # when machine-b's task processes had ended, after its worker
    names: dict[str, str]  # experiment -> its -S settings, from the table


@pytest.fixture(scope="module")
def swept(team: Team) -> Swept:
    """The grid, with machine-b killed (SIGKILL) while it trains an experiment, and machine-c
    started then."""
    proc = team.sweep("-S", f"{SEEDS},{BAD}")
    try:
        training = wait_until(
            "machine-b training",
            lambda: team.runs(
                "tags.`nnbp.machine` = 'machine-b' and attributes.status = 'RUNNING'"
            ),
            timeout=120,
        )
        worker = team.cluster.worker_process("machine-b")
        tree = worker.children(recursive=True)
        assert any("stages/train.py" in " ".join(p.cmdline()) for p in tree), tree
        kill(worker)
        wait_until("its task's processes ended with it", lambda: gone(tree), timeout=15)
        gone_at = time.time()
        team.cluster.start_worker("machine-c", team.worker_env)
        out, err = proc.communicate(timeout=400)  # a loaded machine: the suite's 3 workers
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    (team.root / "nnbp-sweep.out").write_text(out + err)  # for a failure's reader
    rows = re.findall(r"^(sweep-[0-9a-f]{10})  +(seed=-?\d+)", out, flags=re.M)
    return Swept(result, training[0].tags["dvc_experiment"], gone_at, dict(rows))


@pytest.mark.slow
def test_the_grid_lands_once_though_a_worker_died(team: Team, swept: Swept):
    out = swept.result.stdout
    assert swept.result.returncode == 1, (out, swept.result.stderr)  # the bad value
    assert out.startswith(f"{ALL} experiments of commit "), out  # one per value, none before
    first = out.splitlines()[0]
    assert f"0 already in git remote 'origin', {ALL} to run on tcp://127.0.0.1:" in first
    assert sorted(swept.names.values()) == [f"seed={s}" for s in (BAD, *VALUES)], out
    # every experiment once on the remote: the killed one was run again elsewhere
    refs = team.exp_refs()
    good = {n for n, s in swept.names.items() if s != f"seed={BAD}"}
    assert sorted(refs) == sorted(good), out
    assert swept.killed in good
    started = re.findall(rf"{swept.killed} started on (machine-\w)", out)
    assert started[0] == "machine-b" and started[-1] in ("machine-a", "machine-c"), out
    again = f"{swept.killed} started on {started[-1]} (again: its worker on machine-b was lost)"
    assert again in out
    table = out[out.index("\nexperiment ") :]
    assert f"\n{GOOD} of {ALL} experiments are in git remote 'origin'; here: dvc exp show" in table


@pytest.mark.slow
def test_a_bad_value_fails_once_with_its_line_and_the_rest_land(team: Team, swept: Swept):
    out, err = swept.result.stdout, swept.result.stderr
    (bad,) = [n for n, s in swept.names.items() if s == f"seed={BAD}"]
    assert len(re.findall(rf"{bad} started on ", out)) == 1, out  # not retried
    line = f"dvc exp run: {BAD_LINE}"
    assert re.search(rf"^{bad}  +seed=-1  +failed: {re.escape(line)}$", out, re.M), out
    assert err == (
        f"Error: 1 of {ALL} experiments did not land ({bad}: {line}); the same command runs them "
        "again\n"
    )
    assert "Traceback" not in out


@pytest.mark.slow
def test_mlflow_holds_one_finished_run_per_experiment_and_the_dead_one_failed(
    team: Team, swept: Swept
):
    runs = team.runs()
    by_exp: dict[str, list[dict]] = {}
    for run in runs:
        by_exp.setdefault(run.tags["dvc_experiment"], []).append(run)
    good = {n for n, s in swept.names.items() if s != f"seed={BAD}"}
    assert set(by_exp) == good  # the bad value trained nothing
    for name, found in by_exp.items():
        finished = [r for r in found if r.status == "FINISHED"]
        assert len(finished) == 1, (name, [r.status for r in found])
        (run,) = finished
        assert run.params["config"] == "h25"
        assert run.params["seed"] == swept.names[name].removeprefix("seed=")
        assert run.name == f"h25 ({name})"
        assert run.tags["nnbp.machine"] in ("machine-a", "machine-b", "machine-c")
    (dead,) = [r for r in by_exp[swept.killed] if r.status != "FINISHED"]
    assert dead.status == "FAILED"
    assert dead.tags["nnbp.machine"] == "machine-b"
    why = dead.tags["nnbp.orphaned"]
    assert why.startswith("no heartbeat from machine machine-b (process "), why
    assert f"more than the {STALE} s allowed (NNBP_HEARTBEAT_TIMEOUT)" in why
    assert re.search(r"closed as FAILED by the next run \(train@h25\) on machine-[ac]$", why)
    # its end is its last sign of life, before its processes were gone
    assert dead.end_time <= swept.gone_at * 1000


def _exp_show(repo: Path) -> dict[str, tuple[int, dict]]:
    """name -> (seed, metrics) of each experiment `dvc exp show` lists in ``repo``."""
    shown = json.loads(sh(repo, clean_env(), "dvc", "exp", "show", "--json").stdout)
    listed = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            (rev,) = exp["revs"]
            data = rev["data"]
            listed[exp["name"]] = (
                data["params"]["params.yaml"]["data"]["seed"],
                data["metrics"]["reports/metrics.json"]["data"],
            )
    return listed


@pytest.mark.slow
def test_a_reviewer_lists_every_experiment_with_its_metrics(team: Team, swept: Swept):
    env = clean_env()
    sh(team.root, env, "git", "clone", "--quiet", str(team.origin), "reviewer")
    reviewer = team.root / "reviewer"
    sh(reviewer, env, "dvc", "exp", "pull", "--no-cache", "origin")
    listed = _exp_show(reviewer)
    assert {n: f"seed={s}" for n, (s, _) in listed.items()} == {
        n: s for n, s in swept.names.items() if s != f"seed={BAD}"
    }
    for _, metrics in listed.values():
        assert set(metrics) == {"h25"} and 0 < metrics["h25"]["test_acc"] <= 100
    # the submitter's table: the same values, best mean test accuracy first
    table = swept.result.stdout.split("\nexperiment ", 1)[1]
    shown_acc = re.findall(r"^(sweep-\w+)  +seed=\d  +([\d.]+)  +([\d.]+)$", table, re.M)
    assert [n for n, _, _ in shown_acc] == sorted(
        listed, key=lambda n: -listed[n][1]["h25"]["test_acc"]
    )
    for name, h25, mean in shown_acc:
        assert float(h25) == pytest.approx(listed[name][1]["h25"]["test_acc"], abs=0.005)
        assert mean == h25


@pytest.mark.slow
def test_the_same_grid_again_runs_nothing(team: Team, swept: Swept):
    runs_before = len(team.runs())
    proc = team.sweep("-S", SEEDS, "--sort-by", "h25.loss")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (out, err)
    assert f"{GOOD} already in git remote 'origin', 0 to run" in out.splitlines()[0]
    assert " started on " not in out
    assert "here: dvc exp show --sort-by h25.loss --sort-order asc" in out
    assert len(team.runs()) == runs_before
    assert len(team.exp_refs()) == GOOD


def _one_line(args: list[str], status: int) -> str:
    """nnbp-sweep ARGS run in this process (Click's runner; the cwd is the submitter's clone):
    its one error line, after it exited with ``status``."""
    result = CliRunner().invoke(sweep_command, args)
    assert result.exit_code == status, (result.output, result.exception)
    assert "Traceback" not in result.output
    (line,) = result.stderr.splitlines()
    return line


@pytest.mark.slow
def test_a_submitters_mistakes_are_one_line_and_submit_nothing(team: Team, monkeypatch):
    monkeypatch.chdir(team.submitter)
    line = _one_line(["-S", "lamb=0,["], 2)
    assert line.startswith("Error: -S 'lamb=0,[': not an override DVC can read (")
    line = _one_line(["-S", "seed=1", "--sort-by", "h25.accuracy"], 2)
    assert line.startswith("Error: --sort-by 'h25.accuracy': no metric 'accuracy' (one of ")
    line = _one_line(["-S", "nokey=1"], 2)
    assert line.startswith("Error: -S nokey=1: DVC cannot apply it to params.yaml (")

    dead = f"tcp://127.0.0.1:{free_port()}"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        line = _one_line(["--scheduler", dead, "-S", "seed=7"], 1)
    assert line.startswith(f"Error: Dask scheduler {dead} cannot be reached (")
    assert line.endswith("nothing was submitted")

    sh(team.submitter, clean_env(), "git", "commit", "--quiet", "--allow-empty", "-m", "local")
    try:
        line = _one_line(["--scheduler", team.cluster.address, "-S", "seed=7"], 1)
    finally:
        sh(team.submitter, clean_env(), "git", "reset", "--quiet", "--hard", "HEAD~1")
    assert re.fullmatch(
        r"Error: commit [0-9a-f]{7} is not on git remote 'origin', whose workers clone it: push "
        r"it first \(`git push origin HEAD:BRANCH`\); nothing was submitted",
        line,
    ), line
    assert len(team.exp_refs()) == GOOD


def test_the_grid_is_dvcs_product_of_the_settings():
    assert expand(["lamb=0,0.001", "seed=1,2"]) == [
        {"params.yaml": ["lamb=0", "seed=1"]},
        {"params.yaml": ["lamb=0", "seed=2"]},
        {"params.yaml": ["lamb=0.001", "seed=1"]},
        {"params.yaml": ["lamb=0.001", "seed=2"]},
    ]
    assert expand(["lamb=0.1"]) == [{"params.yaml": ["lamb=0.1"]}]


@pytest.mark.slow
def test_ctrl_c_cancels_the_experiments_not_started(team: Team, tmp_path: Path):
    from distributed import Client

    idle = Cluster(tmp_path)  # a scheduler that no worker has joined: nothing starts
    idle.start_scheduler()
    lines: list[str] = []
    try:
        idle.wait_for_workers(0)
        cmd = [str(BIN / "nnbp-sweep"), "--scheduler", idle.address, "-S", "seed=7,8,9"]
        proc = subprocess.Popen(
            cmd,
            cwd=team.submitter,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        wait_until("submitted", lambda: any("no worker is connected" in x for x in lines), 60)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        reader.join(timeout=10)
        assert proc.stderr.read() == "interrupted (Ctrl-C): stopped; no output is half-written\n"
        assert lines[-1] == (
            "interrupted: 3 experiments not started cancelled (the same command again runs what "
            "did not land)\n"
        )
        with Client(idle.address, timeout=30) as client:

            def forgotten() -> bool:
                return client.run_on_scheduler(lambda dask_scheduler: not dask_scheduler.tasks)

            wait_until("the scheduler forgot them", forgotten, timeout=30)
    finally:
        idle.stop()


@pytest.mark.slow
def test_without_a_git_remote_the_grid_lands_in_this_repository(team: Team):
    """A laptop: no --scheduler and no git remote, so a Dask cluster of this machine whose tasks
    clone this repository, take the outputs from its DVC cache and push the experiment back."""
    env = clean_env()
    sh(team.lead, env, "git", "remote", "remove", "origin")
    try:
        result = sh(team.lead, env, "nnbp-sweep", "-S", "seed=8", ok=False, timeout=400)
    finally:
        sh(team.lead, env, "git", "remote", "add", "origin", str(team.origin))
    out = result.stdout
    assert result.returncode == 0, (out, result.stderr)
    assert out.splitlines()[0].endswith(
        ": 0 already in this repository, 1 to run on a Dask cluster on this machine (1 task slot)"
    )
    (name,) = re.findall(r"^(sweep-[0-9a-f]{10})  +seed=8  +[\d.]+  +[\d.]+$", out, re.M)
    assert "\n1 of 1 experiments are in this repository; here: dvc exp show\n" in out
    seed, metrics = _exp_show(team.lead)[name]
    assert seed == 8 and 0 < metrics["h25"]["test_acc"] <= 100
    assert (team.lead / ".dvc" / "tmp" / "cluster").is_dir()  # its slots, beside DVC's own
    assert name not in team.exp_refs()  # nothing went to the team
