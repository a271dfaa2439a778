"""The safe reader of array files: NumPy's ``.npz`` archives and MATLAB's ``.mat`` files.

Every problem with a file is a ``DataError`` whose message is one line naming the file. Arrays
are read with ``allow_pickle=False``: an archive that carries a pickle is refused, never run.
Nothing is inflated before its size is known: an ``.npz`` member's ``.npy`` header (shape, dtype)
is read and checked against its zip entry and against what its compressed bytes can honestly
hold, a ``.mat`` variable's header through ``scipy.io.whosmat``, and the arrays to load against
the memory available. A zip bomb or a compressed ``.mat`` that inflates to gigabytes is refused
in a fraction of a second, having inflated only its headers.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import DataError, first_line

# DEFLATE codes a 258-byte match in no less than 2 bits: 1032 output bytes per input byte at most
# (zlib's technical notes). A member that claims more than that inflates to a lie.
DEFLATE_MAX_RATIO = 1032
_NPY_HEADER_MAX = 10_000  # NumPy's own limit on the header it parses
# The numeric MATLAB classes, as scipy.io.whosmat names them, and what they load as.
MAT_CLASSES = {
    "double": np.float64,
    "single": np.float32,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "uint32": np.uint32,
    "int64": np.int64,
    "uint64": np.uint64,
    "logical": np.bool_,
}


@dataclass(frozen=True)
class ArrayHeader:
    """What an array's header declares, before any of its data is read."""

    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int


def size_text(n: int) -> str:
    """``n`` bytes for a message: ``3.0 GB``, ``512.0 kB``, ``12 bytes``."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _is_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: no such file")


# --- .npz ------------------------------------------------------------------------------------


def npz_headers(path: str | Path, keys: tuple[str, ...] = ()) -> dict[str, ArrayHeader]:
    """The header of every array of an ``.npz`` file, read without inflating any data and
    checked against its zip entry; ``keys`` must be among them."""
    path = Path(path)
    _is_file(path)
    try:
        with path.open("rb") as f:
            return _npz_headers(path, f, keys)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or first_line(e)})") from None


def read_npz(path: str | Path, keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (checking that ``keys`` are among them), loaded eagerly
    once their headers have been checked and found to fit in the memory available."""
    path = Path(path)
    _is_file(path)
    try:
        with path.open("rb") as f:  # ours to close: np.load leaks its file on a bad archive
            check_memory(path, _npz_headers(path, f, keys))
            f.seek(0)
            return _read_npz(path, f)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or first_line(e)})") from None


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
            f"{path}: array '{key}' claims {size_text(info.file_size)} from "
            f"{size_text(info.compress_size)} of {method} data, more than that can hold; refused "
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
            f"{path}: array '{key}' declares shape {shape} of {dtype} ({size_text(nbytes)}) but "
            f"its zip entry holds {size_text(max(info.file_size - header_size, 0))}; refused "
            "before inflating"
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
    _check_keys(path, headers, keys, "array(s)")
    return headers


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


def _check_keys(path: Path, found: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in found]
    if missing:
        listed = ", ".join(found) or "none"
        raise DataError(f"{path}: missing {what} {', '.join(missing)} (found: {listed})")


# --- .mat ------------------------------------------------------------------------------------


def mat_headers(path: str | Path, keys: tuple[str, ...] = ()) -> dict[str, ArrayHeader]:
    """The header (shape and class) of every variable of a ``.mat`` file, as ``scipy.io.whosmat``
    reads them: a compressed variable's header is inflated, not its data. ``keys`` must be among
    them and be numeric arrays."""
    import scipy.io

    path = Path(path)
    _is_file(path)
    try:
        listed = scipy.io.whosmat(path)
    except Exception as e:
        # scipy raises a zoo of types (MatReadError, ValueError, struct.error...) for a bad file.
        raise DataError(f"{path}: not a readable .mat file ({first_line(e)})") from None
    headers = {}
    for name, shape, cls in listed:
        if name.startswith("__"):
            continue
        kind = MAT_CLASSES.get(cls)
        if kind is None:
            if name in keys:
                raise DataError(f"{path}: variable {name} is a MATLAB {cls}, not a numeric array")
            continue
        dtype = np.dtype(kind)
        headers[name] = ArrayHeader(tuple(shape), dtype, math.prod(shape) * dtype.itemsize)
    _check_keys(path, headers, keys, "variable(s)")
    return headers


def read_mat(path: str | Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The variables ``keys`` of a ``.mat`` file, loaded once their headers have been checked and
    found to fit in the memory available; the other variables are not read."""
    import scipy.io

    path = Path(path)
    headers = mat_headers(path, keys)
    check_memory(path, {k: headers[k] for k in keys})
    try:
        raw = scipy.io.loadmat(path, variable_names=list(keys))
    except MemoryError:
        raise DataError(f"{path}: a variable is too large to load (corrupt header?)") from None
    except Exception as e:
        raise DataError(f"{path}: not a readable .mat file ({first_line(e)})") from None
    return {k: raw[k] for k in keys}


# --- memory ----------------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes this process can still allocate, as far as Linux tells: the smallest of the free
    memory (MemAvailable), a cgroup's remaining limit and the address-space limit (RLIMIT_AS)
    less what is mapped; None where none of them can be read."""
    limits = []
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
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


def check_memory(path: Path, headers: dict[str, ArrayHeader], extra: int = 0) -> None:
    """Refuse a file whose arrays, plus ``extra`` bytes of work on them, cannot fit in the memory
    available, before any of them is inflated."""
    inflated = sum(h.nbytes for h in headers.values())
    need, free = inflated + extra, available_memory()
    if free is None or need <= free:
        return
    what = f"its arrays need {size_text(need)} once inflated"
    if extra:
        what = (
            f"needs {size_text(need)} of memory to load and z-score ({size_text(inflated)} "
            "inflated)"
        )
    raise DataError(
        f"{path}: {what}, more than the {size_text(free)} available; refused before inflating"
    )
