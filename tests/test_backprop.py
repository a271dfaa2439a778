"""Tests for nnbp.backprop: gradients, the lab-order rule, fit's contract and the helpers."""

import os
import signal
import warnings
from itertools import pairwise

import numpy as np
import pytest
from scipy.special import expit

from nnbp.artifacts import LogPoint
from nnbp.backprop import (
    DivergenceError,
    accuracy,
    fit,
    forward,
    gradients,
    init_weights,
    loss,
    loss_and_predictions,
    predict,
    sigmoid,
)
from nnbp.lab import lab_train
from nnbp.labdata import one_hot, zscore
from nnbp.parallel import ONE_BLOCK, Pool, Schedule, block_bounds, thread_count
from nnbp.training import log_points


def _problem(sizes, n, seed=0, dtype="float64"):
    """Seeded z-scored random data (d, n), one-hot targets (K, n), labels and initial weights."""
    rng = np.random.default_rng(seed)
    X = zscore(rng.normal(size=(sizes[0], n)))
    y = rng.integers(0, sizes[-1], n)
    return X, one_hot(y, sizes[-1]), y, init_weights(sizes, rng, dtype)


def _max_abs_diff(A, B):
    return max(float(np.max(np.abs(a - b))) for a, b in zip(A, B, strict=True))


# --- gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[6, 5, 3], [6, 5, 4, 3]], ids=["1hidden", "2hidden"])
@pytest.mark.parametrize("lamb", [0.0, 0.01])
def test_gradients_match_central_finite_differences_of_loss(sizes, lamb):
    X, Y, _, W = _problem(sizes, n=7, seed=1)
    G = gradients(W, X, Y, lamb)
    h = 1e-6
    num, ana = [], []
    for l, Wl in enumerate(W):
        assert G[l].shape == Wl.shape
        for idx in np.ndindex(Wl.shape):
            old = Wl[idx]
            Wl[idx] = old + h
            up = loss(W, X, Y, lamb)
            Wl[idx] = old - h
            down = loss(W, X, Y, lamb)
            Wl[idx] = old
            num.append((up - down) / (2 * h))
            ana.append(G[l][idx])
    num, ana = np.array(num), np.array(ana)
    rel = np.linalg.norm(num - ana) / (np.linalg.norm(num) + np.linalg.norm(ana))
    assert rel < 1e-6


def test_gradients_do_not_modify_weights():
    X, Y, _, W = _problem([6, 5, 3], n=7)
    before = [w.copy() for w in W]
    gradients(W, X, Y, 0.1)
    assert all(np.array_equal(a, b) for a, b in zip(W, before, strict=True))


def test_lab_rule_is_the_default_and_exact_is_one_argument_away():
    X, Y, _, W = _problem([8, 5, 3], n=12, seed=3)
    kw = dict(tau=0.2, iters=20)
    assert _max_abs_diff(fit(X, Y, W, **kw), fit(X, Y, W, gradient="lab", **kw)) == 0
    assert _max_abs_diff(fit(X, Y, W, **kw), fit(X, Y, W, gradient="exact", **kw)) > 1e-4
    with pytest.raises(ValueError, match="gradient must be one of"):
        fit(X, Y, W, gradient="seed", **kw)  # the rule's old name is gone, not aliased


# --- the two update rules --------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [1, 4])
@pytest.mark.parametrize("lamb", [0.0, 0.005])
def test_lab_rule_reproduces_lab_loop(lamb, blocks):
    X, Y, _, W = _problem([400, 25, 10], n=200, seed=2)
    lab = lab_train(X, Y, W[0].copy(), W[1].copy(), tau=0.2, lamb=lamb, iters=500)
    ours = fit(X, Y, W, tau=0.2, lamb=lamb, iters=500, gradient="lab", blocks=blocks)
    assert _max_abs_diff(ours, lab) < 1e-14  # the README's bound (measured: 8e-16 at most)
    # the comparison is not vacuous: the weights did move
    assert _max_abs_diff(lab, W) > 1e-2


def test_exact_and_lab_rules_differ_and_both_reduce_loss():
    X, Y, _, W = _problem([40, 12, 5], n=60, seed=3)
    kw = dict(tau=0.2, lamb=0.001, iters=100)
    exact = fit(X, Y, W, gradient="exact", **kw)
    lab = fit(X, Y, W, gradient="lab", **kw)
    assert _max_abs_diff(exact, lab) > 1e-3
    l0 = loss(W, X, Y, 0.001)
    assert loss(exact, X, Y, 0.001) < 0.9 * l0
    assert loss(lab, X, Y, 0.001) < 0.9 * l0


@pytest.mark.parametrize("sizes", [[6, 5, 3], [6, 5, 4, 3]], ids=["1hidden", "2hidden"])
def test_exact_step_is_weights_minus_tau_times_gradients(sizes):
    X, Y, _, W = _problem(sizes, n=9, seed=4)
    tau, lamb = 0.3, 0.02
    G = gradients(W, X, Y, lamb)
    expected = [w - tau * g for w, g in zip(W, G, strict=True)]
    stepped = fit(X, Y, W, tau=tau, lamb=lamb, iters=1, gradient="exact")
    for s, e in zip(stepped, expected, strict=True):
        np.testing.assert_allclose(s, e, rtol=0, atol=1e-15)


# --- shapes and initialisation ---------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[400, 25, 10], [400, 100, 50, 10]])
def test_shapes_of_weights_activations_and_fit_output(sizes):
    n = 30
    X, Y, _, W = _problem(sizes, n=n, seed=5)
    assert [w.shape for w in W] == [(b, a + 1) for a, b in pairwise(sizes)]
    assert all(w.dtype == np.float64 for w in W)
    for a, w in zip(sizes, W, strict=False):
        bound = 2 / np.sqrt(a)
        assert np.abs(w).max() <= bound
        assert np.abs(w).max() > 0.9 * bound  # the range is actually used
    acts = forward(W, X)
    assert [a.shape for a in acts] == [(s, n) for s in sizes]
    assert np.array_equal(acts[0], X)
    for gradient in ("exact", "lab"):
        out = fit(X, Y, W, tau=0.1, iters=3, gradient=gradient)
        assert [w.shape for w in out] == [w.shape for w in W]


@pytest.mark.parametrize("bad", [[400], [400, 0, 10], []])
def test_init_weights_rejects_bad_sizes(bad):
    with pytest.raises(ValueError):
        init_weights(bad, np.random.default_rng(0))


# --- determinism and dtype -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fit_is_deterministic_and_returns_requested_dtype(dtype):
    runs = []
    for _ in range(2):
        X, Y, _, W = _problem([50, 20, 10], n=80, seed=6)
        runs.append(fit(X, Y, W, tau=0.2, lamb=0.005, iters=50, dtype=dtype))
    for a, b in zip(*runs, strict=True):
        assert a.dtype == np.dtype(dtype)
        assert np.array_equal(a, b)


def test_float32_init_weights_are_float32():
    W = init_weights([5, 4, 3], np.random.default_rng(0), "float32")
    assert all(w.dtype == np.float32 for w in W)


# --- the callback and the log points --------------------------------------------------------


@pytest.mark.parametrize("gradient", ["lab", "exact"])
def test_callback_gets_every_iteration_with_the_weights_after_t_updates(gradient):
    X, Y, _, W = _problem([20, 8, 4], n=40, seed=7)
    kw = dict(tau=0.2, lamb=0.01, gradient=gradient)
    seen: list[tuple[int, list[np.ndarray]]] = []
    final = fit(
        X, Y, W, iters=6, callback=lambda t, Wt: seen.append((t, [w.copy() for w in Wt])), **kw
    )
    assert [t for t, _ in seen] == list(range(7))
    for t, Wt in seen:  # bit for bit the weights of a fit stopped after t updates
        assert all(
            np.array_equal(a, b) for a, b in zip(Wt, fit(X, Y, W, iters=t, **kw), strict=True)
        )
    assert all(np.array_equal(a, b) for a, b in zip(seen[0][1], W, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(seen[-1][1], final, strict=True))


class Interrupted(Exception):
    pass


def test_a_callback_stops_the_training_at_the_iteration_after_a_signal():
    """The interruption a run uses: the handler sets a flag, the callback raises on seeing it."""
    X, Y, _, W = _problem([20, 8, 4], n=40, seed=7)
    stop, seen = [], []

    def callback(t: int, weights: list[np.ndarray]) -> None:
        if stop:
            raise Interrupted(t)
        seen.append(t)
        if t == 3:
            signal.raise_signal(signal.SIGUSR1)  # a signal that arrives while training

    previous = signal.signal(signal.SIGUSR1, lambda *_: stop.append(True))
    try:
        with pytest.raises(Interrupted) as info:
            fit(X, Y, W, tau=0.2, iters=50, callback=callback)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert info.value.args == (4,)
    assert seen == [0, 1, 2, 3]


@pytest.mark.parametrize(("iters", "expected"), [(10, [0, 3, 6, 9, 10]), (9, [0, 3, 6, 9])])
def test_log_points_every_log_every_and_at_the_end_score_those_weights(iters, expected):
    X, Y, _, W = _problem([20, 8, 4], n=40, seed=7)
    X_test, _, y_test, _ = _problem([20, 8, 4], n=15, seed=8)
    points: list[LogPoint] = []
    kw = dict(tau=0.2, lamb=0.01)
    callback = log_points(points.append, X, Y, X_test, y_test, lamb=0.01, iters=iters, log_every=3)
    fit(X, Y, W, iters=iters, callback=callback, **kw)
    assert [p.iteration for p in points] == expected
    for p in points:
        Wt = fit(X, Y, W, iters=p.iteration, **kw)
        assert p.scores.loss == loss(Wt, X, Y, 0.01)
        y = np.argmax(Y, 0)
        assert p.scores.train_acc == accuracy(np.argmax(forward(Wt, X)[-1], axis=0), y)
        assert p.scores.test_acc == accuracy(np.argmax(forward(Wt, X_test)[-1], axis=0), y_test)
        assert 0 <= p.scores.train_acc <= 100


def test_log_points_test_acc_is_none_without_test_set():
    X, Y, _, W = _problem([20, 8, 4], n=40, seed=7)
    points: list[LogPoint] = []
    fit(
        X,
        Y,
        W,
        tau=0.2,
        iters=4,
        callback=log_points(points.append, X, Y, lamb=0.0, iters=4, log_every=2),
    )
    assert [p.iteration for p in points] == [0, 2, 4]
    assert all(p.scores.test_acc is None for p in points)


def test_log_points_raise_divergence_on_a_non_finite_cost():
    X, Y, _, W = _problem([20, 8, 4], n=40, seed=7)
    huge = [w.copy() for w in W]
    huge[0][0, 0] = 1e200  # finite outputs (one saturated unit), an infinite lamb term
    points: list[LogPoint] = []
    callback = log_points(points.append, X, Y, lamb=0.01, iters=10, log_every=5)
    with np.errstate(over="ignore"), pytest.raises(DivergenceError) as info:
        callback(5, huge)
    assert info.value.iteration == 5 and points == []
    callback(4, huge)  # not a log point: nothing scored
    callback(5, W)
    assert [p.iteration for p in points] == [5]


# --- divergence ------------------------------------------------------------------------------


# fit silences the overflow on the way to a divergence: it reports it as DivergenceError.
@pytest.mark.filterwarnings("error")
def test_divergence_error_carries_iteration_and_input_weights_untouched():
    X, Y, _, W = _problem([20, 8, 4], n=30, seed=9)
    before = [w.copy() for w in W]
    kw = dict(tau=0.2, lamb=100.0)
    seen: list[int] = []
    with pytest.raises(DivergenceError) as info:
        fit(X, Y, W, iters=10_000, callback=lambda t, _: seen.append(t), **kw)
    t = info.value.iteration
    assert 0 < t < 10_000
    assert seen == list(range(t))  # the callback never sees weights with non-finite outputs
    assert all(np.array_equal(a, b) for a, b in zip(W, before, strict=True))
    # the iteration is the first one whose outputs are non-finite
    last_ok = fit(X, Y, W, iters=t - 1, **kw)
    assert all(np.isfinite(w).all() for w in last_ok)
    with pytest.raises(DivergenceError) as again:
        fit(X, Y, W, iters=t, **kw)
    assert again.value.iteration == t
    assert isinstance(info.value, ArithmeticError)


def test_fit_does_not_modify_input_weights():
    X, Y, _, W = _problem([20, 8, 4], n=30, seed=10)
    before = [w.copy() for w in W]
    for gradient in ("exact", "lab"):
        fit(X, Y, W, tau=0.2, lamb=0.01, iters=5, gradient=gradient)
    assert all(np.array_equal(a, b) for a, b in zip(W, before, strict=True))


# --- argument validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw", [dict(gradient="adam"), dict(gradient="seed"), dict(dtype="float16"), dict(dtype="int")]
)
def test_fit_rejects_unknown_gradient_rule_or_dtype(kw):
    X, Y, _, W = _problem([5, 4, 3], n=6)
    with pytest.raises(ValueError):
        fit(X, Y, W, tau=0.1, iters=1, **kw)


# --- one_hot ---------------------------------------------------------------------------------


def test_one_hot_shape_and_absent_classes():
    Y = one_hot(np.array([0, 2, 2, 4]), 6)
    assert Y.shape == (6, 4)
    assert np.array_equal(Y.sum(axis=0), np.ones(4))
    assert np.array_equal(np.argmax(Y, axis=0), [0, 2, 2, 4])
    assert not Y[[1, 3, 5]].any()  # absent classes are zero rows


def test_one_hot_accepts_column_vector_and_single_example():
    y = np.array([1, 0, 2])
    assert np.array_equal(one_hot(y.reshape(-1, 1), 3), one_hot(y, 3))
    single = one_hot(np.array([2]), 3)
    assert single.shape == (3, 1)
    assert np.array_equal(single[:, 0], [0, 0, 1])


@pytest.mark.parametrize("y", [[0, 3], [-1, 0], [0.0, 1.0], [0.5]])
def test_one_hot_rejects_out_of_range_and_non_integer(y):
    with pytest.raises(ValueError):
        one_hot(np.array(y), 3)


# --- zscore ----------------------------------------------------------------------------------


def test_zscore_per_example_standardises_each_column():
    X = np.random.default_rng(11).normal(3.0, 5.0, (50, 8))
    Z = zscore(X, "per_example")
    assert Z.shape == X.shape
    np.testing.assert_allclose(Z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(Z.std(axis=0), 1, rtol=1e-12)


def test_zscore_per_feature_uses_reference_statistics():
    rng = np.random.default_rng(12)
    train = rng.normal(2.0, 3.0, (4, 100))
    test = rng.normal(-1.0, 0.5, (4, 20))
    Z_train = zscore(train, "per_feature")
    np.testing.assert_allclose(Z_train.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(Z_train.std(axis=1), 1, rtol=1e-12)
    Z_test = zscore(test, "per_feature", reference=train)
    mu, sd = train.mean(axis=1, keepdims=True), train.std(axis=1, keepdims=True)
    np.testing.assert_allclose(Z_test, (test - mu) / sd, rtol=1e-12)
    assert abs(Z_test.mean()) > 0.5  # not standardised by its own statistics


def test_zscore_constant_image_and_constant_feature_give_zeros():
    X = np.random.default_rng(13).normal(size=(5, 6))
    X[:, 2] = 7.0  # constant image (column)
    Z = zscore(X, "per_example")
    assert np.isfinite(Z).all()
    assert np.array_equal(Z[:, 2], np.zeros(5))
    X = np.random.default_rng(13).normal(size=(5, 6))
    X[3] = -4.0  # constant feature (row)
    Z = zscore(X, "per_feature")
    assert np.isfinite(Z).all()
    assert np.array_equal(Z[3], np.zeros(6))


def test_zscore_single_example():
    x = np.array([[1.0], [2.0], [3.0], [6.0]])
    z = zscore(x, "per_example")
    assert z.shape == (4, 1)
    assert z.mean() == pytest.approx(0, abs=1e-15)
    assert z.std() == pytest.approx(1)
    assert np.array_equal(zscore(x, "per_feature"), np.zeros((4, 1)))


def test_zscore_returns_new_float64_array():
    X = np.arange(12, dtype=np.int64).reshape(3, 4)
    Z = zscore(X)
    assert Z.dtype == np.float64
    assert np.array_equal(X, np.arange(12).reshape(3, 4))


def test_zscore_rejects_unknown_mode():
    with pytest.raises(ValueError):
        zscore(np.ones((2, 2)), "per_pixel")


# --- sigmoid and accuracy --------------------------------------------------------------------


def test_sigmoid_matches_expit_without_warnings():
    z = np.concatenate([np.linspace(-1000, 1000, 200_001), [-1000.0, 1000.0, 0.0, -745.2, 710.0]])
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        ours = sigmoid(z)
    ref = expit(z)
    assert not np.shares_memory(ours, z)
    assert ours[-5:-2].tolist() == [0.0, 1.0, 0.5]
    # both are within ~2 ulp of the true value, so within 4 ulp of each other
    normal = ref >= np.finfo(np.float64).tiny
    np.testing.assert_array_max_ulp(ours[normal], ref[normal], maxulp=4)
    # below the normal range only the absolute error means anything
    assert np.max(np.abs(ours - ref)) <= np.finfo(np.float64).eps


def test_sigmoid_in_place():
    z = np.linspace(-50, 50, 1001)
    ref = expit(z)
    out = sigmoid(z, out=z)
    assert out is z
    np.testing.assert_array_max_ulp(z, ref, maxulp=4)


def test_sigmoid_float32_keeps_dtype():
    z = np.linspace(-200, 200, 1001, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sigmoid(z)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expit(z.astype(np.float64)), rtol=1e-6, atol=1e-30)


def test_accuracy_percentages():
    assert accuracy(np.array([0, 1, 2, 3]), np.array([0, 1, 0, 3])) == 75.0
    assert accuracy(np.array([1, 1]), np.array([1, 1])) == 100.0
    assert accuracy(np.array([[0], [2]]), np.array([1, 0])) == 0.0


# --- blocks and threads ----------------------------------------------------------------------


def test_blocks_cover_every_example_once_in_order():
    assert block_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert block_bounds(3, 4) == [(0, 1), (1, 2), (2, 3)]  # never an empty block
    assert block_bounds(1000, 1) == [(0, 1000)]


def _fit_with(threads, gradient, dtype, blocks=4):
    X, Y, _, W = _problem([30, 12, 5], n=103, seed=11)  # 103: blocks of unequal sizes
    X_test, _, y_test, _ = _problem([30, 12, 5], n=41, seed=12)
    points: list[LogPoint] = []
    with Pool(thread_count(threads, blocks)) as pool:
        kw = {"blocks": blocks, "map_blocks": pool.map}
        callback = log_points(
            points.append, X, Y, X_test, y_test, lamb=0.01, iters=60, log_every=20, **kw
        )
        weights = fit(
            X,
            Y,
            W,
            tau=0.3,
            lamb=0.01,
            iters=60,
            gradient=gradient,
            dtype=dtype,
            callback=callback,
            **kw,
        )
    return [w.tobytes() for w in weights], points, W


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("gradient", ["lab", "exact"])
def test_the_thread_count_changes_no_bit_of_the_weights_or_the_history(gradient, dtype):
    one, points, W = _fit_with(1, gradient, dtype)
    for threads in (2, 3, "auto"):
        assert _fit_with(threads, gradient, dtype)[:2] == (one, points), threads
    assert [p.iteration for p in points] == [0, 20, 40, 60]
    assert one != [w.astype(dtype).tobytes() for w in W]  # the weights did move


def test_blocked_results_agree_with_one_block_to_rounding():
    X, Y, _, W = _problem([30, 12, 5], n=103, seed=13)
    with Pool(2) as pool:
        four = Schedule(4, pool.map)
        assert loss(W, X, Y, 0.01, four) == pytest.approx(loss(W, X, Y, 0.01), rel=1e-13)
        np.testing.assert_array_equal(predict(W, X, four), predict(W, X))
        for g4, g1 in zip(gradients(W, X, Y, 0.01, four), gradients(W, X, Y, 0.01), strict=True):
            np.testing.assert_allclose(g4, g1, rtol=0, atol=1e-14)


def test_loss_and_predictions_are_loss_and_predict_from_one_pass():
    X, Y, _, W = _problem([30, 12, 5], n=103, seed=13)
    for schedule in (ONE_BLOCK, Schedule(4)):
        cost, predicted = loss_and_predictions(W, X, Y, 0.01, schedule)
        assert cost == loss(W, X, Y, 0.01, schedule)
        np.testing.assert_array_equal(predicted, predict(W, X, schedule))


def test_an_error_in_a_block_reaches_the_caller_and_the_pool_goes_on():
    ran: list[int] = []

    def block(i: int) -> None:
        if i == 2:
            raise ZeroDivisionError("block 2")
        ran.append(i)

    with Pool(2) as pool:
        with pytest.raises(ZeroDivisionError, match="block 2"):
            pool.map(block, 5)
        ran.clear()
        pool.map(ran.append, 6)  # the next job runs whole
    assert sorted(ran) == list(range(6))


@pytest.mark.parametrize("threads", [2, 3])
def test_back_to_back_maps_run_every_block_once_in_its_own_map(threads):
    """Workers that wake late must find the current map whole, never half of the next one."""
    with Pool(threads) as pool:
        for k in range(3000):
            count = 1 + k % 6
            ran: list[tuple[int, int]] = []
            pool.map(lambda i, k=k, ran=ran: ran.append((k, i)), count)
            assert sorted(ran) == [(k, i) for i in range(count)]


def test_auto_threads_are_the_cores_this_process_may_use_at_most_the_blocks():
    cores = len(os.sched_getaffinity(0))
    assert thread_count("auto", 64) == min(cores, 64)
    assert thread_count("auto", 1) == 1
    assert thread_count(3, 2) == 2
