"""Property-based tests of the data readers and the z-score (issue 5).

Any finite input either loads with the right shapes and types or is refused with the documented
error, ``DataError``, whose message is one line naming the file: never another exception, never
a warning (a stage would print it), never a NaN. What is well formed by construction must load,
with its values; what is not an archive at all must be refused.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nnbp.archive import read_npz
from nnbp.errors import DataError
from nnbp.labdata import LAB_KEYS, Dataset, image_shape, load_dataset, standardise

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [np.float64, np.float32, np.float16, np.int8, np.int64, np.uint8, np.bool_]


def finite_arrays(dtypes=DTYPES, max_dims: int = 3, max_side: int = 6) -> st.SearchStrategy:
    return st.sampled_from(dtypes).flatmap(
        lambda dtype: hnp.arrays(
            dtype,
            hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side),
            elements=(
                st.floats(allow_nan=False, allow_infinity=False, width=np.dtype(dtype).itemsize * 8)
                if np.issubdtype(dtype, np.floating)
                else None
            ),
        )
    )


@st.composite
def lab_arrays(draw, classes: int = 10) -> dict[str, np.ndarray]:
    """The lab's four arrays: mostly well formed (so that loading succeeds often), with any of
    them replaced by an arbitrary finite array now and then."""
    d = draw(st.integers(0, 5))
    n, m = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    values = st.floats(-1e6, 1e6) | st.floats(allow_nan=False, allow_infinity=False)
    valid, wide = st.integers(1, classes), st.integers(-3, classes + 3)
    labels = st.sampled_from([valid] * 6 + [wide, wide | st.sampled_from([1.5, 1e300])])
    arrays = {
        "X_train": draw(hnp.arrays(np.float64, (d, n), elements=values)),
        "X_test": draw(hnp.arrays(np.float64, (d, m), elements=values)),
        "y_train": draw(hnp.arrays(np.float64, (n, 1), elements=draw(labels))),
        "y_test": draw(hnp.arrays(np.float64, (m,), elements=draw(labels))),
    }
    for key in LAB_KEYS:
        if draw(st.integers(0, 19)) == 0:
            arrays[key] = draw(finite_arrays())
        if draw(st.integers(0, 39)) == 0:
            del arrays[key]
    return arrays


def _check_loaded(ds: Dataset, classes: int) -> None:
    d, n = ds.X_train.shape
    assert ds.X_test.shape[0] == d and d >= 1 and n >= 1 and ds.X_test.shape[1] >= 1
    assert ds.y_train.shape == (n,) and ds.y_test.shape == (ds.X_test.shape[1],)
    for X in (ds.X_train, ds.X_test):
        assert X.dtype == np.float64 and np.isfinite(X).all()
    for y in (ds.y_train, ds.y_test):
        assert y.dtype == np.int64 and y.min() >= 1 and y.max() <= classes


def _refused(e: DataError, path: Path) -> None:
    message = str(e)
    assert message.startswith(f"{path}: ") or message.startswith("data.image_shape: ")
    assert "\n" not in message


def _load_or_refuse(path: Path, classes: int = 10, **kw) -> Dataset | None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would be an extra line on a stage's stderr
        try:
            ds = load_dataset(path, classes=classes, **kw)
        except DataError as e:
            _refused(e, path)
            return None
    _check_loaded(ds, classes)
    return ds


@SETTINGS
@given(arrays=lab_arrays())
def test_npz_loads_with_the_right_shapes_or_is_refused(arrays):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        np.savez(path, **arrays)
        ds = _load_or_refuse(path)
    event("loaded" if ds is not None else "refused")
    if ds is not None:
        assert ds.X_train.shape == arrays["X_train"].shape
        np.testing.assert_array_equal(ds.y_test, arrays["y_test"].reshape(-1))


@st.composite
def mat_variables(draw) -> dict[str, np.ndarray]:
    """Coursera's X (N, d) and y (N, 1): mostly consistent, or arbitrary finite arrays."""
    N, d = draw(st.integers(0, 8)), draw(st.integers(0, 5))
    variables = {
        "X": draw(hnp.arrays(np.float64, (N, d), elements=st.floats(-1e3, 1e3))),
        "y": draw(hnp.arrays(np.uint8, (N, 1), elements=st.integers(1, 10))),
    }
    for key in ("X", "y"):
        if draw(st.integers(0, 4)) == 0:
            dtypes = [np.float64, np.int32, np.uint8]
            variables[key] = draw(finite_arrays(dtypes, max_dims=2, max_side=8))
    return variables


@SETTINGS
@given(variables=mat_variables(), n_train=st.integers(1, 8))
def test_mat_loads_with_the_right_shapes_or_is_refused(variables, n_train):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.mat"
        scipy.io.savemat(path, variables)
        ds = _load_or_refuse(path, n_train=n_train)
    event("loaded" if ds is not None else "refused")
    if ds is not None:
        assert ds.X_train.shape[1] == n_train
        assert ds.X_train.shape[1] + ds.X_test.shape[1] == np.atleast_2d(variables["X"]).shape[0]


@st.composite
def valid_lab_arrays(draw, classes: int = 10) -> dict[str, np.ndarray]:
    """The lab's four arrays, well formed by construction: d >= 1 features, n, m >= 1 examples,
    finite numbers of any real dtype, labels 1..classes as (n, 1) or (n,)."""
    d, n, m = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([np.float64, np.float32, np.int16, np.uint8]))
    values = st.integers(0, 100) if np.issubdtype(dtype, np.integer) else st.floats(-1e3, 1e3)
    label_dtype = draw(st.sampled_from([np.int64, np.uint8, np.float64]))
    labels = st.integers(1, classes)
    y_shape = draw(st.sampled_from(["column", "flat"]))
    return {
        "X_train": draw(hnp.arrays(dtype, (d, n), elements=values)),
        "X_test": draw(hnp.arrays(dtype, (d, m), elements=values)),
        "y_train": draw(
            hnp.arrays(label_dtype, (n, 1) if y_shape == "column" else (n,), elements=labels)
        ),
        "y_test": draw(hnp.arrays(label_dtype, (m, 1), elements=labels)),
    }


@SETTINGS
@given(arrays=valid_lab_arrays(), compressed=st.booleans())
def test_every_well_formed_npz_loads_with_its_values(arrays, compressed):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        (np.savez_compressed if compressed else np.savez)(path, **arrays)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = load_dataset(path)  # must load: a refusal fails this test
    _check_loaded(ds, 10)
    np.testing.assert_array_equal(ds.X_train, arrays["X_train"].astype(np.float64))
    np.testing.assert_array_equal(ds.X_test, arrays["X_test"].astype(np.float64))
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"].reshape(-1))
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"].reshape(-1))


@SETTINGS
@given(arrays=valid_lab_arrays(), n_train=st.integers(1, 11))
def test_every_well_formed_mat_loads_and_splits(arrays, n_train):
    X = np.hstack([arrays["X_train"], arrays["X_test"]]).T.astype(np.float64)  # (N, d)
    y = np.concatenate([arrays["y_train"].reshape(-1), arrays["y_test"].reshape(-1)])[:, None]
    if X.shape[0] < 2:
        return  # one example cannot be split into training and test
    n_train = min(n_train, X.shape[0] - 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.mat"
        scipy.io.savemat(path, {"X": X, "y": y.astype(np.uint8)})
        ds = load_dataset(path, n_train=n_train)
    _check_loaded(ds, 10)
    assert ds.X_train.shape == (X.shape[1], n_train)
    # the split is a permutation of the examples: nothing lost, nothing repeated
    both = np.hstack([ds.X_train, ds.X_test]).T
    assert sorted(map(tuple, both)) == sorted(map(tuple, X))


@SETTINGS
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_are_refused(data):
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".npz", ".mat"):
            path = Path(tmp) / f"data{suffix}"
            path.write_bytes(data)
            with pytest.raises(DataError) as refused:
                load_dataset(path)
            _refused(refused.value, path)


@pytest.fixture(scope="module")
def good_npz(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "good.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path,
        X_train=rng.normal(size=(4, 5)),
        y_train=rng.integers(1, 11, (5, 1)),
        X_test=rng.normal(size=(4, 3)),
        y_test=rng.integers(1, 11, 3),
    )
    return path.read_bytes()


@settings(SETTINGS, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_archives_load_or_are_refused(good_npz, data):
    """Truncated, or with some bytes changed: every damage is caught (zip CRCs, npy headers)."""
    raw = bytearray(good_npz)
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 4), label="changes")):
            i = data.draw(st.integers(0, len(raw) - 1), label="at")
            raw[i] = data.draw(st.integers(0, 255), label="byte")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        path.write_bytes(bytes(raw))
        _load_or_refuse(path)
        try:
            read_npz(path)
        except DataError as e:
            _refused(e, path)


def _datasets() -> st.SearchStrategy:
    values = st.floats(allow_nan=False, allow_infinity=False) | st.floats(-10, 10)

    @st.composite
    def build(draw):
        d, n, m = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
        X_train = draw(hnp.arrays(np.float64, (d, n), elements=values))
        X_test = draw(hnp.arrays(np.float64, (d, m), elements=values))
        return Dataset(X_train, np.ones(n, np.int64), X_test, np.ones(m, np.int64))

    return build()


@SETTINGS
@given(ds=_datasets(), mode=st.sampled_from(["per_example", "per_feature"]))
def test_zscore_is_finite_or_refused(ds, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            X_train, X_test = standardise(ds, mode, source="data.npz")
        except DataError as e:
            assert str(e).startswith("data.npz: X_") and "cannot be z-scored" in str(e)
            event("refused")
            return
    event("standardised")
    assert X_train.shape == ds.X_train.shape and X_test.shape == ds.X_test.shape
    assert np.isfinite(X_train).all() and np.isfinite(X_test).all()
    axis = 0 if mode == "per_example" else 1
    # Centred: each image (per_example) or feature (per_feature) has mean 0; a constant one
    # becomes exactly 0, as zscore documents.
    constant = (ds.X_train == ds.X_train.take([0], axis=axis)).all(axis=axis)
    scale = max(1.0, float(np.abs(X_train).max()))
    means = np.abs(X_train.mean(axis=axis))
    assert np.all(means[~constant] <= 1e-6 * scale)
    assert not np.compress(constant, X_train, axis=1 - axis).any()


@SETTINGS
@given(
    d=st.integers(0, 10_000),
    given_shape=st.none() | st.tuples(st.integers(1, 200), st.integers(1, 200)),
)
def test_image_shape_fits_or_is_refused(d, given_shape):
    try:
        h, w = image_shape(d, given_shape, source="data.npz")
    except DataError as e:
        assert str(e).startswith(("data.npz: ", "data.image_shape: ")) and "\n" not in str(e)
        return
    assert h >= 1 and w >= 1 and h * w == d
