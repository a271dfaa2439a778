"""BLAS threads and OpenBLAS kernels for training: 1 vs 2 (vs all) threads, quiet and beside a
sibling, on the default 400-100-10 problem and the 64-feature one.

Run from the repository root::

    python benchmarks/bench_threads.py                 # --iters 100 --rounds 5
    python benchmarks/bench_threads.py --no-coretype   # skip the kernel comparison

Each measurement is a worker process that times ``nnbp.backprop.fit`` (the lab's rule, float64,
1,000 examples of the real embedded digits, z-scored) for every thread count in turn, interleaved
within the process, so the ratio between thread counts is paired. The kernel comparison runs the
same worker with ``OPENBLAS_CORETYPE`` unset (OpenBLAS picks the CPU's own kernels) and set to
``Haswell`` (AVX2, which every x86-64 CPU from 2013 on runs), alternating from round to round.
"Sibling" is a second process training the same network on one thread for the whole measurement:
what a parallel queue worker, a CI neighbour or a busy laptop does to the cores. Medians of
milliseconds per iteration are printed, then paired ratios. The exit status is always 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _problem(source: str):
    import numpy as np

    from nnbp import datasets
    from nnbp.backprop import init_weights, one_hot, zscore

    d = datasets.load(source, 1000, 0)
    X = zscore(d["X_train"])
    Y = one_hot(d["y_train"].ravel() - 1, 10)
    return X, Y, init_weights([X.shape[0], 100, 10], np.random.default_rng(0))


def worker(source: str, threads: list[int], iters: int, repeats: int) -> None:
    """Print {threads: [seconds per run]} as JSON, thread counts interleaved."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from nnbp.backprop import fit

    X, Y, W = _problem(source)
    times: dict[int, list[float]] = {t: [] for t in threads}
    for r in range(repeats + 1):
        for t in threads[r % len(threads) :] + threads[: r % len(threads)]:
            with threadpool_limits(t, user_api="blas"):
                start = time.perf_counter()
                fit(X, Y, W, tau=0.2, iters=iters)
                if r:  # the first round warms up
                    times[t].append(time.perf_counter() - start)
    core = next((i.get("architecture") for i in threadpool_info() if i["user_api"] == "blas"), "?")
    print(json.dumps({"core": core, "times": times}))


def sibling(source: str) -> None:
    from threadpoolctl import threadpool_limits

    from nnbp.backprop import fit

    X, Y, W = _problem(source)
    with threadpool_limits(1, user_api="blas"):
        while True:
            fit(X, Y, W, tau=0.2, iters=50)


def _run_worker(source: str, threads: list[int], iters: int, repeats: int, coretype: str | None):
    unset = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # both together (see the README)
    env = {k: v for k, v in os.environ.items() if k not in unset}
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    cmd = [sys.executable, __file__, "--worker", source, "--iters", str(iters)]
    cmd += ["--repeats", str(repeats), "--threads", ",".join(map(str, threads))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100, help="iterations per timed run")
    parser.add_argument("--rounds", type=int, default=5, help="worker processes per setting")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per worker")
    parser.add_argument("--no-coretype", action="store_true", help="skip the kernel comparison")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sibling", help=argparse.SUPPRESS)
    parser.add_argument("--threads", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        threads = [int(t) for t in args.threads.split(",")]
        return worker(args.worker, threads, args.iters, args.repeats)
    if args.sibling:
        return sibling(args.sibling)

    cores = len(os.sched_getaffinity(0))
    threads = sorted({1, 2, cores})
    coretypes = [None] if args.no_coretype else [None, "Haswell"]
    print(f"{cores} cores; thread counts {threads}; {args.iters} iterations per run")
    for source in ("mnist", "digits"):
        for condition in ("quiet", "sibling"):
            proc = None
            if condition == "sibling":
                proc = subprocess.Popen([sys.executable, __file__, "--sibling", source], cwd=ROOT)
                time.sleep(2)  # past its start-up
            try:
                runs: dict[str, dict[int, list[float]]] = {}
                names: dict[str, str] = {}
                for r in range(args.rounds):
                    for ct in coretypes[r % len(coretypes) :] + coretypes[: r % len(coretypes)]:
                        res = _run_worker(source, threads, args.iters, args.repeats, ct)
                        key = ct or "default"
                        names[key] = res["core"]
                        for t, ts in res["times"].items():
                            runs.setdefault(key, {}).setdefault(int(t), []).extend(ts)
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait()
            label = "400-100-10" if source == "mnist" else "64-100-10"
            print(f"\n{label}, {condition}:")
            for key, by_threads in runs.items():
                cells = []
                for t in threads:
                    ms = 1e3 * statistics.median(by_threads[t]) / args.iters
                    cells.append(f"{t} thread(s) {ms:6.2f} ms/iter")
                print(f"  kernels {key} ({names[key]}): " + ", ".join(cells))
                for t in threads[1:]:
                    pairs = zip(by_threads[t], by_threads[1], strict=True)
                    ratio = statistics.median(a / b for a, b in pairs)
                    print(f"    {t} threads / 1 thread: {ratio:.2f}")
            if "Haswell" in runs:
                for t in threads:
                    ratio = statistics.median(runs["Haswell"][t]) / statistics.median(
                        runs["default"][t]
                    )
                    print(f"  Haswell / default kernels, {t} thread(s): {ratio:.2f}")


if __name__ == "__main__":
    main()
