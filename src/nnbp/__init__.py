"""nnbp: the TP 5 neural-network lab as a reproducible DVC + MLflow pipeline.

One kernel family on every x86-64 CPU with AVX2: OpenBLAS's Haswell kernels and NumPy's AVX2
(X86_V3) loops, chosen here, before NumPy loads (the stages import nnbp first), so that the same
data and parameters give the same bytes on an Intel and an AMD CPU. A setting already in the
environment wins; elsewhere (another architecture, no AVX2, NumPy already loaded) nothing is set.
"""

import os
import platform
import sys

# NumPy's dispatch targets above X86_V3 (AVX-512): disabled, its AVX2 loops run instead.
ABOVE_AVX2 = "X86_V4 AVX512_ICL AVX512_SPR"


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma", "bmi2"} <= flags
    except OSError:
        pass
    return False


if "numpy" not in sys.modules and platform.machine().lower() in ("x86_64", "amd64") and _has_avx2():
    os.environ.setdefault("OPENBLAS_CORETYPE", "Haswell")
    os.environ.setdefault("NPY_DISABLE_CPU_FEATURES", ABOVE_AVX2)
