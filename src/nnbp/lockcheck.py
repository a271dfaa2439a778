"""Does dvc.lock describe the models on disk? A check for the metrics gate.

Two DVC commands in one workspace can leave a dvc.lock whose params are not those the outputs
were made with: `dvc exp run -S iters=10` started while `dvc repro` trains is refused by DVC's
lock, but only after it has written ``iters: 10`` into params.yaml, and the running repro then
records that beside models trained with 5,000. Every model records its own hyperparameters
(``models/NAME.npz``: sizes, lamb, tau, iters, gradient, threads, and its weights' dtype), so each
``train@NAME`` entry of dvc.lock can be compared with them, for the cost of reading the models.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nnbp.data import read_model
from nnbp.params import load_yaml


def _recorded(path: Path) -> dict[str, Any]:
    """The hyperparameters ``models/NAME.npz`` records, as params.yaml spells them."""
    weights, meta = read_model(path)
    sizes = [int(s) for s in np.ravel(meta["sizes"])]
    found: dict[str, Any] = {"hidden": sizes[1:-1], "dtype": weights[0].dtype.name}
    recorded = (
        ("lamb", float),
        ("tau", float),
        ("iters", int),
        ("gradient", str),
        ("threads", int),
    )
    for key, kind in recorded:
        if key in meta:  # models written before a key was recorded lack it
            found[key] = kind(meta[key])
    return found


def _same(key: str, locked: Any, model: Any) -> bool:
    try:
        if key == "hidden":
            return [int(h) for h in locked] == model
        return type(model)(locked) == model
    except (TypeError, ValueError):
        return False


def lock_mismatches(lock: Path, models: Path) -> list[str]:
    """One line per hyperparameter on which a ``train@NAME`` entry of ``lock`` and
    ``models/NAME.npz`` disagree; models or stages without a counterpart are not compared."""
    entries = load_yaml(lock).get("stages") or {}
    problems = []
    for stage, entry in entries.items():
        if not str(stage).startswith("train@") or not isinstance(entry, Mapping):
            continue
        name = str(stage).removeprefix("train@")
        model = models / f"{name}.npz"
        if not model.is_file():
            continue
        params = (entry.get("params") or {}).get("params.yaml") or {}
        pinned = params.get(f"configs.{name}") or {}
        for key, value in _recorded(model).items():
            locked = pinned[key] if key in pinned else params.get(key)
            if locked is not None and not _same(key, locked, value):
                problems.append(
                    f"{lock} disagrees with {model}: {key} is {locked} in {lock} but {value} in "
                    f"the model (two DVC commands in one workspace?); run dvc repro -f {stage}"
                )
    return problems
