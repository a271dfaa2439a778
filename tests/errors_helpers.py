"""Helpers of the error tests: run a stage as the user does, change its parameters, snapshot
outputs, make bad files."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import pickle
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import scipy.io
from click.testing import CliRunner
from ruamel.yaml import YAML

from tests.conftest import clean_env, copy_repo

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages"
OUTPUT_DIRS = ("data/prepared", "models", "reports")
# The workspace's training: the digits, few iterations (params.yaml's other values as they are).
WORKSPACE_PARAMS = {"data.source": "digits", "iters": 20, "log_every": 10}


def stage_env(tracking_uri: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a stage: tracking off, unless ``tracking_uri`` names a store."""
    if tracking_uri is None:
        return clean_env(**extra)
    env = clean_env(MLFLOW_TRACKING_URI=tracking_uri, **extra)
    env.pop("NNBP_TRACKING")
    return env


def stage_cmd(stage: str, *args: str) -> list[str]:
    return [sys.executable, str(STAGES / f"{stage}.py"), *args]


def run_stage(
    stage: str, *args: str, cwd: Path, tracking_uri: str | None = None, timeout: float = 120, **kw
) -> subprocess.CompletedProcess:
    """Run ``stages/STAGE.py ARGS`` in ``cwd`` as the user (or DVC) does."""
    return subprocess.run(
        stage_cmd(stage, *args),
        cwd=cwd,
        env=stage_env(tracking_uri),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


_STAGE_COMMANDS: dict[str, click.Command] = {}


def stage_command(stage: str) -> click.Command:
    """The Click command of ``stages/STAGE.py``, loaded once."""
    if stage not in _STAGE_COMMANDS:
        spec = importlib.util.spec_from_file_location(f"stage_{stage}", STAGES / f"{stage}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _STAGE_COMMANDS[stage] = module.main
    return _STAGE_COMMANDS[stage]


def invoke(
    stage: str, *args: str, cwd: Path, tracking_uri: str | None = None
) -> subprocess.CompletedProcess:
    """Run a stage's command in this process (Click's test runner): the entry point of the
    script without the cost of a new interpreter. Anything but a clean exit propagates."""
    env = {"NNBP_TRACKING": "off", "MLFLOW_TRACKING_URI": None, "DVC_STAGE": None}
    if tracking_uri is not None:
        env.update(NNBP_TRACKING=None, MLFLOW_TRACKING_URI=tracking_uri)
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(
            stage_command(stage), list(args), env=env, catch_exceptions=False
        )
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def write_params(root: Path, changes: Mapping[str, Any]) -> None:
    """Set the dotted keys of ``changes`` in ``root/params.yaml`` (``None`` deletes a key)."""
    yaml = YAML(typ="safe")
    path = root / "params.yaml"
    params = yaml.load(path.read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    with path.open("w") as f:
        yaml.dump(params, f)


@contextlib.contextmanager
def changed_params(root: Path, changes: Mapping[str, Any]) -> Iterator[Path]:
    """``root`` with ``changes`` in its params.yaml for the block (``write_params``)."""
    path = root / "params.yaml"
    before = path.read_text()
    write_params(root, changes)
    try:
        yield root
    finally:
        path.write_text(before)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def assert_one_line_error(
    proc: subprocess.CompletedProcess, *fragments: str, status: int | None = None
) -> str:
    """The process failed with exactly one non-empty stderr line holding every fragment."""
    lines = error_lines(proc.stderr)
    assert proc.returncode != 0, f"exit 0; stdout={proc.stdout!r} stderr={proc.stderr!r}"
    if status is not None:
        assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert len(lines) == 1, f"expected one line, got:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(root: Path, dirs: tuple[str, ...] = OUTPUT_DIRS) -> dict[str, str]:
    """Every file under ``dirs`` (hidden temporary files included) -> its SHA-256."""
    files = {}
    for d in dirs:
        base = root / d
        if base.is_file():
            files[d] = hashlib.sha256(base.read_bytes()).hexdigest()
            continue
        for p in sorted(base.rglob("*")) if base.is_dir() else ():
            if p.is_file():
                files[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def leftover_temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp")]


# --- the workspace: a data file, its prepared arrays, one trained model ----------------------


def project_files(root: Path, changes: Mapping[str, Any] | None = None) -> Path:
    """The project's params.yaml (with ``changes``) and dvc.yaml in ``root``: what a stage
    reads its parameters from."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, root / name)
    write_params(root, changes or {})
    return root


def make_workspace(root: Path) -> None:
    """``project_files`` (``WORKSPACE_PARAMS`` applied) in ``root``, then ``data/digits.npz``,
    ``data/prepared`` and a trained ``h25`` made by the stage scripts, so that every error test
    has previous outputs to compare with."""
    project_files(root, WORKSPACE_PARAMS)
    for stage, args in (("data", ()), ("prepare", ()), ("train", ("h25",))):
        proc = run_stage(stage, *args, cwd=root)
        assert proc.returncode == 0, proc.stderr


# --- bad data files --------------------------------------------------------------------------


class Evil:
    """Unpickling this runs ``os.mkdir(marker)``: proof that a pickle was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _good(src: Path) -> dict[str, np.ndarray]:
    with np.load(src) as f:
        return {k: f[k] for k in f.files}


def _npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


def _changed(**changes: Callable[[dict], np.ndarray] | None):
    """A maker that writes the good arrays with some replaced (a function of all) or dropped."""

    def make(src: Path, path: Path) -> Path:
        arrays = _good(src)
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
    arrays = _good(src)
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
        a = _good(src)
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
    arrays = _good(good)
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


# --- MLflow runs ----------------------------------------------------------------------------


def sqlite_runs(db: Path) -> list[tuple[str, str, int]]:
    """(run id, status, metric rows) of every run in an MLflow SQLite store, read directly
    (quick, no MLflow import) while a stage may be writing to it."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute(
                "SELECT r.run_uuid, r.status, (SELECT COUNT(*) FROM metrics m "
                "WHERE m.run_uuid = r.run_uuid) FROM runs r"
            ).fetchall()
    except sqlite3.Error:  # schema not created yet, or locked
        return []


def wait_for_training(db: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the stage's MLflow run has logged a metric: training has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the stage ended early: {proc.communicate()}")
        if any(status == "RUNNING" and n > 0 for _, status, n in sqlite_runs(db)):
            return
        time.sleep(0.2)
    raise AssertionError("training did not start in time")


def stage_processes(root: Path, script: str = "stages/train.py") -> list[int]:
    """Pids of the running ``python SCRIPT`` processes whose working folder is ``root``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if script.encode() in argv[:3] and (proc / "cwd").resolve() == root.resolve():
                found.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids of ``pids`` still alive after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)]
    return alive


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def init_mlflow_store(db: Path) -> None:
    """Create an MLflow SQLite store (its tables) and the project's experiment, with artifacts
    beside it, so that a stage's first use of it prints nothing."""
    from mlflow import MlflowClient

    from nnbp.tooling.tracking.store import EXPERIMENT

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    client.create_experiment(EXPERIMENT, artifact_location=(db.parent / "artifacts").as_uri())


def mlflow_statuses(uri: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    return [r.info.status for r in runs]


# --- a DVC copy of the project ---------------------------------------------------------------


def copy_project(dst: Path, iters: int = 20, log_every: int = 10) -> None:
    """The project in a fresh git repo ``dst``, with few iterations so ``dvc repro`` is quick."""
    copy_repo(dst, iters=iters, log_every=log_every)


def set_param(root: Path, key: str, value: str, indent: str = "") -> None:
    """Set ``key: value`` (a top-level key, or with ``indent`` a nested one) in params.yaml."""
    path = root / "params.yaml"
    text, n = re.subn(
        rf"^({indent}{re.escape(key)}:[ \t]*)[^#\n]*?([ \t]*(#.*)?)$",
        lambda m: f"{m.group(1)}{value}{m.group(2)}",
        path.read_text(),
        count=1,
        flags=re.M,
    )
    assert n == 1, f"{key} not found in params.yaml"
    path.write_text(text)


def dvc(root: Path, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args],
        cwd=root,
        env=stage_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
