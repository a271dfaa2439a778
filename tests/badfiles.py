"""Bad input files, made on purpose: archives that are not what they claim, pickles that would run
code if loaded, zip and .mat bombs that inflate to gigabytes, written by hand byte by byte."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

# --- bad data files --------------------------------------------------------------------------


class Evil:
    """Unpickling this runs ``os.mkdir(marker)``: proof that a pickle was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def good_arrays(src: Path) -> dict[str, np.ndarray]:
    with np.load(src) as f:
        return {k: f[k] for k in f.files}


def _npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


def _changed(**changes: Callable[[dict], np.ndarray] | None):
    """A maker that writes the good arrays with some replaced (a function of all) or dropped."""

    def make(src: Path, path: Path) -> Path:
        arrays = good_arrays(src)
        new = {k: f(arrays) for k, f in changes.items() if f is not None}
        for k in changes:
            arrays.pop(k)
        return _npz(path, {**arrays, **new})

    return make


def _with_value(key: str, index: tuple, value: float) -> Callable[[dict], np.ndarray]:
    def f(arrays: dict) -> np.ndarray:
        a = arrays[key].astype(np.float64)
        a[index] = value
        return a

    return f


def _bytes(data: Callable[[Path], bytes]):
    def make(src: Path, path: Path) -> Path:
        path.write_bytes(data(src))
        return path

    return make


def _flip_middle_byte(src: Path) -> bytes:
    raw = bytearray(src.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    return bytes(raw)


def _npy(src: Path, path: Path) -> Path:
    with path.open("wb") as f:
        np.save(f, np.zeros((3, 3)))
    return path


def _object_array(src: Path, path: Path) -> Path:
    arrays = good_arrays(src)
    marker = path.parent / f"{path.stem}.EXECUTED"
    evil = np.empty(1, dtype=object)
    evil[0] = Evil(str(marker))
    arrays["X_train"] = evil
    with path.open("wb") as f:
        np.savez(f, **arrays)  # np.savez pickles object arrays
    return path


def _raw_pickle(src: Path, path: Path) -> Path:
    marker = path.parent / f"{path.stem}.EXECUTED"
    path.write_bytes(pickle.dumps(Evil(str(marker))))
    return path


def _mat(**variables: Callable[[dict], np.ndarray]):
    def make(src: Path, path: Path) -> Path:
        a = good_arrays(src)
        scipy.io.savemat(path, {k: f(a) for k, f in variables.items()})
        return path

    return make


def _mat_X(a: dict) -> np.ndarray:
    return np.hstack([a["X_train"], a["X_test"]]).T  # examples x features


def _mat_y(a: dict) -> np.ndarray:
    return np.vstack([a["y_train"], a["y_test"]])


# name -> (file name, maker(good_npz, path) -> path, fragments the message must hold)
BAD_INPUTS: dict[str, tuple[str, Callable[[Path, Path], Path] | None, tuple[str, ...]]] = {
    "missing file": ("nope.npz", None, ("no such file",)),
    "wrong suffix": ("digits.csv", _bytes(lambda s: s.read_bytes()), ("not an .npz or .mat",)),
    "text as npz": (
        "text.npz",
        _bytes(lambda s: b"X_train,y_train\n1,2\n"),
        ("not an .npz archive (no zip signature)",),
    ),
    "empty file": ("empty.npz", _bytes(lambda s: b""), ("an empty file",)),
    "single npy": ("single.npz", _npy, ("a single .npy array",)),
    "truncated archive": (
        "truncated.npz",
        _bytes(lambda s: s.read_bytes()[: s.stat().st_size // 2]),
        ("not a readable .npz archive",),
    ),
    "corrupt archive": ("corrupt.npz", _bytes(_flip_middle_byte), ("not a readable .npz",)),
    "text as mat": ("text.mat", _bytes(lambda s: b"hello\n"), ("not a readable .mat file",)),
    "missing keys": ("nokey.npz", _changed(y_test=None), ("missing array(s) y_test",)),
    "mat missing y": ("noy.mat", _mat(X=_mat_X), ("missing variable(s) y",)),
    "X not 2-D": (
        "x3d.npz",
        _changed(X_train=lambda a: a["X_train"][:, :, None]),
        ("X_train must be 2-D",),
    ),
    "feature counts differ": (
        "features.npz",
        _changed(X_test=lambda a: a["X_test"][:-1]),
        ("X_train has 64 features but X_test has 63",),
    ),
    "label 0": (
        "label0.npz",
        _changed(y_train=_with_value("y_train", (0, 0), 0)),
        ("y_train has labels 0..10, expected 1..10",),
    ),
    "label 11": (
        "label11.npz",
        _changed(y_test=_with_value("y_test", (0, 0), 11)),
        ("y_test has labels 1..11, expected 1..10",),
    ),
    "non-integer label": (
        "label15.npz",
        _changed(y_train=_with_value("y_train", (3, 0), 1.5)),
        ("y_train must hold whole numbers",),
    ),
    "y wrong length": (
        "ylen.npz",
        _changed(y_train=lambda a: a["y_train"][:-1]),
        ("y_train has 999 labels for 1000 examples",),
    ),
    "NaN in X": (
        "xnan.npz",
        _changed(X_train=_with_value("X_train", (5, 7), np.nan)),
        ("X_train has 1 NaN or infinite value(s)",),
    ),
    "inf in X": (
        "xinf.npz",
        _changed(X_test=_with_value("X_test", (0, 0), -np.inf)),
        ("X_test has 1 NaN or infinite value(s)",),
    ),
    "NaN label": (
        "ynan.npz",
        _changed(y_test=_with_value("y_test", (2, 0), np.nan)),
        ("y_test has 1 NaN or infinite value(s)",),
    ),
    "empty set": (
        "emptyset.npz",
        _changed(X_test=lambda a: a["X_test"][:, :0], y_test=lambda a: a["y_test"][:0]),
        ("X_test is empty",),
    ),
    "object array": ("object.npz", _object_array, ("holds Python objects (a pickle); refused",)),
    "raw pickle": ("pickle.npz", _raw_pickle, ("a Python pickle", "refused")),
    "non-square image": (
        "nonsquare.npz",
        _changed(X_train=lambda a: a["X_train"][:-1], X_test=lambda a: a["X_test"][:-1]),
        ("63 features is not a square image; set data.image_shape to HxW",),
    ),
    "string features": (
        "strings.npz",
        _changed(X_train=lambda a: a["X_train"].astype(str)),
        ("X_train must be numeric",),
    ),
    "overflowing values": (
        "huge.npz",
        _changed(X_train=lambda a: a["X_train"] * 1e307),
        ("X_train cannot be z-scored", "overflow"),
    ),
}


def make_bad_input(name: str, good: Path, folder: Path) -> Path:
    filename, maker, _ = BAD_INPUTS[name]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    if maker is not None:
        maker(good, path)
    return path


# --- zip bombs: .npz archives written by hand, so that a member can inflate to gigabytes ------


@dataclass
class ZipMember:
    """One zip entry: its compressed ``chunks``, CRC and uncompressed size (``declared`` is the
    size its headers claim, the true one unless a test makes it lie)."""

    name: str
    chunks: list[bytes]
    crc: int
    size: int
    method: int = 8  # deflated
    declared: int | None = None


def npy_header(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    out = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue()


def deflated_zeros(name: str, prefix: bytes, zeros: int) -> ZipMember:
    """``prefix`` then ``zeros`` zero bytes, deflated at 1030:1 in a second or so: one 16 MiB
    block compressed once and repeated (each copy ends with a full flush, so copies chain)."""
    block = 16 << 20
    full, rest = divmod(zeros, block)

    def deflate(data: bytes, mode: int) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush(mode)

    segment = deflate(bytes(block), zlib.Z_FULL_FLUSH)
    chunks = [deflate(prefix, zlib.Z_FULL_FLUSH), *[segment] * full]
    chunks.append(deflate(bytes(rest), zlib.Z_FINISH))
    crc, zero_block = zlib.crc32(prefix), bytes(block)
    for _ in range(full):
        crc = zlib.crc32(zero_block, crc)
    return ZipMember(name, chunks, zlib.crc32(bytes(rest), crc), len(prefix) + zeros)


def npy_member(name: str, array: np.ndarray, method: int = 8) -> ZipMember:
    out = io.BytesIO()
    np.lib.format.write_array(out, array, allow_pickle=False)
    raw = out.getvalue()
    if method == 8:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        data = c.compress(raw) + c.flush()
    else:
        data = raw
    return ZipMember(name, [data], zlib.crc32(raw), len(raw), method)


def write_zip(path: Path, members: list[ZipMember]) -> Path:
    """A plain (not Zip64) archive of ``members``: local headers, data, central directory."""
    central = []
    with path.open("wb") as f:
        for m in members:
            offset, name = f.tell(), m.name.encode()
            csize, usize = sum(map(len, m.chunks)), m.declared if m.declared else m.size
            fields = (20, 0, m.method, 0, 0x21, m.crc, csize, usize, len(name), 0)
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields) + name)
            for chunk in m.chunks:
                f.write(chunk)
            central.append(
                struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, *fields, 0, 0, 0, 0, offset)
                + name
            )
        start = f.tell()
        for entry in central:
            f.write(entry)
        n, size = len(central), f.tell() - start
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, size, start, 0))
    return path


def npz_bomb(good: Path, path: Path, nbytes: int = 3 * 10**9, consistent: bool = False) -> Path:
    """The issue's bomb: ``good``'s arrays, but ``X_train`` inflates to ``nbytes`` of zeros
    (3 GB from 2.9 MB). ``consistent`` gives it as many labels as examples, so that only
    its size can betray it."""
    arrays = good_arrays(good)
    d = arrays["X_train"].shape[0]
    n = nbytes // (8 * d)
    members = [deflated_zeros("X_train.npy", npy_header((d, n)), n * d * 8)]
    if consistent:
        arrays["y_train"] = np.ones((n, 1), dtype=np.int64)
    members += [npy_member(f"{k}.npy", v) for k, v in arrays.items() if k != "X_train"]
    return write_zip(path, members)


def _mat_element(kind: int, payload: bytes) -> bytes:
    """A MATLAB v5 data element: its tag, then ``payload`` padded to 8 bytes."""
    return struct.pack("<II", kind, len(payload)) + payload + bytes(-len(payload) % 8)


def _mat_matrix_head(name: str, shape: tuple[int, int], cls: int, kind: int, nbytes: int) -> bytes:
    """A miMATRIX element up to its data: tag, array flags, dimensions, name, data tag."""
    flags = _mat_element(6, struct.pack("<II", cls, 0))  # miUINT32: the class
    dims = _mat_element(5, struct.pack("<ii", *shape))  # miINT32
    label = _mat_element(1, name.encode())  # miINT8
    body = len(flags) + len(dims) + len(label) + 8 + nbytes + (-nbytes % 8)
    return struct.pack("<II", 14, body) + flags + dims + label + struct.pack("<II", kind, nbytes)


def mat_bomb(path: Path, n: int, d: int = 400, labels: int | None = None) -> Path:
    """A MATLAB v5 file of Coursera's kind: ``X`` (n, d) of float64 zeros, compressed (n = 200,000
    is 640 MB from 0.6 MB; at most 4 GB), and ``y`` (labels, 1) of ones (``labels`` defaults to
    n). Written in a second without holding X in memory: one deflated block of zeros, repeated."""
    header = b"MATLAB 5.0 MAT-file, nnbp tests".ljust(116) + bytes(8) + b"\x00\x01IM"
    nbytes = n * d * 8
    raw = deflated_zeros("X", _mat_matrix_head("X", (n, d), 6, 9, nbytes), nbytes)  # double
    adler = zlib.adler32(_mat_matrix_head("X", (n, d), 6, 9, nbytes))
    # Zero bytes leave Adler-32's sum A as it is and add A to its sum B once each.
    low, high = adler & 0xFFFF, adler >> 16
    adler = (((high + nbytes * low) % 65521) << 16) | low
    stream = b"\x78\xda" + b"".join(raw.chunks) + struct.pack(">I", adler)
    m = n if labels is None else labels
    y = _mat_matrix_head("y", (m, 1), 9, 2, m) + bytes([1]) * m + bytes(-m % 8)  # uint8
    with path.open("wb") as f:
        f.write(header)
        for compressed in (stream, zlib.compress(y)):  # miCOMPRESSED, unpadded
            f.write(struct.pack("<II", 15, len(compressed)) + compressed)
    return path
