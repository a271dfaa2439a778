"""The kernel family: which OpenBLAS and NumPy kernels compute the last bits of every output.

``pin``, run by ``import nnbp`` before NumPy loads, sets ``OPENBLAS_CORETYPE=Haswell`` and
``NPY_DISABLE_CPU_FEATURES`` (NumPy's targets above AVX2) on x86-64 with AVX2 (Intel Core since
Haswell, AMD since Excavator): OpenBLAS then runs its Haswell kernels and NumPy its AVX2
(X86_V3) loops on every such CPU, so an Intel and an AMD CPU, with or without AVX-512, give the
same bytes. Whether the CPU has AVX2 is asked of the CPU itself (its CPUID instruction), as
NumPy and OpenBLAS ask it: under an emulator such as qemu-user, ``/proc/cpuinfo`` describes the
host, not the CPU the program runs on, and pinning Haswell kernels on a CPU without AVX2 crashes
(SIGILL).

The pinning is a wish until NumPy has loaded: ``in_use`` reads which kernels did load
(OpenBLAS's core and NumPy's highest SIMD target), which is what the model file records, and
``check`` says in one warning line (``KernelWarning``) when they are not the pinned family, why
(NumPy imported before nnbp, a setting in the environment, another platform, no AVX2) and what
that means. Nothing here imports NumPy before ``pin`` has run.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import warnings

# NumPy's dispatch targets above X86_V3 (AVX-512): disabled, its AVX2 loops run instead.
ABOVE_AVX2 = "X86_V4 AVX512_ICL AVX512_SPR"
PINNED = {"OPENBLAS_CORETYPE": "Haswell", "NPY_DISABLE_CPU_FEATURES": ABOVE_AVX2}
FAMILY = "OpenBLAS Haswell, NumPy X86_V3"  # what ``in_use`` reads where the pinning held

# x86-64 System V: cpuid(leaf in edi, subleaf in esi, out in rdx) writes eax, ebx, ecx, edx.
_CPUID = bytes.fromhex("53 4989d0 89f8 89f1 0fa2 418900 41895804 41894808 4189500c 5b c3")
# xgetbv(0): which register states the OS saves (XCR0), as edx:eax in rax.
_XGETBV = bytes.fromhex("31c9 0f01d0 48c1e220 4809d0 c3")
# x86-64-v3, what both NumPy's X86_V3 and OpenBLAS's Haswell kernels need: (leaf, register
# index in eax/ebx/ecx/edx, bit) of AVX, FMA, MOVBE, F16C, AVX2, BMI1, BMI2, LZCNT.
_V3_BITS = (
    (1, 2, 28),
    (1, 2, 12),
    (1, 2, 22),
    (1, 2, 29),
    (7, 1, 5),
    (7, 1, 3),
    (7, 1, 8),
    (0x80000001, 2, 5),
)
_OSXSAVE = (1, 2, 27)
_YMM_STATE = 0b110  # XCR0: the OS saves SSE and AVX registers

_obstacle: str | None = None  # why ``pin`` set nothing (None: it pinned, or nothing to say)
_warned = False


class KernelWarning(UserWarning):
    """The kernels that run are not the pinned family: the last bits are this machine's own."""


def _cpuid_leaves() -> dict[int, tuple[int, int, int, int]] | None:
    """The CPUID leaves ``_V3_BITS`` reads, from the CPU's own instruction (run from a page of
    machine code), and XCR0 under key -1; None where that cannot be done (not x86-64, a system
    that refuses executable memory)."""
    import ctypes
    import mmap

    if os.name != "posix":
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):
        return None
    with contextlib.closing(page):
        page.write(_CPUID + _XGETBV)
        base = ctypes.c_char.from_buffer(page)
        try:
            out = (ctypes.c_uint32 * 4)()
            cpuid = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(
                ctypes.addressof(base)
            )
            leaves: dict[int, tuple[int, int, int, int]] = {}
            for leaf in (0, 1, 7, 0x80000000, 0x80000001):
                cpuid(leaf, 0, ctypes.addressof(out))
                leaves[leaf] = (out[0], out[1], out[2], out[3])
            leaf, register, bit = _OSXSAVE
            if leaves[leaf][register] >> bit & 1:  # xgetbv exists only then
                xgetbv = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(base) + len(_CPUID))
                leaves[-1] = (xgetbv(), 0, 0, 0)
            del cpuid
        finally:
            del base  # the page can be unmapped only once no pointer into it is left
    if leaves[0][0] < 7:
        leaves[7] = (0, 0, 0, 0)  # no such leaf: no AVX2
    if leaves[0x80000000][0] < 0x80000001:
        leaves[0x80000001] = (0, 0, 0, 0)
    return leaves


def _cpuinfo_has_v3() -> bool | None:
    """From the kernel's /proc/cpuinfo (the host's flags, even under an emulator)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"} <= flags
    except OSError:
        pass
    return None


def has_x86_v3() -> bool | None:
    """Whether this x86-64 CPU runs AVX2 code (x86-64-v3, with the OS saving its registers);
    None when it cannot be told."""
    leaves = _cpuid_leaves()
    if leaves is None:
        return _cpuinfo_has_v3()
    if not all(leaves[leaf][register] >> bit & 1 for leaf, register, bit in _V3_BITS):
        return False
    return -1 in leaves and leaves[-1][0] & _YMM_STATE == _YMM_STATE


def _why_not_pinnable() -> str | None:
    """Why the pinned family cannot be asked for in this process, or None."""
    if "numpy" in sys.modules:
        asked = " ".join(f"{k}={v!r}" for k, v in PINNED.items())
        return f"NumPy was imported before nnbp; import nnbp first, or set {asked} before Python"
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return f"this is {machine or 'an unknown platform'}, not x86-64"
    v3 = has_x86_v3()
    if v3 is None:
        return "this CPU's features could not be read"
    return None if v3 else "this CPU has no AVX2"


def pin() -> None:
    """Ask for the pinned family before NumPy loads (``import nnbp`` does it); a value already
    set in the environment wins. Remembers why the family may not be had, for ``check``."""
    global _obstacle
    _obstacle = _why_not_pinnable()
    if _obstacle is not None:
        return
    for key, value in PINNED.items():
        if os.environ.setdefault(key, value) != value:
            _obstacle = f"{key}={os.environ[key]!r} is set in the environment; unset it"


def in_use() -> str:
    """The kernel family that runs in this process, e.g. ``OpenBLAS Haswell, NumPy X86_V3``:
    NumPy's BLAS and its core (what ``OPENBLAS_CORETYPE`` picks), and NumPy's highest SIMD
    target found on this CPU and not disabled."""
    import numpy as np
    from threadpoolctl import threadpool_info

    simd = np.show_config(mode="dicts").get("SIMD Extensions", {})
    level = ([*simd.get("baseline", []), *simd.get("found", [])] or ["?"])[-1]
    libraries = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    numpys = [i for i in libraries if "numpy" in str(i.get("filepath", ""))]
    if not (numpys or libraries):
        return f"BLAS unknown, NumPy {level}"
    blas = (numpys or libraries)[0]
    name = {"openblas": "OpenBLAS", "mkl": "MKL", "blis": "BLIS"}.get(
        str(blas.get("internal_api")), str(blas.get("internal_api"))
    )
    core = blas.get("architecture")
    return f"{name} {core}, NumPy {level}" if core else f"{name}, NumPy {level}"


def check() -> str:
    """``in_use()``; if it is not the pinned family, a ``KernelWarning`` (once per process)
    saying why and what it means."""
    global _warned
    family = in_use()
    if family != FAMILY and not _warned:
        _warned = True
        why = _obstacle or "OpenBLAS or NumPy did not take the pinned kernels"
        warnings.warn(
            f"kernels {family}, not the pinned {FAMILY} ({why}): the last bits of what this "
            "process computes are this machine's own, so its weights and dvc.lock's hashes can "
            "differ from a pinned run's (the metrics agree within the gate's tolerances)",
            KernelWarning,
            stacklevel=3,
        )
    return family
