"""Issue 11, finding 6, and issue 14: an .npz or .mat that inflates to gigabytes is refused fast,
in bounded memory.

Every .npz member's .npy header is read and checked (against its zip entry, against what its
compressed bytes can hold, against the other arrays and the memory available) before any data is
inflated; a .mat file's variables by their headers (scipy.io.whosmat). The issue's bombs (2.9 MB
inflating to 3 GB; a 0.6 MB .mat inflating to 640 MB) run through the prepare script as a
process, timed and with its peak memory measured; the lying archives run in-process.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.badfiles import (
    ZipMember,
    deflated_zeros,
    good_arrays,
    mat_bomb,
    npy_header,
    npy_member,
    npz_bomb,
    write_zip,
)
from tests.params import changed_params
from tests.project import assert_one_line_error, clean_env, invoke, stage_cmd

GB = 10**9
FAST = 10  # seconds: Python and NumPy start-up on a loaded machine, then reading a few headers
SMALL = 400 * 2**20  # bytes of peak memory: the interpreter, NumPy, and no array of the bomb


def _run_measured(cmd: list[str], cwd: Path, address_space: int | None = None):
    """Run ``cmd``; (result, wall seconds, peak RSS in bytes of that process alone)."""

    def limit() -> None:
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    started = time.monotonic()
    with open(os.devnull, "rb") as stdin:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=clean_env(),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=limit,
        )
    deadline = started + 300
    while True:  # wait4 (not Popen.wait) for the child's own rusage
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.05)
    seconds = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.stdout.close()
    proc.stderr.close()
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    return result, seconds, usage.ru_maxrss * 1024


def test_the_issue_s_bomb_is_refused_in_a_second_without_inflating(unchanged: Path, tmp_path: Path):
    bomb = npz_bomb(unchanged / "data/digits.npz", tmp_path / "bomb.npz")
    assert bomb.stat().st_size < 3_000_000  # 2.9 MB on disk, 3 GB inflated
    with changed_params(unchanged, {"data.path": str(bomb)}):
        proc, seconds, rss = _run_measured(stage_cmd("prepare"), unchanged)
    assert_one_line_error(
        proc, f"Error: {bomb}: y_train has 1000 labels for 5859375 examples", status=1
    )
    print(f"\nbomb refused in {seconds:.2f} s at {rss / 2**20:.0f} MiB peak")
    assert seconds < FAST, f"took {seconds:.1f} s"
    assert rss < SMALL, f"peak memory {rss / 2**20:.0f} MiB"


@pytest.mark.parametrize("nbytes", [3 * GB, GB], ids=["3 GB", "1 GB"])
def test_a_consistent_bomb_beyond_the_memory_is_refused_before_inflating(
    unchanged: Path, tmp_path: Path, nbytes: int
):
    """Labels for every example: only the size betrays it, against a 2 GiB address space. The
    1 GB one fits, but not with the float64 copy and the z-scored values prepare makes of it."""
    bomb = npz_bomb(unchanged / "data/digits.npz", tmp_path / "bomb.npz", nbytes, consistent=True)
    with changed_params(unchanged, {"data.path": str(bomb)}):
        proc, seconds, rss = _run_measured(stage_cmd("prepare"), unchanged, 2 * 2**30)
    need = f"{3 * nbytes / GB:.1f} GB of memory to load and z-score ({nbytes / GB:.1f} GB inflated)"
    line = assert_one_line_error(proc, f"Error: {bomb}: needs {need}, more than the ", status=1)
    assert line.endswith(" available; refused before inflating"), line
    assert seconds < FAST, f"took {seconds:.1f} s"
    assert rss < SMALL, f"peak memory {rss / 2**20:.0f} MiB"


def _with_member(good: Path, path: Path, member: ZipMember, replaces: str = "X_train") -> Path:
    arrays = good_arrays(good)
    members = [npy_member(f"{k}.npy", v) for k, v in arrays.items() if k != replaces]
    return write_zip(path, [member, *members])


def _lying_entry(good: Path, path: Path) -> Path:
    """X_train's header says (64, 1000) float64 but its zip entry inflates to 3 GB."""
    member = deflated_zeros("X_train.npy", npy_header((64, 1000)), 3 * GB)
    return _with_member(good, path, member)


def _claims_too_much(method: int):
    def make(good: Path, path: Path) -> Path:
        """A 3 GB X_train claimed from a few bytes of compressed data."""
        header = npy_header((64, 3 * GB // (64 * 8)))
        member = npy_member("X_train.npy", np.zeros(8), method)
        member.chunks = [header[:100]] if method == 0 else member.chunks
        member.declared = len(header) + 3 * GB
        return _with_member(good, path, member)

    return make


def _bzip2(good: Path, path: Path) -> Path:
    member = npy_member("X_train.npy", good_arrays(good)["X_train"])
    member.method = 12
    return _with_member(good, path, member)


def _not_npy(good: Path, path: Path) -> Path:
    member = deflated_zeros("README.txt", b"hello", 3 * GB)
    return _with_member(good, path, member, replaces="")


def _duplicate(good: Path, path: Path) -> Path:
    arrays = good_arrays(good)
    return _with_member(good, path, npy_member("X_train.npy", arrays["X_train"]), replaces="")


LYING = {
    "entry bigger than its header": (
        _lying_entry,
        "array 'X_train' declares shape (64, 1000) of float64 (512.0 kB) but its zip entry "
        "holds 3.0 GB; refused before inflating",
    ),
    "deflated entry claims too much": (
        _claims_too_much(8),
        "array 'X_train' claims 3.0 GB from ",
        " bytes of deflated data, more than that can hold; refused before inflating",
    ),
    "stored entry claims too much": (
        _claims_too_much(0),
        "array 'X_train' claims 3.0 GB from 100 bytes of stored data, more than that can hold",
    ),
    "bzip2": (_bzip2, "array 'X_train' is compressed with zip method 12; only stored or deflated"),
    "not an array": (_not_npy, "member 'README.txt' is not a .npy array"),
    "duplicate": (_duplicate, "holds two arrays named 'X_train'"),
}


@pytest.mark.parametrize("case", list(LYING))
def test_an_archive_that_lies_about_its_sizes_is_refused_unread(
    unchanged: Path, tmp_path: Path, case: str
):
    make, message, *more = LYING[case]
    path = make(unchanged / "data/digits.npz", tmp_path / "lying.npz")
    started = time.monotonic()
    with changed_params(unchanged, {"data.path": str(path)}):
        proc = invoke("prepare", cwd=unchanged)
    assert_one_line_error(proc, f"Error: {path}: {message}", *more, status=1)
    assert time.monotonic() - started < FAST


def test_a_member_of_a_model_is_checked_too(unchanged: Path, tmp_path: Path):
    """Every reader goes through the same check: a bomb in place of a model."""
    (tmp_path / "models").mkdir()
    bomb = tmp_path / "models/h25.npz"
    member = deflated_zeros("W1.npy", npy_header((25, 65)), 3 * GB)
    with np.load(unchanged / "models/h25.npz") as model:
        rest = [npy_member(f"{k}.npy", model[k]) for k in model.files if k != "W1"]
    write_zip(bomb, [member, *rest])
    proc = invoke("evaluate", "--models", str(tmp_path / "models"), cwd=unchanged)
    assert_one_line_error(
        proc, f"Error: {bomb}: array 'W1' declares shape (25, 65) of float64", status=1
    )


def test_honest_archives_still_load(unchanged: Path, tmp_path: Path):
    """np.savez_compressed and np.savez (stored) archives of the lab's layout still load."""
    arrays = good_arrays(unchanged / "data/digits.npz")
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)
        with changed_params(unchanged, {"data.path": str(path)}):
            proc = invoke("prepare", "--out", str(tmp_path / "p"), cwd=unchanged)
        assert proc.returncode == 0, proc.stderr


# --- .mat bombs -------------------------------------------------------------------------------

MAT_EXAMPLES = 200_000  # X (200,000, 400) float64: 640 MB from 0.6 MB compressed


def test_a_mat_whose_labels_do_not_fit_its_images_is_refused_on_its_headers(
    unchanged: Path, tmp_path: Path
):
    bomb = mat_bomb(tmp_path / "bomb.mat", MAT_EXAMPLES, labels=5000)
    assert bomb.stat().st_size < 1_000_000
    with changed_params(unchanged, {"data.path": str(bomb)}):
        proc, seconds, rss = _run_measured(stage_cmd("prepare"), unchanged)
    assert_one_line_error(proc, f"Error: {bomb}: y has 5000 labels for 200000 examples", status=1)
    assert seconds < FAST, f"took {seconds:.1f} s"
    assert rss < SMALL, f"peak memory {rss / 2**20:.0f} MiB"


def test_a_mat_bomb_beyond_the_memory_is_refused_before_inflating(unchanged: Path, tmp_path: Path):
    """Consistent headers, so only the size betrays it: 3.2 GB of X from 3 MB, then its float64
    copy and its z-scored values, against a 2 GiB address space."""
    bomb = mat_bomb(tmp_path / "bomb.mat", 5 * MAT_EXAMPLES)
    with changed_params(unchanged, {"data.path": str(bomb)}):
        proc, seconds, rss = _run_measured(stage_cmd("prepare"), unchanged, 2 * 2**30)
    need = "needs 9.6 GB of memory to load and z-score (3.2 GB inflated)"
    line = assert_one_line_error(proc, f"Error: {bomb}: {need}, more than the ", status=1)
    assert line.endswith(" available; refused before inflating"), line
    print(f"\n.mat bomb refused in {seconds:.2f} s at {rss / 2**20:.0f} MiB peak")
    assert seconds < FAST, f"took {seconds:.1f} s"
    assert rss < SMALL, f"peak memory {rss / 2**20:.0f} MiB"


def test_an_honest_mat_bomb_sized_file_loads_where_memory_allows(tmp_path: Path):
    """The same writer, small: what the bomb tests refuse is its size, not its form."""
    from nnbp.labdata import load_dataset

    path = mat_bomb(tmp_path / "small.mat", 50, d=4)
    ds = load_dataset(path, n_train=30)
    assert ds.X_train.shape == (4, 30) and ds.X_test.shape == (4, 20)
    assert not ds.X_train.any() and (ds.y_train == 1).all()
