"""DVC's files, read as DVC reads them (ruamel.yaml, safe): ``params.yaml``, what ``dvc.yaml``
declares for a stage, and what ``dvc.lock`` recorded of each stage (its params, its outputs).

Every problem is a ``ConfigError`` naming the file. Nothing here runs DVC or git.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import read_text

PARAMS_FILE = Path("params.yaml")
DVC_FILE = Path("dvc.yaml")
LOCK_FILE = Path("dvc.lock")


def parse_yaml(text: str, where: str) -> Any:
    """``text`` parsed as DVC parses YAML; ``where`` names it in the error."""
    from ruamel.yaml import YAML, YAMLError

    try:
        return YAML(typ="safe").load(io.StringIO(text))
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{line}") from None


def read_yaml(path: str | Path) -> Any:
    """The YAML file ``path``, parsed as DVC parses it."""
    return parse_yaml(read_text(path, ConfigError), str(path))


def declared(stage: str, dvcfile: str | Path = DVC_FILE) -> tuple[str, ...]:
    """The ``params.yaml`` keys that ``dvcfile`` declares for ``stage`` (``train@h25`` for an
    item of a ``foreach`` stage), as ``dvc.api.params_show(stages=[stage])`` reads them."""
    pipeline = read_yaml(dvcfile)
    stages = pipeline.get("stages") if isinstance(pipeline, Mapping) else None
    name, _, item = stage.partition("@")
    body = stages.get(name) if isinstance(stages, Mapping) else None
    if not isinstance(body, Mapping):
        raise ConfigError(f"{dvcfile}: no stage {name}")
    if "foreach" in body:
        if not item:
            raise ConfigError(f"{dvcfile}: stage {name} runs once per item: name one, {name}@KEY")
        body = body.get("do") or {}
    keys: list[str] = []
    for entry in body.get("params") or []:
        if isinstance(entry, Mapping):  # {other.yaml: [keys]}: only params.yaml is read here
            for file, listed in entry.items():
                if Path(str(file)) != PARAMS_FILE:
                    raise ConfigError(f"{dvcfile}: stage {stage} reads {file}; only params.yaml")
                keys += [str(k) for k in listed or []]
        else:
            keys.append(str(entry))
    return tuple(k.replace("${key}", item) for k in keys)


def _stages(lock: Any) -> Mapping[str, Any]:
    stages = lock.get("stages") if isinstance(lock, Mapping) else None
    return stages if isinstance(stages, Mapping) else {}


def nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Keys as dvc.lock records them, flat (``configs.h25``, ``tau``), nested again as in
    params.yaml (``{"configs": {"h25": ...}, "tau": ...}``)."""
    values: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = str(key).split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return values


def locked_params(lock: Any) -> dict[str, dict[str, Any]]:
    """Each stage of a parsed dvc.lock -> the params.yaml values it recorded, flat as DVC
    records them (``{"train@h25": {"configs.h25": {...}, "tau": 0.2, ...}}``)."""
    return {
        str(stage): dict((entry.get("params") or {}).get(str(PARAMS_FILE)) or {})
        for stage, entry in _stages(lock).items()
        if isinstance(entry, Mapping)
    }


def locked_outputs(lock: Any) -> list[tuple[str, str, str]]:
    """(stage, path, md5) of every output a parsed dvc.lock recorded with a hash; a folder's md5
    ends in ``.dir``. DVC keeps the entry of a stage that dvc.yaml no longer has (a removed
    configuration's ``train@NAME``): the caller decides which stages count."""
    return [
        (str(stage), str(out["path"]), str(out["md5"]))
        for stage, entry in _stages(lock).items()
        if isinstance(entry, Mapping)
        for out in entry.get("outs") or []
        if isinstance(out, Mapping) and "md5" in out
    ]
