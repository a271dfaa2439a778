"""Editing a copy's params.yaml as a user edits it: dotted keys, comments and order kept."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

DELETE = object()  # a value that removes its key


def set_params(root: Path, changes: Mapping[str, Any]) -> None:
    """Set the dotted keys of ``changes`` in ``root/params.yaml`` (``DELETE`` removes one),
    keeping the file's comments and the order of its keys."""
    yaml = YAML()  # round-trip: comments stay
    path = root / "params.yaml"
    params = yaml.load(path.read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    with path.open("w") as f:
        yaml.dump(params, f)


@contextlib.contextmanager
def changed_params(root: Path, changes: Mapping[str, Any]) -> Iterator[Path]:
    """``root`` with ``changes`` in its params.yaml for the block, then the file as it was."""
    path = root / "params.yaml"
    before = path.read_text()
    set_params(root, changes)
    try:
        yield root
    finally:
        path.write_text(before)
