"""The formats of what the pipeline writes and reads back, each defined once: the prepared arrays
(``data/prepared``), a trained model (``models/NAME.npz``), a training history
(``reports/history/NAME.json``) and the metrics (``reports/metrics.json``).

Each is a frozen dataclass with one ``save``/``load`` pair; every reader goes through the safe
archive reader (``nnbp.archive``) and every problem is a ``DataError`` naming the file. The same
values always give the same bytes (``nnbp.files``), so ``dvc.lock`` is reproducible.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from .archive import read_npz
from .backprop import LogPoint
from .errors import DataError, first_line
from .files import atomic_paths, read_text, save_npz, write_json

MODEL_KEYS = ("sizes", "lamb", "tau", "iters", "gradient", "blocks")  # besides W1..WL
HISTORY_KEYS = ("step", "loss", "train_acc", "test_acc")
METRICS = ("train_acc", "test_acc", "loss")

Metrics = dict[str, dict[str, Any]]  # configuration -> {train_acc, test_acc, loss}


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
    """The weights ``W^1..W^L`` (each ``(n_{l+1}, n_l + 1)``, bias in column 0) and the
    hyperparameters that made them; ``blocks``: the blocks its examples were summed in, on which
    the last bits depend."""

    weights: tuple[np.ndarray, ...]
    lamb: float
    tau: float
    iters: int
    gradient: str
    blocks: int

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
        save_npz(
            path,
            **{f"W{i}": W for i, W in enumerate(self.weights, 1)},
            sizes=np.array(self.sizes),
            lamb=np.float64(self.lamb),
            tau=np.float64(self.tau),
            iters=np.int64(self.iters),
            gradient=np.str_(self.gradient),
            blocks=np.int64(self.blocks),
        )

    @classmethod
    def load(cls, path: str | Path) -> TrainedModel:
        """A model as ``save`` writes it, checked to chain: ``W^{l+1}`` takes the ``n_{l+1}``
        outputs of ``W^l`` plus a bias."""
        arrays = read_npz(path, ("W1", *MODEL_KEYS))
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
        return cls(
            weights,
            lamb=float(arrays["lamb"]),
            tau=float(arrays["tau"]),
            iters=int(arrays["iters"]),
            gradient=str(arrays["gradient"]),
            blocks=int(arrays["blocks"]),
        )


@dataclass(frozen=True)
class History:
    """A training's log points, in order (``backprop.LogPoint``: iteration, loss, accuracies)."""

    points: tuple[LogPoint, ...]

    def rows(self) -> list[dict[str, float | None]]:
        """The points as the history file's rows: step, loss, train_acc, test_acc."""
        return [
            {"step": p.iteration, "loss": p.loss, "train_acc": p.train_acc, "test_acc": p.test_acc}
            for p in self.points
        ]

    def columns(self) -> dict[str, list[float | None]]:
        """The points as columns (``step``, ``loss``, ``train_acc``, ``test_acc``)."""
        rows = self.rows()
        return {key: [row[key] for row in rows] for key in HISTORY_KEYS}

    def save(self, path: str | Path) -> None:
        write_json(path, self.rows())

    @classmethod
    def load(cls, path: str | Path) -> History:
        text = read_text(path, DataError)
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}: not a readable history ({first_line(e)})") from None
        if not isinstance(rows, list) or not all(
            isinstance(r, dict) and set(HISTORY_KEYS) <= set(r) for r in rows
        ):
            raise DataError(
                f"{path}: not a history (expected a list of rows with {', '.join(HISTORY_KEYS)})"
            )
        return cls(
            tuple(LogPoint(r["step"], r["loss"], r["train_acc"], r["test_acc"]) for r in rows)
        )


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
    order = sorted(models, key=lambda name: (models[name].sizes, models[name].lamb, name))
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
