"""The iteration against its own matrix products (issue 25): ms per iteration of the default
400-100-10 fit (the lab's rule, 1,000 real MNIST digits in 4 blocks) and of the five matrix
products it does per block, alone, with the same shapes, blocks, buffers, kernels and threads.

Run from the repository root::

    python benchmarks/bench_bound.py                 # --iters 40 --repeats 12
    python benchmarks/bench_bound.py --quiet-only    # no sibling

Every contender runs in one worker process, interleaved repeat by repeat (paired: a slow spell
of the shared machine hits them alike), with the kernels the pipeline runs (nnbp pins OpenBLAS's
Haswell kernels and NumPy's AVX2 loops on x86-64 before NumPy loads):

- ``products 1``, ``products auto``: for each block, W^1 [1; X], W^2 [1; y^2], the nabla_{W^2}
  product, (W^2 without bias)^T delta^3 and the nabla_{W^1} product, into the buffers fit uses
  (``nnbp.backprop.Block``), on one BLAS thread; the blocks in order, or through a
  ``nnbp.parallel.Pool`` of as many threads as ``threads auto`` uses;
- ``threads 1``, ``threads auto``: ``nnbp.backprop.fit`` with those 4 blocks on such a pool;
- ``xla loop``, ``xla step``: the lab's loop in JAX (float64, one thread, AVX2 at most), inside a
  jitted ``fori_loop`` and as a jitted step called once per iteration; checked against
  ``nnbp.lab.lab_train`` after 20 iterations. Skipped if JAX is not installed (the ``bench``
  extra: ``pip install -e .[bench]``).

"Sibling" is a second process that trains the same network at nnbp's defaults for the whole
measurement, as a second queue worker or a CI neighbour does. Medians and paired ratios are
printed with the issue's targets, then (quiet) where the time beyond the products goes: each
kind of work of an iteration timed alone on the same buffers, on one thread, and the rest
(Python, the pool's wake-ups and waits, an uneven share of blocks) by difference. The load
average is printed before each condition, and after it the CPU that other processes took while
it was measured (``/proc/stat`` less this benchmark's own processes): on a shared machine, a
ratio measured beside someone else's work says little. The exit status is always 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES, N, BLOCKS, TAU = [400, 100, 10], 1000, 4, 0.2
OURS = ("products 1", "products auto", "threads 1", "threads auto")
PEERS = ("xla loop", "xla step")
# One thread, ISA capped at AVX2 like nnbp's kernels; unknown flags would abort XLA.
XLA_FLAGS = (
    "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 --xla_cpu_max_isa=AVX2"
)
TARGETS = {  # condition -> (label, numerator, denominator, scale of the denominator, at most)
    "quiet": [
        ("threads 1 / products 1 (<= 1.2)", "threads 1", "products 1", 1.0, 1.2),
        ("threads auto / (products 1 / 2) (<= 1.2)", "threads auto", "products 1", 0.5, 1.2),
    ],
    "sibling": [
        ("threads auto / threads 1 (<= 1)", "threads auto", "threads 1", 1.0, 1.0),
    ],
}
INFO = [  # printed in both conditions
    ("threads auto / products auto", "threads auto", "products auto", 1.0),
    ("xla loop / threads 1", "xla loop", "threads 1", 1.0),
    ("xla loop / threads auto", "xla loop", "threads auto", 1.0),
]


def _problem():
    import numpy as np

    from nnbp import datasets
    from nnbp.backprop import init_weights
    from nnbp.labdata import one_hot, zscore

    d = datasets.load("mnist", N, 0)
    X = zscore(d["X_train"])
    Y = one_hot(d["y_train"].ravel() - 1, SIZES[-1])
    return X, Y, init_weights(SIZES, np.random.default_rng(0))


def _blocks(X, Y, W, map_blocks):
    """The blocks fit would make, with their buffers filled by one forward and backward pass."""
    import numpy as np

    from nnbp.backprop import Block, Net, exact_first_phase
    from nnbp.parallel import Blocks

    net = Net([np.array(w) for w in W], X.shape[1])
    blocks = Blocks.split(
        X.shape[1], BLOCKS, lambda a, b: Block(net.W, X[:, a:b], Y[:, a:b].copy()), map_blocks
    )
    with np.errstate(over="ignore", invalid="ignore"):
        blocks.run(lambda p: exact_first_phase(p, net))
    return net, blocks


def _products(block, net) -> None:
    """The five matrix products of one block's iteration, into its own buffers."""
    import numpy as np

    (W1, W2), (A1, A2) = net.W, block.A
    np.matmul(W1, A1, out=A2[1:])
    np.matmul(W2, A2, out=block.out)
    np.matmul(block.delta[2], A2.T, out=block.G[1])
    np.matmul(net.Wbar[1], block.delta[2], out=block.delta[1])
    np.matmul(block.delta[1], A1.T, out=block.G[0])


def _contenders(X, Y, W, iters: int, threads: int) -> dict[str, Callable[[], None]]:
    from nnbp.backprop import fit
    from nnbp.parallel import Pool

    def products(n_threads: int) -> None:
        with Pool(n_threads) as pool:
            net, blocks = _blocks(X, Y, W, pool.map)
            for _ in range(iters):
                blocks.run(lambda p: _products(p, net))

    def ours(n_threads: int) -> None:
        with Pool(n_threads) as pool:
            fit(X, Y, W, tau=TAU, iters=iters, blocks=BLOCKS, map_blocks=pool.map)

    return {
        "products 1": lambda: products(1),
        "products auto": lambda: products(threads),
        "threads 1": lambda: ours(1),
        "threads auto": lambda: ours(threads),
    }


def _xla(X, Y, W, iters: int) -> tuple[dict[str, Callable[[], None]], float] | None:
    """The lab's loop in JAX, and its largest difference from lab_train after 20 iterations."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    import numpy as np

    from nnbp.lab import lab_train

    jax.config.update("jax_enable_x64", True)
    n = X.shape[1]
    X1b = jnp.asarray(np.vstack([np.ones((1, n)), X]))
    Yj = jnp.asarray(Y)

    def sigmoid(z):
        return 1 / (1 + jnp.exp(-z))

    def step(W1, W2):  # nnbp.lab.lab_train's loop body, line for line
        Y2 = sigmoid(W1 @ X1b)
        Y2b = jnp.vstack([jnp.ones((1, n)), Y2])
        Y3 = sigmoid(W2 @ Y2b)
        D3 = Y3 - Yj
        W2 = W2 - TAU * (1 / n * (D3 @ Y2b.T))
        s = sigmoid(Y2)
        D2 = (W2[:, 1:].T @ D3) * (s * (1 - s))
        W1 = W1 - TAU * (1 / n * (D2 @ X1b.T))
        return W1, W2

    jstep = jax.jit(step)
    loop = jax.jit(
        lambda W1, W2, k: jax.lax.fori_loop(0, k, lambda _, w: step(*w), (W1, W2)),
        static_argnums=2,
    )
    W1, W2 = jnp.asarray(W[0]), jnp.asarray(W[1])
    got = [np.asarray(w) for w in loop(W1, W2, 20)]
    want = lab_train(X, Y, W[0].copy(), W[1].copy(), tau=TAU, iters=20)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(got, want, strict=True))

    def stepped() -> None:
        w = (W1, W2)
        for _ in range(iters):
            w = jstep(*w)
        jax.block_until_ready(w)

    loop(W1, W2, iters)  # compiled for this count before timing
    stepped()
    runs = {"xla loop": lambda: jax.block_until_ready(loop(W1, W2, iters)), "xla step": stepped}
    return runs, diff


def _breakdown(X, Y, W, iters: int, repeats: int) -> dict[str, float]:
    """ms per iteration of each kind of work of the lab's iteration alone, on one thread, and of
    the whole iteration (fit, threads 1), interleaved; medians."""
    import numpy as np

    from nnbp.backprop import fit, sigmoid
    from nnbp.parallel import Pool

    with Pool(1) as pool:
        net, blocks = _blocks(X, Y, W, pool.map)
        parts = blocks.parts

        def exps() -> None:  # the sigmoid's exp: y^2, y^3 and the lab's sigma(y^2)
            for p in parts:
                np.exp(p.A[1][1:], out=p.s[1])
                np.exp(p.out, out=p.s[2])
                np.exp(p.A[1][1:], out=p.s[1])

        def sigmoids() -> None:  # the same three sigmoids, whole
            for p in parts:
                sigmoid(p.A[1][1:], out=p.s[1])
                sigmoid(p.out, out=p.s[2])
                sigmoid(p.A[1][1:], out=p.s[1])

        def deltas() -> None:  # delta^3 = y^3 - Y, delta^2 *= s, s = 1 - s, delta^2 *= s
            for p in parts:
                np.subtract(p.out, p.Y, out=p.s[2])
                np.multiply(p.delta[1], p.s[1], out=p.delta[1])
                np.subtract(1, p.s[1], out=p.s[1])
                np.multiply(p.delta[1], p.s[1], out=p.delta[1])
                bool(np.isfinite(p.out).all())

        def updates() -> None:  # the blocks' nablas summed, scaled and applied, both layers
            for l in (1, 0):
                net.step(blocks, l, 0.0, 0.0)  # tau 0: the same passes, the weights unchanged

        def products() -> None:
            for p in parts:
                _products(p, net)

        kinds = {"products": products, "exp": exps, "sigmoids": sigmoids}
        kinds |= {"delta passes": deltas, "sums and updates": updates}
        times: dict[str, list[float]] = {k: [] for k in [*kinds, "iteration"]}
        with np.errstate(over="ignore", invalid="ignore"):
            for _ in range(repeats):
                for name, fn in kinds.items():
                    start = time.perf_counter()
                    for _ in range(iters):
                        fn()
                    times[name].append(time.perf_counter() - start)
                start = time.perf_counter()
                fit(X, Y, W, tau=TAU, iters=iters, blocks=BLOCKS, map_blocks=pool.map)
                times["iteration"].append(time.perf_counter() - start)
    return {k: _ms(v, iters) for k, v in times.items()}


def worker(names: list[str], iters: int, repeats: int, breakdown: bool) -> None:
    """Print {"kernels", "threads", "xla_diff", "times": {name: [s per run]}, "breakdown"}."""
    from threadpoolctl import threadpool_info

    import nnbp  # noqa: F401  (first: it pins the kernels before NumPy loads)
    from nnbp.parallel import thread_count

    X, Y, W = _problem()
    threads = thread_count("auto", BLOCKS)
    runs = _contenders(X, Y, W, iters, threads)
    xla_diff = None
    peer = _xla(X, Y, W, iters) if any(n in PEERS for n in names) else None
    if peer is not None:
        runs |= peer[0]
        xla_diff = peer[1]
    names = [n for n in names if n in runs]
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    blas = next((i for i in threadpool_info() if i["user_api"] == "blas"), {})
    result = {"kernels": blas.get("architecture", "?"), "threads": threads, "times": times}
    parts = _breakdown(X, Y, W, iters, repeats) if breakdown else None
    result |= {"xla_diff": xla_diff, "breakdown": parts}
    print(json.dumps(result))


def sibling() -> None:
    import nnbp  # noqa: F401
    from nnbp.backprop import fit
    from nnbp.parallel import Pool, thread_count

    X, Y, W = _problem()
    with Pool(thread_count("auto", BLOCKS)) as pool:
        while True:
            fit(X, Y, W, tau=TAU, iters=50, blocks=BLOCKS, map_blocks=pool.map)


def _run_worker(iters: int, repeats: int, breakdown: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", ",".join(OURS + PEERS), "--iters", str(iters)]
    cmd += ["--repeats", str(repeats)] + (["--breakdown"] if breakdown else [])
    env = {**os.environ, "XLA_FLAGS": XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.splitlines()[-1])


def _busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have used since boot (``/proc/stat``)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds used by this process and its finished children (the workers, the sibling)."""
    import resource

    me, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _ms(ts: list[float], iters: int) -> float:
    return 1e3 * statistics.median(ts) / iters


def _ratio(times: dict[str, list[float]], num: str, den: str, scale: float) -> float | None:
    if num not in times or den not in times:
        return None
    return statistics.median(a / (scale * b) for a, b in zip(times[num], times[den], strict=True))


def _report(condition: str, res: dict, iters: int) -> None:
    times = res["times"]
    print(
        f"{condition} (kernels: {res['kernels']}; auto = {res['threads']} threads), ms/iteration:"
    )
    for name in OURS + PEERS:
        if name in times:
            print(f"  {name:<16}{_ms(times[name], iters):7.2f}")
    if res["xla_diff"] is None:
        print("  xla: skipped, JAX is not installed (pip install -e .[bench])")
    else:
        diff = res["xla_diff"]
        verdict = "ok" if diff <= 1e-12 else "DIFFERS"
        print(f"  xla check: max |xla - lab_train| after 20 iterations {diff:.1e} {verdict}")
    for label, num, den, scale, most in TARGETS[condition]:
        ratio = _ratio(times, num, den, scale)
        assert ratio is not None
        print(f"  {label:<44}{ratio:6.2f}  {'PASS' if ratio <= most else 'FAIL'}")
    for label, num, den, scale in INFO:
        ratio = _ratio(times, num, den, scale)
        if ratio is not None:
            print(f"  {label:<44}{ratio:6.2f}")
    parts = res["breakdown"]
    if parts is not None:
        total = parts["iteration"]
        kinds = ("products", "sigmoids", "delta passes", "sums and updates")
        work = sum(parts[k] for k in kinds)
        print("  where threads 1's iteration goes (each kind alone, one thread, medians):")
        print(f"    {'iteration':<20}{total:6.2f}  (fit, threads 1, timed beside these)")
        for name in kinds:
            print(f"    {name:<20}{parts[name]:6.2f}")
            if name == "sigmoids":
                print(f"      of which exp    {parts['exp']:6.2f}")
        print(f"    {'the rest':<20}{total - work:6.2f}  (Python calls, by difference)")
        share = (work - parts["sums and updates"]) / res["threads"] + parts["sums and updates"]
        auto = _ms(times["threads auto"], iters)
        print(
            f"  threads auto beyond its threads' share of that work ({share:.2f}):"
            f" {auto - share:.2f} (Python calls, wake-ups and waits, an uneven share of blocks)"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=40, help="iterations per timed run")
    parser.add_argument("--repeats", type=int, default=12, help="timed runs per contender")
    parser.add_argument("--quiet-only", action="store_true", help="no sibling condition")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--breakdown", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sibling", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker.split(","), args.iters, args.repeats, args.breakdown)
    if args.sibling:
        return sibling()

    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores; {args.repeats} repeats x {args.iters} iterations per contender, paired")
    for condition in ("quiet",) if args.quiet_only else ("quiet", "sibling"):
        load = os.getloadavg()  # it lags: the previous condition's own work is in it
        print(f"load average {load[0]:.2f} {load[1]:.2f} before {condition}")
        busy, own, start = _busy_seconds(), _own_seconds(), time.perf_counter()
        proc = None
        if condition == "sibling":
            proc = subprocess.Popen([sys.executable, __file__, "--sibling"], cwd=ROOT)
            time.sleep(3)  # past its start-up
        try:
            res = _run_worker(args.iters, args.repeats, breakdown=condition == "quiet")
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
        if busy is not None:  # what the load average cannot tell: others' work meanwhile
            others = (_busy_seconds() - busy) - (_own_seconds() - own)  # type: ignore[operator]
            cores = max(others, 0.0) / (time.perf_counter() - start)
            quiet = "quiet" if cores < 0.1 else "NOT quiet: the ratios are doubtful"
            print(f"other processes' CPU while measuring: {cores:.2f} cores on average ({quiet})")
        _report(condition, res, args.iters)


if __name__ == "__main__":
    main()
