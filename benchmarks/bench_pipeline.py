"""Where the wall time of `dvc repro` goes: DVC itself, each stage, start-up and tracking.

Run from the repository root (it works in a temporary clone; the workspace is not touched)::

    python benchmarks/bench_pipeline.py

In a clone of HEAD it runs `dvc repro` once (to fill the cache, not timed), then `dvc repro -f`
(timed: the whole pipeline), and then every stage's own command as DVC printed it, alone, once
with tracking to a fresh SQLite store and once with ``NNBP_TRACKING=off``: the difference is what
MLflow costs, the rest of the stage is its start-up (Python and imports, timed separately) and its
own compute. Times are wall seconds of one run each; say whether the machine was quiet.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IMPORTS = (
    "import numpy, click, matplotlib.pyplot, mlflow, threadpoolctl, tqdm, nnbp.tooling.tracking.run"
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "GIT_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", DVC_NO_ANALYTICS="1", **extra)
    return env


def _timed(cmd: str, cwd: Path, **env: str) -> tuple[float, str]:
    start = time.monotonic()
    out = subprocess.run(cmd, shell=True, cwd=cwd, env=_env(**env), capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if out.returncode:
        sys.exit(f"{cmd} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return elapsed, out.stdout


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="nnbp-pipeline-") as tmp:
        repo = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True)
        _timed("dvc repro", repo)
        total, out = _timed("dvc repro -f", repo)
        stages = re.findall(r"Running stage '([^']+)':\n((?:> .*\n)+)", out)
        print(f"dvc repro -f: {total:.1f} s for {len(stages)} stages")
        startup, _ = _timed(f'{sys.executable} -c "{IMPORTS}"', repo)
        print(f"start-up of one stage process (Python and its imports): {startup:.1f} s\n")
        print(f"{'stage':<16}{'tracked s':>10}{'untracked s':>12}{'MLflow s':>10}")
        alone = 0.0
        for name, lines in stages:
            cmd = " && ".join(line[2:] for line in lines.splitlines())
            # as DVC runs it: train learns its configuration from DVC_STAGE
            tracked, _ = _timed(cmd, repo, NNBP_TRACKING="on", DVC_STAGE=name)
            untracked, _ = _timed(cmd, repo, NNBP_TRACKING="off", DVC_STAGE=name)
            alone += tracked
            print(f"{name:<16}{tracked:>10.1f}{untracked:>12.1f}{tracked - untracked:>10.1f}")
        print(f"\nstages alone: {alone:.1f} s; DVC's own share of the repro: {total - alone:.1f} s")


if __name__ == "__main__":
    main()
