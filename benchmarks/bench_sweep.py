"""A sweep of four experiments through DVC's queue with one worker and with two.

Run from the repository root (it works in a temporary clone; the workspace is not touched)::

    python benchmarks/bench_sweep.py                  # 4 experiments, 5,000 iterations each
    python benchmarks/bench_sweep.py --iters 1000     # shorter

The clone first reproduces the default pipeline once (not timed), so that both sweeps start from
the same state: the same baseline commit, the data and prepared arrays in the cache. Each sweep
queues four experiments that change the initial weights' seed (``-S seed=...``, so each re-runs
the three trainings, evaluate and render), runs ``dvc queue start -j J`` and waits until the queue
is empty; the wall time from the start to the last experiment's end is printed, then the ratio.
The two sweeps use different seeds, so neither can be served from DVC's run cache, and the same
network sizes, so they do the same work. Whether the machine was quiet beforehand (load average)
is printed first. The exit status is always 0.
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


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "GIT_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def _run(cmd: list[str], cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out.stdout


def _sweep(repo: Path, jobs: int, seeds: list[int]) -> float:
    _run(["dvc", "exp", "run", "--queue", "-S", f"seed={','.join(map(str, seeds))}"], repo)
    start = time.monotonic()
    _run(["dvc", "queue", "start", "-j", str(jobs)], repo)
    while True:
        status = _run(["dvc", "queue", "status"], repo)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(1)
    elapsed = time.monotonic() - start
    if status.count("Success") < len(seeds) or "Failed" in status:
        sys.exit(f"the -j {jobs} sweep did not succeed:\n{status}")
    _run(["dvc", "queue", "remove", "--success"], repo)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5000, help="training iterations")
    parser.add_argument("--experiments", type=int, default=4)
    args = parser.parse_args()

    load = os.getloadavg()[0]
    print(f"load average before starting: {load:.2f} ({'quiet' if load < 0.3 else 'NOT quiet'})")

    with tempfile.TemporaryDirectory(prefix="nnbp-sweep-") as tmp:
        repo = Path(tmp) / "repo"
        _run(["git", "clone", "--quiet", str(ROOT), str(repo)], ROOT)
        params = (repo / "params.yaml").read_text()
        for key, value in (("iters", args.iters), ("log_every", max(1, args.iters // 10))):
            params = re.sub(rf"^{key}: *\d+", f"{key}: {value}", params, count=1, flags=re.M)
        (repo / "params.yaml").write_text(params)
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@nnbp.invalid"]
        _run(["dvc", "repro", "--quiet"], repo)
        _run([*git, "commit", "--quiet", "--allow-empty", "-am", "baseline"], repo)
        n = args.experiments
        walls = {}
        for jobs, first in ((1, 101), (2, 201)):
            walls[jobs] = _sweep(repo, jobs, list(range(first, first + n)))
            print(f"{n} experiments, dvc queue start -j {jobs}: {walls[jobs]:.1f} s")
        ratio = walls[2] / walls[1]
        verdict = "PASS" if ratio <= 0.7 else "FAIL"
        print(f"ratio -j 2 / -j 1: {ratio:.2f}   (target <= 0.7: {verdict})")


if __name__ == "__main__":
    main()
