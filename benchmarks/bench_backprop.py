"""Time nnbp.backprop.fit against the lab's own training loop (nnbp.lab.lab_train).

Run from the repository root::

    python benchmarks/bench_backprop.py            # --iters 50 --repeats 60
    python benchmarks/bench_backprop.py --iters 100 --repeats 5 --threads 1

The problem is the lab's second configuration, a 400-100-10 network on 1000 examples; the data
are seeded standard-normal features z-scored per example with ``nnbp.backprop.zscore`` and
uniformly random labels 0..9 (timing does not depend on what the pixels look like). Every
contender starts from the same weights. Within each repeat the contenders run one after the
other, in an order rotated from repeat to repeat, so machine noise hits them alike. Medians over
repeats are printed; each ratio is the median over repeats of the ratio within a repeat (paired,
so a slow spell of the shared machine cancels out), with the ratio of the best times beside it.
Short runs and many repeats make the interleaving fine and the pairing good. Targets are printed
with PASS/FAIL; the exit status is always 0."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from nnbp.backprop import fit, init_weights, sigmoid
from nnbp.lab import lab_train
from nnbp.labdata import one_hot, zscore

SIZES = [400, 100, 10]
TARGETS = (  # (label, numerator, denominator, comparison, threshold)
    ("lab / ours-f64", "lab", "ours-f64", ">=", 1.4),
    ("lab / ours-f32", "lab", "ours-f32", ">=", 2.0),
    ("ours-f64 / matmul-only", "ours-f64", "matmul-only", "<=", 1.5),
)


def make_problem(n: int, seed: int):
    rng = np.random.default_rng(seed)
    X = zscore(rng.normal(size=(SIZES[0], n)))
    Y = one_hot(rng.integers(0, SIZES[-1], n), SIZES[-1])
    return X, Y, init_weights(SIZES, rng)


def matmul_only(X: np.ndarray, Y: np.ndarray, weights, iters: int) -> None:
    """Only the matrix products ``fit`` does per iteration, into the same kind of buffers."""
    W1, W2 = (np.array(W) for W in weights)
    n = X.shape[1]
    A1 = np.empty((X.shape[0] + 1, n))
    A1[0], A1[1:] = 1.0, X
    A2 = np.empty((W1.shape[0] + 1, n))
    A2[0] = 1.0
    Y_L = np.empty((W2.shape[0], n))
    G1, G2 = np.empty_like(W1), np.empty_like(W2)
    delta2 = np.empty((W1.shape[0], n))
    np.matmul(W1, A1, out=A2[1:])
    sigmoid(A2[1:], out=A2[1:])
    delta3 = sigmoid(W2 @ A2) - Y
    for _ in range(iters):
        np.matmul(W1, A1, out=A2[1:])
        np.matmul(W2, A2, out=Y_L)
        np.matmul(delta3, A2.T, out=G2)
        np.matmul(W2[:, 1:].T, delta3, out=delta2)
        np.matmul(delta2, A1.T, out=G1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50, help="iterations per timed run")
    parser.add_argument("--repeats", type=int, default=60, help="timed runs per contender")
    parser.add_argument("--n", type=int, default=1000, help="number of training examples")
    parser.add_argument("--tau", type=float, default=0.2)
    parser.add_argument("--lamb", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (default: all)")
    args = parser.parse_args()
    if args.threads is not None:
        threadpool_limits(args.threads)

    X, Y, W0 = make_problem(args.n, args.seed)
    hp = dict(tau=args.tau, lamb=args.lamb)

    def contenders(iters: int):
        return {
            "lab": lambda: lab_train(X, Y, W0[0].copy(), W0[1].copy(), iters=iters, **hp),
            "ours-f64": lambda: fit(X, Y, W0, iters=iters, gradient="exact", **hp),
            "ours-f32": lambda: fit(X, Y, W0, iters=iters, gradient="exact", dtype="float32", **hp),
            "ours-lab-f64": lambda: fit(X, Y, W0, iters=iters, gradient="lab", **hp),
            "matmul-only": lambda: matmul_only(X, Y, W0, iters),
        }

    print(f"network {'-'.join(map(str, SIZES))}, n={args.n}, tau={args.tau}, lamb={args.lamb}")
    print(f"{args.repeats} repeats x {args.iters} iterations per contender")
    for info in threadpool_info():
        print(
            f"BLAS: {info.get('internal_api')} {info.get('version')} "
            f"({info.get('architecture')}, {info.get('threading_layer')}), "
            f"{info.get('num_threads')} threads, {Path(info.get('filepath', '?')).name}"
        )

    # sanity: the lab-order rule is the lab's loop
    lab_W = lab_train(X, Y, W0[0].copy(), W0[1].copy(), iters=20, **hp)
    ours_lab_W = fit(X, Y, W0, iters=20, gradient="lab", **hp)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(lab_W, ours_lab_W, strict=True))
    print(f"check: max |ours-lab - lab| after 20 iterations = {diff:.1e}")

    for run in contenders(10).values():  # warm-up: page in buffers, spin up BLAS threads
        run()

    runs = contenders(args.iters)
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\n{'contender':<15}{'median s':>10}{'ms/iter':>10}{'min s':>10}{'max s':>10}")
    for name in names:
        ts = times[name]
        per_iter = 1e3 * med[name] / args.iters
        print(f"{name:<15}{med[name]:>10.3f}{per_iter:>10.3f}{min(ts):>10.3f}{max(ts):>10.3f}")
    print()
    for label, num, den, op, threshold in TARGETS:
        ratio = statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))
        ok = ratio >= threshold if op == ">=" else ratio <= threshold
        best = min(times[num]) / min(times[den])
        verdict = "PASS" if ok else "FAIL"
        print(
            f"{label:<24}{ratio:>7.2f}   target {op} {threshold:<4} {verdict}   (best: {best:.2f})"
        )
    lab_rule = statistics.median(
        a / b for a, b in zip(times["lab"], times["ours-lab-f64"], strict=True)
    )
    print(f"{'lab / ours-lab-f64':<24}{lab_rule:>7.2f}   (info)")


if __name__ == "__main__":
    main()
