"""The trained network as an MLflow pyfunc model, "models from code": MLflow logs this file as
the model's code and runs it on load, so nothing is pickled. ``log_model`` packages it.

``mlflow.pyfunc.load_model(uri).predict(X)`` takes images as rows, ``X`` of shape (n, d) in the
form the network was trained on (z-scored as the ``prepare`` stage does), and returns the
predicted digit of each, 0..9, as int64 (n,). The weights are the ``.npz`` that the ``train``
stage wrote and DVC tracks, logged beside this file as the artifact ``weights``; it is read, and
the network run, by a copy of the nnbp modules that define them (``nnbp.artifacts``,
``nnbp.backprop`` and what they import: ``MODULES``), logged with the model as
``code/nnbp_model/``: the code
that trained it, loadable where nnbp is not installed, and under a name of its own, so that
loading the model never shadows an installed nnbp. With other than 10 classes, the output is the
file's label 1..K.

This file imports nothing of nnbp at its top: on load it runs alone.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

WEIGHTS = "weights"  # the artifact's key
PACKAGE = "nnbp_model"  # the copy of nnbp's modules logged with the model
# What TrainedModel.load and backprop.predict need, of the package's numerics (two folders up);
# each imports only these (relatively).
MODULES = (
    "__init__",
    "kernels",
    "errors",
    "files",
    "archive",
    "dvcfiles",
    "config",
    "parallel",
    "backprop",
    "artifacts",
)
NUMERICS = Path(__file__).resolve().parents[2]


def to_digits(indices: np.ndarray, classes: int) -> np.ndarray:
    """Class indices 0..K-1 as labels: the lab's files store 1..K, and with 10 classes the label
    10 stands for the digit 0, so index ``i`` is the digit ``(i + 1) % 10``."""
    labels = np.asarray(indices, dtype=np.int64) + 1
    return labels % 10 if classes == 10 else labels


class Network(PythonModel):
    """The pyfunc model: the lab's network on (n, d) images."""

    def load_context(self, context: Any) -> None:
        # Imported here: MLflow puts the model's code folder on sys.path before loading it.
        artifacts = importlib.import_module(f"{PACKAGE}.artifacts")
        self.backprop = importlib.import_module(f"{PACKAGE}.backprop")
        self.model = artifacts.TrainedModel.load(context.artifacts[WEIGHTS])
        # As training does: one warning line when the kernels here are not the pinned family
        # (MLflow loads NumPy before this code, so they are not, unless the environment asks).
        importlib.import_module(f"{PACKAGE}.kernels").check()

    # MLflow reads the input's type hint: np.ndarray asks for no schema of its own (the logged
    # signature is the schema), where no hint at all draws a warning.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        X = np.asarray(model_input, dtype=np.float64)
        d, K = self.model.sizes[0], self.model.sizes[-1]
        if X.ndim != 2 or X.shape[1] != d:
            raise ValueError(f"expected images as rows, shape (n, {d}); got {X.shape}")
        return to_digits(self.backprop.predict(list(self.model.weights), X.T), K)


def log_model(
    uri: str, run_id: str, name: str, weights_path: str | Path, input_example: np.ndarray, step: int
) -> str:
    """Log the network of ``weights_path`` to run ``run_id`` of the store ``uri`` as a Model
    named ``name``, linked to the metrics of ``step``; returns its ``models:/`` URI.

    ``input_example`` is a few images as rows (n, d); the signature is (n, d) float64 images in,
    (n,) int64 digits out. The LoggedModel is tagged with the weights file's MD5. MLflow logs a
    model to its active run: the run is resumed for it and ended again (MLflow's fluent API marks it
    FINISHED; its owner sets the status it ends with), without MLflow printing its link.
    """
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from ...files import file_md5
    from .store import WEIGHTS_MD5_TAG

    d = input_example.shape[1]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float64), (-1, d))]),  # unnamed: an array,
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),  # not a dict of them
    )
    # Given, the requirements are not inferred (which loads the model in a subprocess).
    requirements = [f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"]
    mlflow.set_tracking_uri(uri)
    mlflow.start_run(run_id=run_id)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            code = Path(tmp) / PACKAGE
            code.mkdir()
            for module in MODULES:
                shutil.copy(NUMERICS / f"{module}.py", code / f"{module}.py")
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=__file__,
                artifacts={WEIGHTS: str(weights_path)},
                code_paths=[str(code)],
                signature=signature,
                input_example=input_example,
                pip_requirements=requirements,
                tags={WEIGHTS_MD5_TAG: file_md5(weights_path)},
                step=step,
            )
    finally:
        with _quiet_end():
            mlflow.end_run()
    return info.model_uri


@contextlib.contextmanager
def _quiet_end() -> Iterator[None]:
    """MLflow prints a run's link when its fluent run ends: not here, where the run goes on."""
    key = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    saved = os.environ.get(key)
    os.environ[key] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


mlflow.models.set_model(Network())
