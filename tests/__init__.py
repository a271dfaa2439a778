# Imported before any test module, and so before NumPy: the test process runs the pinned kernels,
# as a stage does (nnbp.kernels), and a stage command run in it says nothing about them.
import nnbp  # noqa: F401
