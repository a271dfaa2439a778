"""The formats of what the pipeline writes and reads back, each defined once: the prepared arrays
(``data/prepared``), a trained model (``models/NAME.npz``), a training history
(``reports/history/NAME.json``) and the metrics (``reports/metrics.json``), whose names are the
fields of ``Scores``.

Each is a frozen dataclass with one ``save``/``load`` pair; every reader goes through the safe
archive reader (``nnbp.archive``) and every problem is a ``DataError`` naming the file. The same
values always give the same bytes (``nnbp.files``), so ``dvc.lock`` is reproducible.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from .archive import read_npz
from .config import RECORDED, Training
from .errors import DataError, first_line
from .files import atomic_paths, read_text, save_npz, write_json


def _metric(*, better: str, decimals: int, shown: int, title: str) -> dict[str, Any]:
    """A metric's metadata: which way is ``better`` ("higher" or "lower"), the ``decimals``
    metrics.json keeps, the decimals a table ``shown``s, a chart's ``title``."""
    return {"better": better, "decimals": decimals, "shown": shown, "title": title}


@dataclass(frozen=True)
class Scores:
    """How a network does on the data: the lab's cost on the training set (regularization
    included) and the training and test accuracies in percent (``test_acc`` None without a test
    set). These are the metrics, everywhere: metrics.json, the histories, MLflow, the gate."""

    loss: float = field(metadata=_metric(better="lower", decimals=6, shown=4, title="loss"))
    train_acc: float = field(
        metadata=_metric(better="higher", decimals=4, shown=2, title="train accuracy (%)")
    )
    test_acc: float | None = field(
        metadata=_metric(better="higher", decimals=4, shown=2, title="test accuracy (%)")
    )

    def metrics(self) -> dict[str, float | None]:
        """As metrics.json holds them: in ``REPORTED`` order, rounded."""
        return {m: _rounded(getattr(self, m), METRICS[m]["decimals"]) for m in REPORTED}


def _rounded(value: float | None, decimals: int) -> float | None:
    return None if value is None else round(value, decimals)


METRICS = {f.name: f.metadata for f in fields(Scores)}  # name -> better, decimals, shown
# metrics.json and the results tables list the accuracies first, then the cost
REPORTED = tuple(sorted(METRICS, key=lambda m: METRICS[m]["better"] == "lower"))
Metrics = dict[str, dict[str, Any]]  # configuration -> {metric: value}, as metrics.json holds it


@dataclass(frozen=True)
class LogPoint:
    """Progress after ``iteration`` updates."""

    iteration: int
    scores: Scores


@dataclass(frozen=True)
class Prepared:
    """The prepared data (sections 3, 4.2): z-scored ``X_*`` (d, n) features x examples, the
    one-hot training targets ``Y_train`` (K, n), class indices ``y_*`` (n,) in 0..K-1, and the
    images' (height, width)."""

    X_train: np.ndarray
    Y_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple[int, int]

    @property
    def features(self) -> int:
        return self.X_train.shape[0]

    @property
    def classes(self) -> int:
        return self.Y_train.shape[0]

    def save(self, folder: str | Path) -> None:
        """``train.npz`` (X, Y, y, image_shape) and ``test.npz`` (X, y): both or neither, since
        a train.npz beside a stale test.npz would mislead every later stage."""
        paths = (Path(folder) / "train.npz", Path(folder) / "test.npz")
        with atomic_paths(*paths) as (train, test):
            save_npz(
                train,
                X=self.X_train,
                Y=self.Y_train,
                y=self.y_train,
                image_shape=np.array(self.image_shape),
            )
            save_npz(test, X=self.X_test, y=self.y_test)

    @classmethod
    def load(cls, folder: str | Path) -> Prepared:
        train = read_npz(Path(folder) / "train.npz", ("X", "Y", "y", "image_shape"))
        test = read_npz(Path(folder) / "test.npz", ("X", "y"))
        shape = tuple(int(s) for s in np.ravel(train["image_shape"]))
        return cls(train["X"], train["Y"], train["y"], test["X"], test["y"], shape)


@dataclass(frozen=True)
class TrainedModel:
    """The weights ``W^1..W^L`` (each ``(n_{l+1}, n_l + 1)``, bias in column 0) and ``hyper``,
    the values of the training parameters that the schema marks ``RECORDED``
    (``config.Training``: lamb, tau, iters, gradient, blocks), in its order. ``blocks``, the
    blocks its examples were summed in, is what its evaluation sums in too. ``kernels`` is the
    kernel family that trained it (``nnbp.kernels.in_use``), on which the weights' last bits
    depend: a fact of the model, not a training parameter ("" in a file from before it was
    recorded)."""

    weights: tuple[np.ndarray, ...]
    hyper: Mapping[str, Any]
    kernels: str = ""

    @property
    def sizes(self) -> list[int]:
        """The layer sizes ``[n_1 = d, ..., n_L = K]``."""
        return [self.weights[0].shape[1] - 1, *(W.shape[0] for W in self.weights)]

    @property
    def hidden(self) -> list[int]:
        return self.sizes[1:-1]

    @property
    def dtype(self) -> str:
        return self.weights[0].dtype.name

    def save(self, path: str | Path) -> None:
        """W1..WL, the sizes, each recorded value, then the kernels, each a 0-d array."""
        save_npz(
            path,
            **{f"W{i}": W for i, W in enumerate(self.weights, 1)},
            sizes=np.array(self.sizes),
            **{key: _scalar(value) for key, value in self.hyper.items()},
            kernels=_scalar(self.kernels),
        )

    @classmethod
    def load(cls, path: str | Path) -> TrainedModel:
        """A model as ``save`` writes it, checked to chain: ``W^{l+1}`` takes the ``n_{l+1}``
        outputs of ``W^l`` plus a bias."""
        recorded = Training.fields(RECORDED)
        arrays = read_npz(path, ("W1", "sizes", *recorded))
        names = sorted(
            (k for k in arrays if k[:1] == "W" and k[1:].isdigit()), key=lambda k: int(k[1:])
        )
        if names != [f"W{i}" for i in range(1, len(names) + 1)]:
            raise DataError(f"{path}: weight matrices {', '.join(names)} are not W1..WL")
        weights = tuple(arrays[name] for name in names)
        sizes = [int(s) for s in np.ravel(arrays["sizes"])]
        shapes = [(n_next, n + 1) for n, n_next in pairwise(sizes)]
        if [W.shape for W in weights] != shapes or len(sizes) != len(weights) + 1:
            found = ", ".join(f"{W.shape}" for W in weights)
            raise DataError(f"{path}: weight shapes {found} do not match layer sizes {sizes}")
        kernels = str(arrays["kernels"].item()) if "kernels" in arrays else ""
        return cls(weights, {key: arrays[key].item() for key in recorded}, kernels)


def _scalar(value: Any) -> np.ndarray:
    """A recorded value as the 0-d array the model file stores: float64, int64 or a string."""
    if isinstance(value, str):
        return np.str_(value)
    return np.int64(value) if isinstance(value, int) else np.float64(value)


@dataclass(frozen=True)
class History:
    """A training's log points, in order."""

    points: tuple[LogPoint, ...]

    def rows(self) -> list[dict[str, float | None]]:
        """The points as the history file's rows: step, then every metric."""
        return [{"step": p.iteration, **vars(p.scores)} for p in self.points]

    def columns(self) -> dict[str, list[float | None]]:
        """The points as columns: ``step``, then every metric."""
        rows = self.rows()
        return {key: [row[key] for row in rows] for key in ("step", *METRICS)}

    def save(self, path: str | Path) -> None:
        write_json(path, self.rows())

    @classmethod
    def load(cls, path: str | Path) -> History:
        text = read_text(path, DataError)
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}: not a readable history ({first_line(e)})") from None
        keys = ("step", *METRICS)
        if not isinstance(rows, list) or not all(
            isinstance(r, dict) and set(keys) <= set(r) for r in rows
        ):
            raise DataError(
                f"{path}: not a history (expected a list of rows with {', '.join(keys)})"
            )
        return cls(tuple(LogPoint(r["step"], Scores(**{m: r[m] for m in METRICS})) for r in rows))


def save_trained(
    model: TrainedModel, history: History, model_path: Path, history_path: Path
) -> None:
    """The model and its history together, or neither."""
    with atomic_paths(model_path, history_path) as (model_tmp, history_tmp):
        model.save(model_tmp)
        history.save(history_tmp)


def load_models(folder: str | Path, *, features: int, classes: int) -> dict[str, TrainedModel]:
    """Every ``NAME.npz`` model in ``folder`` by name, in the lab's order (smaller networks
    first, then more regularization), each checked to take ``features`` inputs and give
    ``classes`` outputs."""
    models = {p.stem: TrainedModel.load(p) for p in sorted(Path(folder).glob("*.npz"))}
    if not models:
        raise DataError(f"{folder}: no trained model (*.npz) found")
    for name, model in models.items():
        d, K = model.sizes[0], model.sizes[-1]
        if (d, K) != (features, classes):
            raise DataError(
                f"{Path(folder) / name}.npz: a {d}-input, {K}-class model for data with "
                f"{features} features and {classes} classes; if its configuration is gone, "
                "delete it (DVC leaves the outputs of a removed stage in place)"
            )
    order = sorted(models, key=lambda name: (models[name].sizes, models[name].hyper["lamb"], name))
    return {name: models[name] for name in order}


def parse_metrics(text: str, where: str) -> Metrics:
    """The metrics file's content: an object mapping each configuration to its metrics."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, Mapping) for v in data.values()):
        raise DataError(f"{where}: expected an object mapping each configuration to its metrics")
    return data


def load_metrics(path: str | Path) -> Metrics:
    text = read_text(path, DataError, "no such metrics file (run the pipeline first)")
    return parse_metrics(text, str(path))
