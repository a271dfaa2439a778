"""Threads and blocks: ms per iteration of the default 400-100-10 fit (the lab's rule, 1,000 real
MNIST digits), quiet and beside a sibling process that trains too, against two OpenBLAS threads
and against the lab's own loop as a user runs it.

Run from the repository root::

    python benchmarks/bench_threads.py              # --iters 50 --repeats 12
    python benchmarks/bench_threads.py --kernels    # also: the cost of the pinned kernels

Every contender runs in one worker process, interleaved repeat by repeat (paired: a slow spell
of the shared machine hits them alike), with the kernels the pipeline runs (nnbp pins OpenBLAS's
Haswell kernels and NumPy's AVX2 loops on x86-64 before NumPy loads):

- ``threads 1``, ``threads 2``, ``threads auto``: ``nnbp.training``'s fit, 4 blocks on a pool of
  that many threads, one BLAS thread each (the bits are the same for all three);
- ``openblas 1``, ``openblas 2``: the same fit in one block, OpenBLAS on 1 or 2 threads (what
  ``threads: 1`` and ``-S threads=2`` were before the blocks);
- ``lab loop``: ``nnbp.lab.lab_train``, the lab's loop, at NumPy's default BLAS threads.

"Sibling" is a second process that trains the same network at nnbp's defaults for the whole
measurement, as a second queue worker or a CI neighbour does. Medians and paired ratios are
printed, with issue 25's targets (threads auto at least 1.5x the lab loop's speed quiet, 3x beside
a sibling) and, for information, auto against two OpenBLAS threads (quiet) and against threads 1
(beside a sibling); whether the machine was quiet beforehand (load average) is printed first.
With ``--kernels`` the ``threads auto`` and ``openblas 1`` timings are repeated in a worker with
the CPU's own kernels, paired worker by worker. The exit status is always 0.
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
CONTENDERS = ("threads 1", "threads 2", "threads auto", "openblas 1", "openblas 2", "lab loop")
NATIVE = {"OPENBLAS_CORETYPE": "", "NPY_DISABLE_CPU_FEATURES": ""}  # set, empty: not pinned
TARGETS = {  # condition -> (label, slower, faster, at least): speed ratio = time ratio inverted
    "quiet": [
        ("auto speed / lab loop's (>= 1.5)", "lab loop", "threads auto", 1.5),
    ],
    "sibling": [
        ("auto speed / lab loop's (>= 3)", "lab loop", "threads auto", 3.0),
    ],
}
INFO = {  # printed with the targets, without a verdict
    "quiet": [("auto speed / 2 OpenBLAS threads'", "openblas 2", "threads auto")],
    "sibling": [("auto speed / threads 1's", "threads 1", "threads auto")],
}


def _problem():
    import numpy as np

    from nnbp import datasets
    from nnbp.backprop import init_weights
    from nnbp.labdata import one_hot, zscore

    d = datasets.load("mnist", 1000, 0)
    X = zscore(d["X_train"])
    Y = one_hot(d["y_train"].ravel() - 1, 10)
    return X, Y, init_weights([X.shape[0], 100, 10], np.random.default_rng(0))


def _contenders(X, Y, W, iters: int):
    from threadpoolctl import threadpool_limits

    from nnbp.backprop import fit
    from nnbp.lab import lab_train
    from nnbp.parallel import Pool, thread_count

    def ours(threads: int | str):
        with Pool(thread_count(threads, 4)) as pool:
            fit(X, Y, W, tau=0.2, iters=iters, blocks=4, map_blocks=pool.map)

    def openblas(threads: int):
        with threadpool_limits(threads, user_api="blas"):
            fit(X, Y, W, tau=0.2, iters=iters)

    return {
        "threads 1": lambda: ours(1),
        "threads 2": lambda: ours(2),
        "threads auto": lambda: ours("auto"),
        "openblas 1": lambda: openblas(1),
        "openblas 2": lambda: openblas(2),
        "lab loop": lambda: lab_train(X, Y, W[0].copy(), W[1].copy(), iters=iters),
    }


def worker(names: list[str], iters: int, repeats: int) -> None:
    """Print {"kernels": ..., "times": {name: [seconds per run]}} as JSON, interleaved."""
    from threadpoolctl import threadpool_info

    import nnbp  # noqa: F401  (first: it pins the kernels before NumPy loads)

    X, Y, W = _problem()
    runs = _contenders(X, Y, W, iters)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    blas = next((i for i in threadpool_info() if i["user_api"] == "blas"), {})
    print(json.dumps({"kernels": blas.get("architecture", "?"), "times": times}))


def sibling() -> None:
    import nnbp  # noqa: F401
    from nnbp.backprop import fit
    from nnbp.parallel import Pool, thread_count

    X, Y, W = _problem()
    with Pool(thread_count("auto", 4)) as pool:
        while True:
            fit(X, Y, W, tau=0.2, iters=50, blocks=4, map_blocks=pool.map)


def _run_worker(names: list[str], iters: int, repeats: int, env: dict[str, str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", ",".join(names), "--iters", str(iters)]
    cmd += ["--repeats", str(repeats)]
    out = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(out.stdout)


def _ms(ts: list[float], iters: int) -> float:
    return 1e3 * statistics.median(ts) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50, help="iterations per timed run")
    parser.add_argument("--repeats", type=int, default=12, help="timed runs per contender")
    parser.add_argument("--kernels", action="store_true", help="also time the CPU's own kernels")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sibling", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker.split(","), args.iters, args.repeats)
    if args.sibling:
        return sibling()

    load = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    quiet = "quiet" if load[0] < 0.3 else f"NOT quiet (load average {load[0]:.2f})"
    print(f"{cores} cores; load average {load[0]:.2f} {load[1]:.2f} before starting: {quiet}")
    print(f"{args.repeats} repeats x {args.iters} iterations per contender, paired\n")
    for condition in ("quiet", "sibling"):
        proc = None
        if condition == "sibling":
            proc = subprocess.Popen([sys.executable, __file__, "--sibling"], cwd=ROOT)
            time.sleep(3)  # past its start-up
        try:
            res = _run_worker(list(CONTENDERS), args.iters, args.repeats, {})
            native = None
            if args.kernels:
                pair = ["threads auto", "openblas 1"]
                native = _run_worker(pair, args.iters, args.repeats, NATIVE)
                pinned = _run_worker(pair, args.iters, args.repeats, {})
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
        times = res["times"]
        print(f"{condition} (kernels: {res['kernels']}), ms per iteration:")
        for name in CONTENDERS:
            print(f"  {name:<14}{_ms(times[name], args.iters):7.2f}")
        for label, slow, fast, least in TARGETS[condition]:
            pairs = zip(times[slow], times[fast], strict=True)
            ratio = statistics.median(a / b for a, b in pairs)
            verdict = "PASS" if ratio >= least else "FAIL"
            print(f"  {label:<46}{ratio:6.2f}  {verdict}")
        for label, slow, fast in INFO[condition]:
            pairs = zip(times[slow], times[fast], strict=True)
            print(f"  {label:<46}{statistics.median(a / b for a, b in pairs):6.2f}")
        if native is not None:
            for name in ("threads auto", "openblas 1"):
                ratio = statistics.median(pinned["times"][name]) / statistics.median(
                    native["times"][name]
                )
                print(
                    f"  {name}: pinned ({pinned['kernels']}) / own kernels ({native['kernels']}):"
                    f" {ratio:.2f}"
                )
        print()


if __name__ == "__main__":
    main()
