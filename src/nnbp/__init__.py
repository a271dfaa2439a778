"""nnbp: the TP 5 neural-network lab as a reproducible DVC + MLflow pipeline.

One kernel family on every x86-64 CPU with AVX2, asked for here, before NumPy loads (the stages
import nnbp first): OpenBLAS's Haswell kernels and NumPy's AVX2 (X86_V3) loops, so that the same
data and parameters give the same bytes on an Intel and an AMD CPU (``nnbp.kernels``). A setting
already in the environment wins; elsewhere (another architecture, no AVX2, NumPy already loaded)
nothing is set, and training says so.
"""

from .kernels import ABOVE_AVX2, pin

__all__ = ["ABOVE_AVX2"]

pin()
