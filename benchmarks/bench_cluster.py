"""The same grid through ``nnbp-sweep`` on a Dask cluster on this machine and through DVC's queue
(``dvc queue start -j 2``): the wall time of each, and what the cluster path adds to each
experiment (its clone, ``dvc pull``, and sharing it: ``nnbp-share``).

Run from the repository root (it works in a temporary clone; the workspace is not touched)::

    python benchmarks/bench_cluster.py                  # 4 experiments, 1,000 iterations each
    python benchmarks/bench_cluster.py --iters 5000     # the lab's length

The clone is set up as a team's (docs/cluster.md): a bare git repository as ``origin`` and a
folder as the default DVC remote, the baseline reproduced (not timed), committed and pushed. So
``nnbp-sweep -j 2`` takes the cluster path: two task slots, each its clone of ``origin``, ``dvc
pull``, ``dvc exp run``, ``nnbp-share``. (A cluster on this machine shares the repository's DVC
cache, so its pull finds the outputs there: a worker on another machine pulls them once.) Then
``dvc exp run --queue`` of the same number of experiments and ``dvc queue start -j 2``, until
the queue is empty. The two grids use different seeds, so that neither is served from DVC's run
cache, and do the same work. Each wall time runs from the first command to the last
experiment's end. The load average is printed before and after each: the machine may be shared.
The exit status is 0 unless a sweep failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@nnbp.invalid"]
PHASES = re.compile(r"landed from \S+ \(prepare ([\d.]+) s, run ([\d.]+) s, share ([\d.]+) s\)")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "GIT_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("NNBP_CLUSTER_DIR", None)
    return env


def _run(cmd: list[str], cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=7200)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out.stdout


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (5 min: {five:.2f})"


def _team(tmp: Path, iters: int) -> Path:
    """A clone of this repository set up as a team's, its baseline reproduced and pushed."""
    repo = tmp / "repo"
    _run(["git", "clone", "--quiet", str(ROOT), str(repo)], ROOT)
    params = (repo / "params.yaml").read_text()
    for key, value in (("iters", iters), ("log_every", max(1, iters // 10))):
        params = re.sub(rf"^{key}: *\d+", f"{key}: {value}", params, count=1, flags=re.M)
    (repo / "params.yaml").write_text(params)
    _run(["git", "init", "--quiet", "--bare", str(tmp / "origin.git")], tmp)
    _run(["git", "remote", "set-url", "origin", str(tmp / "origin.git")], repo)
    _run(["dvc", "remote", "add", "-d", "team", str(tmp / "dvc-remote")], repo)
    _run(["dvc", "repro", "--quiet"], repo)
    _run([*GIT, "add", "--all"], repo)
    _run([*GIT, "commit", "--quiet", "-m", "baseline"], repo)
    _run(["dvc", "push", "--quiet"], repo)
    _run([*GIT, "push", "--quiet", "origin", "HEAD:main"], repo)
    return repo


def _cluster(repo: Path, seeds: list[int]) -> tuple[float, list[tuple[float, ...]]]:
    """nnbp-sweep -j 2 of ``seeds``: its wall time and each experiment's phases."""
    start = time.monotonic()
    out = _run(["nnbp-sweep", "-j", "2", "-S", f"seed={','.join(map(str, seeds))}"], repo)
    wall = time.monotonic() - start
    phases = [tuple(map(float, m)) for m in PHASES.findall(out)]
    if len(phases) != len(seeds):
        sys.exit(f"nnbp-sweep did not land every experiment:\n{out}")
    return wall, phases


def _queue(repo: Path, seeds: list[int]) -> float:
    """dvc exp run --queue of ``seeds``, then dvc queue start -j 2 until done: the wall time."""
    start = time.monotonic()
    _run(["dvc", "exp", "run", "--queue", "-S", f"seed={','.join(map(str, seeds))}"], repo)
    _run(["dvc", "queue", "start", "-j", "2"], repo)
    while True:
        status = _run(["dvc", "queue", "status"], repo)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(1)
    wall = time.monotonic() - start
    if status.count("Success") < len(seeds) or "Failed" in status:
        sys.exit(f"the queue did not succeed:\n{status}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=1000, help="training iterations")
    parser.add_argument("--experiments", type=int, default=4)
    args = parser.parse_args()
    n = args.experiments
    print(f"{os.cpu_count()} cores; before the set-up: {_load()}")
    with tempfile.TemporaryDirectory(prefix="nnbp-cluster-") as tmp:
        repo = _team(Path(tmp), args.iters)
        print(f"{n} experiments of {args.iters} iterations, 2 at a time")
        print(f"before nnbp-sweep: {_load()}")
        cluster, phases = _cluster(repo, list(range(101, 101 + n)))
        print(f"nnbp-sweep -j 2 (a Dask cluster on this machine): {cluster:.1f} s")
        print(f"before the queue: {_load()}")
        queue = _queue(repo, list(range(201, 201 + n)))
        print(f"dvc exp run --queue + dvc queue start -j 2: {queue:.1f} s")
        print(f"after: {_load()}")
    prepare, run, share = (sum(p[i] for p in phases) / n for i in range(3))
    print(
        f"per experiment on the cluster path (mean of {n}): clone, checkout and dvc pull "
        f"{prepare:.1f} s, dvc exp run {run:.1f} s, nnbp-share {share:.1f} s: "
        f"{prepare + share:.1f} s of overhead"
    )
    print(f"ratio nnbp-sweep / dvc queue: {cluster / queue:.2f}")


if __name__ == "__main__":
    main()
