"""The trained network as an MLflow pyfunc model, "models from code": MLflow logs this file as
the model's code and runs it on load, so nothing is pickled.

``mlflow.pyfunc.load_model(uri).predict(X)`` takes images as rows, ``X`` of shape (n, d) in the
form the network was trained on (z-scored as the ``prepare`` stage does), and returns the
predicted digit of each, 0..9, as int64 (n,). The weights are the ``.npz`` that the ``train``
stage wrote and DVC tracks, logged beside this file as the artifact ``weights``; the network is
a copy of ``nnbp/backprop.py`` logged with the model as ``code/nnbp_backprop.py``: the code that
trained it, loadable where nnbp is not installed, and under a name of its own, so that loading
the model never shadows an installed nnbp. With other than 10 classes, the output is the file's
label 1..K.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

WEIGHTS = "weights"  # the artifact's key
NETWORK_MODULE = "nnbp_backprop"  # nnbp/backprop.py as logged with the model


def to_digits(indices: np.ndarray, classes: int) -> np.ndarray:
    """Class indices 0..K-1 as labels: the lab's files store 1..K, and with 10 classes the label
    10 stands for the digit 0, so index ``i`` is the digit ``(i + 1) % 10``."""
    labels = np.asarray(indices, dtype=np.int64) + 1
    return labels % 10 if classes == 10 else labels


def load_weights(path: str) -> list[np.ndarray]:
    """``W1..WL`` of a model written by the train stage (never unpickled)."""
    with np.load(path, allow_pickle=False) as archive:
        names = sorted((k for k in archive.files if k[1:].isdigit()), key=lambda k: int(k[1:]))
        return [archive[name] for name in names]


class Network(PythonModel):
    """The pyfunc model: the lab's network on (n, d) images."""

    def load_context(self, context: Any) -> None:
        import importlib

        # Imported here: MLflow puts the model's code folder on sys.path before loading it.
        self.network = importlib.import_module(NETWORK_MODULE)
        self.weights = load_weights(context.artifacts[WEIGHTS])

    # MLflow reads the input's type hint: np.ndarray asks for no schema of its own (the logged
    # signature is the schema), where no hint at all draws a warning.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        X = np.asarray(model_input, dtype=np.float64)
        d = self.weights[0].shape[1] - 1
        if X.ndim != 2 or X.shape[1] != d:
            raise ValueError(f"expected images as rows, shape (n, {d}); got {X.shape}")
        return to_digits(self.network.predict(self.weights, X.T), self.weights[-1].shape[0])


mlflow.models.set_model(Network())
