"""Writing files so that every output appears whole or not at all, with the same bytes for the
same content; reading a text file with a one-line error; and the MD5 that DVC records of a file.

Each writer fills a temporary file beside the target and renames it into place, so an error,
Ctrl-C or a full disk leaves the previous output as it was. ``atomic_paths`` does the same for
several files that belong together (a model and its history): they are all written before any is
renamed, and Ctrl-C or SIGTERM is held back during the renames (only a failing rename, which does
not happen within one folder of a working disk, could leave the group half replaced). Holding a
signal back means holding back its Python handler: the kernel may deliver the signal to any
thread (OpenBLAS's, the tracking's), but CPython runs the handler in the main thread, between two
bytecodes, so blocking the signal in the renaming thread alone (``pthread_sigmask``) let it
through between two renames.
``.npz`` archives get fixed zip timestamps so that the same arrays always give the same bytes
(and the same ``dvc.lock``). An ``OSError`` raised while writing names the target file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold
_ZIP64_FROM = 2**31  # bytes; well below the 4 GiB limit of plain zip headers, .npy header included
_DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a group of renames happens: their handlers are swapped
    for one that notes them, and what was noted is raised again, for the real handlers, on exit.
    Handlers run in the main thread only, so renames in another thread need nothing of this."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    handlers = {s: signal.getsignal(s) for s in _DEFERRED}
    handlers = {s: h for s, h in handlers.items() if h is not None}  # None: not Python's to swap
    try:
        for signum in handlers:
            signal.signal(signum, lambda signum, frame: noted.append(signum))
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(noted):
            signal.raise_signal(signum)  # the real handler runs now, after the group


def _naming(e: OSError, names: dict[str, Path]) -> OSError:
    """``e`` with the target as its file name when it names a temporary file, or nothing."""
    target = names.get(str(e.filename)) if e.filename is not None else None
    if (e.filename is not None and target is None) or not names:
        return e
    if target is None:
        target = next(iter(names.values()))
    if e.errno is None:
        return OSError(e.errno, str(e), str(target))
    return OSError(e.errno, e.strerror, str(target))  # OSError() picks the subclass from errno


def _temporary(target: Path) -> Path:
    """An empty temporary file beside ``target``; an ``OSError`` naming ``target`` if impossible."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTDIR):
            why = "a parent of it is a file, not a folder"
        else:
            why = f"{e.strerror or e} in {target.parent}"
        raise OSError(e.errno, f"cannot be written ({why})", str(target)) from None
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[list[Path]]:
    """Yield temporary paths beside ``paths``; rename them all into place if the block succeeds.

    On any error or interruption the temporary files are removed and every target is left as it
    was. The renames run with SIGINT and SIGTERM held back, so the group cannot be split by them.
    """
    targets = [Path(p) for p in paths]
    tmps: list[Path] = []
    try:
        for target in targets:
            tmps.append(_temporary(target))
        yield tmps
        with _signals_deferred():
            for tmp, target in zip(tmps, targets, strict=True):
                os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
                os.replace(tmp, target)
    except BaseException as e:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            named = _naming(e, {str(t): p for t, p in zip(tmps, targets, strict=False)})
            if named is not e:
                raise named from None
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    with atomic_paths(path) as (tmp,):
        yield tmp


def save_npz(path: str | Path, **arrays: Any) -> None:
    """Write arrays to an uncompressed ``.npz`` that ``numpy.load`` reads, reproducibly."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            array = np.asanyarray(value)
            # Zip64 headers only where needed: how Python writes a forced one changed in 3.11.x
            # (3.11.2 and 3.11.7 give different bytes), plain headers are the same everywhere.
            with archive.open(info, "w", force_zip64=array.nbytes > _ZIP64_FROM) as f:
                np.lib.format.write_array(f, array, allow_pickle=False)


def read_text(path: str | Path, error: type[UserError], missing: str = "no such file") -> str:
    """The text of ``path``; ``error`` (one line naming the file) if it cannot be read."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_md5(path: str | Path) -> str:
    """The MD5 of a file's bytes (what DVC records), read in 1 MiB blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
