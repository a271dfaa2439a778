"""The one reader of data files: the lab's ``.npz``, Coursera's ``.mat``, and our own arrays.

Every problem with a file is a ``DataError`` whose message is one line naming the file.
Arrays are read with ``allow_pickle=False``: an archive that carries a pickle is refused, never run.
Before an ``.npz`` member is inflated, its ``.npy`` header (shape, dtype) is read and checked
against its zip entry and against what its compressed bytes can honestly hold, and the whole
archive against the memory available: a zip bomb is refused in a fraction of a second, having
inflated only its headers.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import resource
import zipfile
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import BinaryIO

import numpy as np

from nnbp.backprop import zscore

LAB_KEYS = ("X_train", "y_train", "X_test", "y_test")
# DEFLATE codes a 258-byte match in no less than 2 bits: 1032 output bytes per input byte at most
# (zlib's technical notes). A member that claims more than that inflates to a lie.
DEFLATE_MAX_RATIO = 1032
_NPY_HEADER_MAX = 10_000  # NumPy's own limit on the header it parses


class DataError(ValueError):
    """A data file that cannot be used; ``str()`` is a one-line message naming the file."""


@dataclass(frozen=True)
class Dataset:
    """The lab's layout: ``X_*`` are (d, n) features x examples, ``y_*`` are (n,) labels 1..K."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class ArrayHeader:
    """What an ``.npz`` member's ``.npy`` header declares, before any of its data is read."""

    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int


def read_arrays(path: str | Path, keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (checking that ``keys`` are among them), loaded eagerly
    once ``npz_headers`` has vouched for every member."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with path.open("rb") as f:  # ours to close: np.load leaks its file on a bad archive
            headers = _npz_headers(path, f, keys)
            _check_memory(path, headers)
            f.seek(0)
            return _read_npz(path, f)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or first_line(e)})") from None


def npz_headers(path: str | Path, keys: tuple[str, ...] = ()) -> dict[str, ArrayHeader]:
    """The header of every array of an ``.npz`` file, read without inflating any data and
    checked (see ``_npz_headers``); ``keys`` must be among them."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with path.open("rb") as f:
            return _npz_headers(path, f, keys)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or first_line(e)})") from None


def _size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _check_signature(path: Path, f: BinaryIO) -> None:
    magic = f.read(6)
    f.seek(0)
    if magic.startswith(b"\x93NUMPY"):
        raise DataError(f"{path}: a single .npy array, expected an .npz archive")
    if magic.startswith(b"\x80"):
        raise DataError(f"{path}: a Python pickle, not an .npz archive; refused (never unpickled)")
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        what = "an empty file" if not magic else "no zip signature"
        raise DataError(f"{path}: not an .npz archive ({what})")


def _member_header(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> ArrayHeader:
    """One member's header, checked against its zip entry before any of its data is inflated."""
    key = info.filename.removesuffix(".npy")
    if info.compress_type == zipfile.ZIP_STORED:
        method, most = "stored", info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        method, most = "deflated", info.compress_size * DEFLATE_MAX_RATIO + _NPY_HEADER_MAX
    else:  # bzip2 and lzma have no such bound; NumPy never writes them
        raise DataError(
            f"{path}: array '{key}' is compressed with zip method {info.compress_type}; "
            "only stored or deflated arrays are read (np.savez, np.savez_compressed)"
        )
    if info.file_size > most:
        raise DataError(
            f"{path}: array '{key}' claims {_size(info.file_size)} from "
            f"{_size(info.compress_size)} of {method} data, more than that can hold; refused "
            "before inflating (a zip bomb or a damaged archive)"
        )
    with archive.open(info) as member:  # inflates the header's few hundred bytes, no more
        try:
            version = np.lib.format.read_magic(member)
        except ValueError:
            raise DataError(f"{path}: member '{info.filename}' is not a .npy array") from None
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise DataError(f"{path}: array '{key}' has .npy format {version}, not 1.0 or 2.0")
        try:
            shape, _, dtype = read_header(member, max_header_size=_NPY_HEADER_MAX)
        except ValueError as e:
            why = first_line(e)
            raise DataError(f"{path}: array '{key}' has a bad .npy header ({why})") from None
        header_size = member.tell()
    if dtype.hasobject:
        raise DataError(f"{path}: array '{key}' holds Python objects (a pickle); refused")
    nbytes = math.prod(shape) * dtype.itemsize
    if header_size + nbytes != info.file_size:
        raise DataError(
            f"{path}: array '{key}' declares shape {shape} of {dtype} ({_size(nbytes)}) but its "
            f"zip entry holds {_size(max(info.file_size - header_size, 0))}; refused before "
            "inflating"
        )
    return ArrayHeader(tuple(shape), dtype, nbytes)


def _npz_headers(path: Path, f: BinaryIO, keys: tuple[str, ...]) -> dict[str, ArrayHeader]:
    _check_signature(path, f)
    try:
        with zipfile.ZipFile(f) as archive:
            headers: dict[str, ArrayHeader] = {}
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise DataError(f"{path}: member '{info.filename}' is not a .npy array")
                key = info.filename.removesuffix(".npy")
                if key in headers:
                    raise DataError(f"{path}: holds two arrays named '{key}'")
                headers[key] = _member_header(path, archive, info)
    except DataError:
        raise
    except Exception as e:
        # zipfile raises a zoo of types (BadZipFile, EOFError, zlib.error, NotImplementedError,
        # RuntimeError for an encrypted member...) for a damaged archive.
        raise DataError(f"{path}: not a readable .npz archive ({first_line(e)})") from None
    missing = [k for k in keys if k not in headers]
    if missing:
        found = ", ".join(headers) or "none"
        raise DataError(f"{path}: missing array(s) {', '.join(missing)} (found: {found})")
    return headers


def available_memory() -> int | None:
    """Bytes this process can still allocate, as far as Linux tells: the smallest of the free
    memory (MemAvailable), a cgroup's remaining limit and the address-space limit (RLIMIT_AS)
    less what is mapped; None where none of them can be read."""
    limits = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        meminfo = Path("/proc/meminfo").read_text()
        line = next(x for x in meminfo.splitlines() if x.startswith("MemAvailable:"))
        limits.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            limits.append(int(limit) - int((cgroup / "memory.current").read_text()))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        mapped = 0
        with contextlib.suppress(OSError, ValueError, StopIteration):
            status = Path(f"/proc/{os.getpid()}/status").read_text()
            line = next(x for x in status.splitlines() if x.startswith("VmSize:"))
            mapped = int(line.split()[1]) * 1024
        limits.append(soft - mapped)
    return max(min(limits), 0) if limits else None


def _check_memory(path: Path, headers: dict[str, ArrayHeader], extra: int = 0) -> None:
    """Refuse an archive whose arrays, plus ``extra`` bytes of work on them, cannot fit in the
    memory available, before any of them is inflated."""
    inflated = sum(h.nbytes for h in headers.values())
    need, free = inflated + extra, available_memory()
    if free is None or need <= free:
        return
    what = f"its arrays need {_size(need)} once inflated"
    if extra:
        what = f"needs {_size(need)} of memory to load and z-score ({_size(inflated)} inflated)"
    raise DataError(
        f"{path}: {what}, more than the {_size(free)} available; refused before inflating"
    )


def _read_npz(path: Path, f: BinaryIO) -> dict[str, np.ndarray]:
    try:
        with np.load(f, allow_pickle=False) as archive:
            arrays = {}
            for name in archive.files:
                try:
                    arrays[name] = archive[name]
                except ValueError as e:
                    if "allow_pickle" in str(e):
                        raise DataError(
                            f"{path}: array '{name}' holds Python objects (a pickle); refused"
                        ) from None
                    raise
            return arrays
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{path}: an array is too large to load (corrupt header?)") from None
    except Exception as e:
        # NumPy and zipfile raise a zoo of types (BadZipFile, ValueError, EOFError, zlib.error,
        # NotImplementedError for an unknown compression...) for a damaged archive.
        raise DataError(f"{path}: not a readable .npz archive ({first_line(e)})") from None


def _read_mat(path: Path) -> dict[str, np.ndarray]:
    import scipy.io

    try:
        raw = scipy.io.loadmat(path)
    except Exception as e:
        # scipy raises a zoo of types (MatReadError, ValueError, struct.error...) for a bad file.
        raise DataError(f"{path}: not a readable .mat file ({first_line(e)})") from None
    return {k: v for k, v in raw.items() if not k.startswith("__")}


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def _features(path: Path, name: str, X: np.ndarray) -> np.ndarray:
    if X.dtype == object or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise DataError(f"{path}: {name} must be numeric, got dtype {X.dtype}")
    if X.ndim != 2:
        raise DataError(f"{path}: {name} must be 2-D (features x examples), got shape {X.shape}")
    if X.size == 0:
        raise DataError(f"{path}: {name} is empty (shape {X.shape})")
    if np.iscomplexobj(X):
        raise DataError(f"{path}: {name} must be real, got dtype {X.dtype}")
    X = X.astype(np.float64)
    if not np.isfinite(X).all():
        bad = int(np.count_nonzero(~np.isfinite(X)))
        raise DataError(f"{path}: {name} has {bad} NaN or infinite value(s)")
    return X


def _labels(path: Path, name: str, y: np.ndarray, n: int, classes: int) -> np.ndarray:
    if y.dtype == object or not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise DataError(f"{path}: {name} must be numeric, got dtype {y.dtype}")
    if y.ndim > 2 or (y.ndim == 2 and 1 not in y.shape):
        raise DataError(f"{path}: {name} must be a vector (n,) or (n, 1), got shape {y.shape}")
    if np.iscomplexobj(y):
        raise DataError(f"{path}: {name} must be real, got dtype {y.dtype}")
    y = y.reshape(-1)
    if y.size != n:
        raise DataError(f"{path}: {name} has {y.size} labels for {n} examples")
    if not np.isfinite(y).all():
        bad = int(np.count_nonzero(~np.isfinite(y)))
        raise DataError(f"{path}: {name} has {bad} NaN or infinite value(s)")
    if not np.array_equal(y, np.round(y)):
        raise DataError(f"{path}: {name} must hold whole numbers (class labels 1..{classes})")
    if y.min() < 1 or y.max() > classes:
        raise DataError(
            f"{path}: {name} has labels {int(y.min())}..{int(y.max())}, expected 1..{classes}"
        )
    return y.astype(np.int64)


def _check_lab_shapes(path: Path, headers: dict[str, ArrayHeader]) -> None:
    """The checks of ``_features`` and ``_labels`` that need only the shapes, made on the
    headers (same messages): an archive whose arrays do not fit together is refused unread."""
    X = {}
    for name in ("X_train", "X_test"):
        shape = headers[name].shape
        if len(shape) != 2:
            raise DataError(f"{path}: {name} must be 2-D (features x examples), got shape {shape}")
        X[name] = shape
    for name, n in (("y_train", X["X_train"][1]), ("y_test", X["X_test"][1])):
        shape = headers[name].shape
        if len(shape) > 2 or (len(shape) == 2 and 1 not in shape):
            raise DataError(f"{path}: {name} must be a vector (n,) or (n, 1), got shape {shape}")
        if math.prod(shape) != n:
            raise DataError(f"{path}: {name} has {math.prod(shape)} labels for {n} examples")
    if X["X_train"][0] != X["X_test"][0]:
        raise DataError(
            f"{path}: X_train has {X['X_train'][0]} features but X_test has {X['X_test'][0]}"
        )


def load_dataset(
    path: str | Path, *, classes: int = 10, n_train: int = 1000, split_seed: int = 0
) -> Dataset:
    """Read and validate a data set in the lab's layout.

    ``.npz``: arrays ``X_train`` (d, n), ``y_train`` (n, 1), ``X_test`` (d, m), ``y_test`` (m, 1),
    the lab's ``nn_train_test_sets.npz``. ``.mat``: Coursera's ``ex4data1.mat``, ``X`` (N, d)
    examples x features and ``y`` (N, 1); it is shuffled with ``split_seed`` and its first
    ``n_train`` examples train, the rest test (5,000 -> 1,000 / 4,000 as in the lab).
    Labels are 1..``classes`` in files (10 stands for the digit 0, as in the lab).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".mat"):
        raise DataError(f"{path}: not an .npz or .mat file (expected one of those suffixes)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if suffix == ".npz":
        headers = npz_headers(path, LAB_KEYS)  # before a byte of data is inflated
        _check_lab_shapes(path, headers)
        # Besides the arrays: a float64 copy of X_train and X_test, then their z-scored values.
        features = sum(math.prod(headers[k].shape) for k in ("X_train", "X_test"))
        _check_memory(path, headers, extra=2 * 8 * features)
        arrays = read_arrays(path, LAB_KEYS)
        X_train = _features(path, "X_train", arrays["X_train"])
        X_test = _features(path, "X_test", arrays["X_test"])
        y_train = _labels(path, "y_train", arrays["y_train"], X_train.shape[1], classes)
        y_test = _labels(path, "y_test", arrays["y_test"], X_test.shape[1], classes)
    else:
        arrays = _read_mat(path)
        missing = [k for k in ("X", "y") if k not in arrays]
        if missing:
            found = ", ".join(arrays) or "none"
            raise DataError(f"{path}: missing variable(s) {', '.join(missing)} (found: {found})")
        X = _features(path, "X", np.asarray(arrays["X"])).T  # examples x features -> (d, N)
        y = _labels(path, "y", np.asarray(arrays["y"]), X.shape[1], classes)
        if not 1 <= n_train < X.shape[1]:
            raise DataError(
                f"{path}: cannot split {X.shape[1]} examples into {n_train} for training "
                "and at least one for testing (data.n_train)"
            )
        train, test = split(X.shape[1], n_train, split_seed)
        X_train, y_train, X_test, y_test = X[:, train], y[train], X[:, test], y[test]
    if X_train.shape[0] != X_test.shape[0]:
        raise DataError(
            f"{path}: X_train has {X_train.shape[0]} features but X_test has {X_test.shape[0]}"
        )
    return Dataset(X_train, y_train, X_test, y_test)


def standardise(ds: Dataset, mode: str, *, source: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The z-scored ``(X_train, X_test)`` of ``ds`` (``backprop.zscore``; the test set with the
    training statistics in ``per_feature`` mode), checked to be finite.

    Finite data can still overflow: a mean or a variance beyond the float64 range, or a tiny
    training spread that blows a test value up. That is a ``DataError`` naming ``source``.
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # checked below
        X_train = zscore(ds.X_train, mode)
        X_test = zscore(ds.X_test, mode, reference=ds.X_train)
    for name, X in (("X_train", X_train), ("X_test", X_test)):
        if not np.isfinite(X).all():
            raise DataError(
                f"{source}: {name} cannot be z-scored ({mode}): its values overflow float64; "
                "rescale the data"
            )
    return X_train, X_test


def image_shape(d: int, given: str = "auto", *, source: str = "data") -> tuple[int, int]:
    """The (height, width) of the images whose ``d`` pixels are stored column-major.

    ``given`` is ``"auto"`` (square images) or ``"HxW"``; ``source`` names where ``d`` came from.
    """
    if d < 1:
        raise DataError(f"{source}: no features, so no image")
    if given == "auto":
        side = math.isqrt(d)
        if side * side != d:
            raise DataError(
                f"{source}: {d} features is not a square image; set data.image_shape to HxW"
            )
        return side, side
    try:
        h, w = (int(v) for v in given.lower().split("x"))
    except ValueError:
        raise DataError(f"data.image_shape: expected 'auto' or HxW, got {given!r}") from None
    if h < 1 or w < 1 or h * w != d:
        raise DataError(f"data.image_shape: {given} does not hold the {d} features of {source}")
    return h, w


def split(n: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded shuffle of ``n`` examples: the first ``n_train``, and the rest."""
    order = np.random.default_rng(seed).permutation(n)
    return order[:n_train], order[n_train:]


def file_md5(path: str | Path) -> str:
    """The MD5 of a file's bytes (what DVC records), read in 1 MiB blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_prepared(folder: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The ``train.npz`` and ``test.npz`` written by the prepare stage."""
    folder = Path(folder)
    train = read_arrays(folder / "train.npz", ("X", "Y", "y", "image_shape"))
    test = read_arrays(folder / "test.npz", ("X", "y"))
    return train, test


def read_model(path: str | Path) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Weights ``[W1, ..., WL]`` and the metadata arrays of a model written by the train stage,
    checked to chain: ``W^{l+1}`` takes the ``n_{l+1}`` outputs of ``W^l`` plus a bias."""
    arrays = read_arrays(path, ("W1", "lamb", "sizes"))
    names = sorted(
        (k for k in arrays if k[:1] == "W" and k[1:].isdigit()), key=lambda k: int(k[1:])
    )
    if names != [f"W{i}" for i in range(1, len(names) + 1)]:
        raise DataError(f"{path}: weight matrices {', '.join(names)} are not W1..WL")
    weights = [arrays.pop(name) for name in names]
    sizes = [int(s) for s in np.ravel(arrays["sizes"])]
    shapes = [(n_next, n + 1) for n, n_next in pairwise(sizes)]
    if [W.shape for W in weights] != shapes or len(sizes) != len(weights) + 1:
        found = ", ".join(f"{W.shape}" for W in weights)
        raise DataError(f"{path}: weight shapes {found} do not match layer sizes {sizes}")
    return weights, arrays


def read_history(path: str | Path) -> dict[str, list[float]]:
    """A training history (JSON rows of step, loss, train_acc, test_acc) as columns."""
    import json

    path = Path(path)
    keys = ("step", "loss", "train_acc", "test_acc")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable history ({first_line(e)})") from None
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and set(keys) <= set(r) for r in rows
    ):
        raise DataError(f"{path}: not a history (expected a list of rows with {', '.join(keys)})")
    return {key: [row[key] for row in rows] for key in keys}


def read_models(
    folder: str | Path, *, features: int, classes: int
) -> dict[str, tuple[list[np.ndarray], dict[str, np.ndarray]]]:
    """Every ``NAME.npz`` model in ``folder`` by name, in the lab's order (smaller networks
    first, then more regularization), each checked to take ``features`` inputs and give
    ``classes`` outputs."""
    models = {p.stem: read_model(p) for p in sorted(Path(folder).glob("*.npz"))}
    if not models:
        raise DataError(f"{folder}: no trained model (*.npz) found")
    for name, (weights, _) in models.items():
        d, K = weights[0].shape[1] - 1, weights[-1].shape[0]
        if (d, K) != (features, classes):
            raise DataError(
                f"{Path(folder) / name}.npz: a {d}-input, {K}-class model for data with "
                f"{features} features and {classes} classes; if its configuration is gone, "
                "delete it (DVC leaves the outputs of a removed stage in place)"
            )

    def lab_order(name: str) -> tuple:
        _, meta = models[name]
        return [int(s) for s in np.ravel(meta["sizes"])], float(meta["lamb"]), name

    return {name: models[name] for name in sorted(models, key=lab_order)}
