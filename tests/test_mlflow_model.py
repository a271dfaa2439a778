"""The MLflow Model each training run logs, on the real default data (MNIST digits at 20x20).

One copy of the repository with ``data.source: mnist`` runs ``dvc repro train@h25`` (the data,
prepare and one short training) with tracking on; the tests load the logged model as a user
would, with ``mlflow.pyfunc.load_model``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from nnbp.artifacts import Prepared, TrainedModel
from nnbp.backprop import predict
from nnbp.tooling.tracking.store import EXPERIMENT
from tests.project import clean_env, copy_repo, dvc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy trained on MNIST (h25, 60 iterations), and its logged model's ``models:/`` URI."""
    repo = copy_repo(tmp_path_factory.mktemp("mnist"), source="mnist", iters=60, log_every=30)
    dvc(repo, "repro", "train@h25", env=clean_env(NNBP_TRACKING="on"))
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (model,) = client.search_logged_models([experiment.experiment_id])
    return repo, model.model_uri


@pytest.fixture
def store(trained):
    """The copy's store as MLflow's default for the test (as ``MLFLOW_TRACKING_URI`` would)."""
    repo, uri = trained
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    yield repo, uri
    mlflow.set_tracking_uri(previous)


def test_pyfunc_model_predicts_what_nnbp_predicts_on_the_default_mnist_data(store) -> None:
    repo, uri = store
    data = Prepared.load(repo / "data" / "prepared")
    assert data.X_test.shape == (400, 4000)  # the lab's problem: 20x20 images, 4,000 test images
    weights = list(TrainedModel.load(repo / "models" / "h25.npz").weights)
    model = mlflow.pyfunc.load_model(uri)
    for X in (data.X_train, data.X_test):
        got = model.predict(X.T)
        indices = predict(weights, X)
        # The model answers with the digit; nnbp with the class index, label 10 being digit 0.
        assert got.dtype == np.int64 and got.shape == indices.shape
        np.testing.assert_array_equal(got, (indices + 1) % 10)
    # and it has learned something, so the comparison is not between two constant answers
    assert len(np.unique(model.predict(data.X_test.T))) == 10


def test_model_signature_takes_images_and_returns_digits_with_real_test_images_as_example(
    store,
) -> None:
    repo, uri = store
    info = mlflow.models.get_model_info(uri)
    signature = info.signature.to_dict()
    assert json.loads(signature["inputs"]) == [
        {"type": "tensor", "tensor-spec": {"dtype": "float64", "shape": [-1, 400]}}
    ]
    assert json.loads(signature["outputs"]) == [
        {"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}}
    ]
    model = mlflow.pyfunc.load_model(uri)
    example = model.input_example
    np.testing.assert_array_equal(
        example, Prepared.load(repo / "data" / "prepared").X_test[:, :5].T
    )


UNPICKLE_FREE_LOAD = """
import pickle, sys
def refused(*args, **kwargs):
    raise AssertionError("the model unpickled something")
pickle.load = pickle.loads = refused
pickle.Unpickler = refused
import numpy as np, mlflow
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
X = np.load(sys.argv[3])["X"].T
print(",".join(map(str, model.predict(X)[:20])))
print("nnbp" in sys.modules, sys.modules["nnbp_model.artifacts"].__file__)
"""


def test_model_loads_without_unpickling_and_without_the_installed_nnbp(trained) -> None:
    repo, uri = trained
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            UNPICKLE_FREE_LOAD,
            f"sqlite:///{repo / 'mlflow.db'}",
            uri,
            str(repo / "data" / "prepared" / "test.npz"),
        ],
        cwd=repo,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    digits, loaded = result.stdout.strip().splitlines()[-2:]
    X = Prepared.load(repo / "data" / "prepared").X_test
    weights = list(TrainedModel.load(repo / "models" / "h25.npz").weights)
    expected = (predict(weights, X[:, :20]) + 1) % 10
    assert digits == ",".join(map(str, expected))
    # The model's format and network came with it (its code/ folder), not from the installed
    # package: the model file is read by nnbp.artifacts' own copy.
    used_installed, module = loaded.split(" ", 1)
    assert used_installed == "False"
    assert module.endswith("code/nnbp_model/artifacts.py") and str(repo / "mlartifacts") in module
