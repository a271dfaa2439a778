"""Golden digests: the exact bits of a small seeded training, so that a rewrite of the training
code that changes any bit of the weights, of the history, of ``predict`` or of ``loss`` fails.

The digests were computed once, on the code as it was before the rewrite of ``backprop.fit``
(issue 21), and pasted here; the history then came from ``fit``'s own log points, now from
``nnbp.training.log_points``, the callback the training stage gives ``fit``. They hold on any
x86-64 CPU with AVX2 running the kernels nnbp pins (OpenBLAS's Haswell kernels, NumPy's AVX2
loops) with this NumPy and its C library's ``exp``. nnbp pins them only when it is imported
before NumPy, which a test process cannot promise (pytest imports test modules in its own order,
most import NumPy first), so the digests are computed in a subprocess that imports nnbp first;
elsewhere (no AVX2, kernels chosen by the environment) the test is skipped, not failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable

import pytest

from tests.project import ROOT

SIZES = [30, 12, 4]
N, N_TEST, BLOCKS, ITERS, LOG_EVERY = 101, 37, 3, 60, 7
TAU, LAMB = 0.3, 0.01
THREADS = (1, 2)

# (gradient, dtype) -> SHA-256 of the weights' bytes, of the history's points (repr of
# (iteration, loss, train_acc, test_acc)), of predict's int64 bytes (training then test set)
# and of repr(loss) on the training set, after the fit.
GOLDEN = {
    ("lab", "float64"): {
        "weights": "46ceedca691be7e7011f74d20aa876f1eb07dcf2b9e4fb061a57d01cb249ea6b",
        "history": "5b59ebfbdda5bd17b5e78f6117f82703a74a774399ea69b6169c1f3b043e06ad",
        "predict": "1795853d0eb9da58c7f3cb0354977f750699eb0f1b139bba986ea8daa8f9d5d0",
        "loss": "54e72e572b89d6d966a35e469898a6f40b1e6f0e152ccc156a9e8a2d7a48b723",
    },
    ("lab", "float32"): {
        "weights": "af6b24e6c9d4092d51b16d5dfed3c1b831876c78cc1f3a2241ec735141ac099e",
        "history": "ebd83de67fe9be96b6883c2ceba6dc5977e7dacbcf8d6cf47e8d956acc0cd5bf",
        "predict": "1795853d0eb9da58c7f3cb0354977f750699eb0f1b139bba986ea8daa8f9d5d0",
        "loss": "1052938cfd28cfb3e40a31909c66274b972fe0b7cc62bafd64bd77ba77877efe",
    },
    ("exact", "float64"): {
        "weights": "60f9929c6e4bdf70e71a81b4195899898a7b74c7c534459eb3f0a919057ee5c2",
        "history": "8ee66d4fe333e1b943b153f09a34c7637a2ba8abe9c8cec82dd43fc05cd44b8e",
        "predict": "a17854138973ce059bd43f24a993d1f7099e3e58b4b73189244444e5475fc2d2",
        "loss": "e4d2807fcc2f9299164e85bca2a4706949f3217be13c43083c10df0d10fed901",
    },
    ("exact", "float32"): {
        "weights": "0feac54f5dd35bcd3bb8dff960bac0362c6e2444f204cfc67d55ae117fa13b85",
        "history": "0d1eb15794d0ebb350e922726b5a30c0622ff680349dee815d73e066470964df",
        "predict": "a17854138973ce059bd43f24a993d1f7099e3e58b4b73189244444e5475fc2d2",
        "loss": "4e4a9a8bb34a3ea71a31ff363b3e721b85af66dd88f0408ef0a95db482096763",
    },
}


def _sha256(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def digests() -> dict:
    """The digests of every (gradient, dtype, threads), and the kernels that computed them.

    Run in a process that imported nnbp before NumPy (see the module's docstring)."""
    import numpy as np
    from threadpoolctl import threadpool_info

    from nnbp.backprop import fit, init_weights, loss, predict
    from nnbp.labdata import one_hot, zscore
    from nnbp.parallel import Pool, Schedule
    from nnbp.training import log_points

    rng = np.random.default_rng(2025)
    X = zscore(rng.normal(size=(SIZES[0], N)))
    Y = one_hot(rng.integers(0, SIZES[-1], N), SIZES[-1])
    X_test = zscore(rng.normal(size=(SIZES[0], N_TEST)))
    y_test = rng.integers(0, SIZES[-1], N_TEST)
    W0 = init_weights(SIZES, rng)
    runs = {}
    for gradient in ("lab", "exact"):
        for dtype in ("float64", "float32"):
            for threads in THREADS:
                points = []
                with Pool(threads) as pool:
                    kw = {"blocks": BLOCKS, "map_blocks": pool.map}
                    callback = log_points(
                        points.append,
                        X,
                        Y,
                        X_test,
                        y_test,
                        lamb=LAMB,
                        iters=ITERS,
                        log_every=LOG_EVERY,
                        **kw,
                    )
                    W = fit(
                        X,
                        Y,
                        W0,
                        tau=TAU,
                        lamb=LAMB,
                        iters=ITERS,
                        gradient=gradient,
                        dtype=dtype,
                        callback=callback,
                        **kw,
                    )
                    schedule = Schedule(**kw)
                    predicted = [predict(W, X, schedule), predict(W, X_test, schedule)]
                    cost = loss(W, X, Y, LAMB, schedule)
                history = [
                    (p.iteration, p.scores.loss, p.scores.train_acc, p.scores.test_acc)
                    for p in points
                ]
                runs[f"{gradient} {dtype} {threads}"] = {
                    "weights": _sha256(w.tobytes() for w in W),
                    "history": _sha256(repr(point).encode() for point in history),
                    "predict": _sha256(p.astype(np.int64).tobytes() for p in predicted),
                    "loss": _sha256([repr(cost).encode()]),
                    "iterations": [p[0] for p in history],
                    "moved": any(
                        not np.array_equal(w, w0.astype(dtype)) for w, w0 in zip(W, W0, strict=True)
                    ),
                }
    blas = next((i for i in threadpool_info() if i["user_api"] == "blas"), {})
    return {
        "blas": blas.get("architecture"),
        "npy_disabled": os.environ.get("NPY_DISABLE_CPU_FEATURES"),
        "runs": runs,
    }


@pytest.fixture(scope="module")
def computed() -> dict:
    """``digests()`` in a fresh process that imports nnbp first, with the kernels nnbp picks."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENBLAS_CORETYPE", "NPY_DISABLE_CPU_FEATURES")
    }
    code = "import nnbp, json; from tests.test_golden import digests; print(json.dumps(digests()))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    import nnbp

    if result["blas"] != "Haswell" or result["npy_disabled"] != nnbp.ABOVE_AVX2:
        pytest.skip(f"kernels not pinned here (BLAS {result['blas']}): the digests are x86-64 AVX2")
    return result["runs"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("gradient", ["lab", "exact"])
def test_training_keeps_every_bit_whatever_the_threads(computed, gradient, dtype):
    for threads in THREADS:
        run = dict(computed[f"{gradient} {dtype} {threads}"])
        assert run.pop("iterations") == [0, 7, 14, 21, 28, 35, 42, 49, 56, 60]
        assert run.pop("moved")  # the weights did move: the digests pin a training
        assert run == GOLDEN[gradient, dtype], threads
