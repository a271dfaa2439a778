"""The one place that turns ``params.yaml`` into typed, validated values.

A stage reads only the parameters that ``dvc.yaml`` declares for it (``read("train@h25")``), so
DVC re-runs exactly the stages a change touches: ``Params.get`` refuses any other key, but for
the machine settings of ``RUNTIME`` (``threads``), which change how fast a stage runs and never
a byte of what it writes, so that no stage declares them and DVC re-runs nothing for them. The
values are checked against one schema (types, ranges, allowed keys; pydantic, strict: no string
is taken for a number, no number for a boolean) and every error is one line naming the key the
user typed:

    params.yaml: configs.h25.tau = 0.0: must be > 0

A configuration's values are the training defaults with its own pins applied, merged here and
nowhere else (``Training.read``): the train stage and the metrics gate's lock check both use it.
Nothing of ``params.yaml`` is ever pasted into a shell command: the stages read it themselves.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    ValidationError,
)

from .backprop import DTYPES, GRADIENT_RULES, ZSCORE_MODES
from .datasets import SIZE, SOURCES
from .errors import UserError
from .files import read_text

PARAMS_FILE = Path("params.yaml")
DVC_FILE = Path("dvc.yaml")
# A configuration name: a plain file name (it names models/NAME.npz) that is also a clean DVC
# stage and params key (no '/', no '.', no '@' or ':'), and not an option (no leading '-').
CONFIG_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
RUNTIME = ("threads",)  # read by stages that do not declare them: they change no output


class ConfigError(UserError):
    """A parameter, params.yaml or dvc.yaml that cannot be used; ``str()`` names the key."""

    exit_code = 2  # a bad parameter, as Click reports a bad option


def read_yaml(path: str | Path) -> Any:
    """``path`` parsed as DVC parses it (ruamel.yaml, safe), so both see the same values."""
    from ruamel.yaml import YAML, YAMLError

    path = Path(path)
    text = read_text(path, ConfigError)
    try:
        return YAML(typ="safe").load(text)
    except YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{line}") from None


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


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


def _select(values: Any, key: str) -> Any:
    """The value of ``a.b.c`` in nested mappings; KeyError if it is not there."""
    node = values
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


class Params:
    """The parameters one stage may read: ``values`` (params.yaml) under the ``keys`` it
    declares. ``source`` names the file in errors."""

    def __init__(
        self, values: Any, keys: Sequence[str], *, source: str = "params.yaml", stage: str = ""
    ) -> None:
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: expected a mapping of parameters, got {_kind(values)}")
        self.values, self.keys, self.source, self.stage = values, tuple(keys), source, stage

    def get(self, key: str) -> Any:
        if key not in RUNTIME and not any(key == k or key.startswith(f"{k}.") for k in self.keys):
            raise ConfigError(
                f"{DVC_FILE}: stage {self.stage} reads {key} but does not declare it in its "
                "params (DVC would not re-run it when that changes); add it there"
            )
        try:
            return _select(self.values, key)
        except KeyError:
            raise ConfigError(f"{self.source}: {key} is missing") from None


def read(
    stage: str, params_file: str | Path = PARAMS_FILE, dvcfile: str | Path = DVC_FILE
) -> Params:
    """The parameters of ``params_file`` that ``dvcfile`` declares for ``stage``."""
    return Params(
        read_yaml(params_file), declared(stage, dvcfile), source=str(params_file), stage=stage
    )


def configuration_of_stage() -> str | None:
    """The configuration DVC runs the train stage for: NAME of ``DVC_STAGE=train@NAME``, which
    DVC sets for every stage command; None outside DVC."""
    stage = os.environ.get("DVC_STAGE", "").rsplit(":", 1)[-1]  # dvc.yaml:train@h25 elsewhere
    name, at, item = stage.partition("@")
    return item if at and name == "train" else None


# --- the schema ------------------------------------------------------------------------------


def _threads(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError("must be auto (the cores this process may use) or a whole number >= 1")


def _image_shape(value: str) -> str:
    if value != "auto" and not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", value):
        raise ValueError("must be auto (square images) or HxW, e.g. 20x20")
    return value


Whole = Annotated[int, Strict(), Field(ge=1)]
Seed = Annotated[int, Strict(), Field(ge=0)]
Positive = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
Text = Annotated[str, Strict(), Field(min_length=1)]
Threads = Annotated[int | str, PlainValidator(_threads)]


class _Section(BaseModel):
    """A group of parameters under ``prefix`` (``data`` for ``data.path``), one per field."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    prefix: ClassVar[str] = ""

    @classmethod
    def read(cls, params: Params) -> Self:
        # a field's name in params.yaml is its alias, where its own name would shadow pydantic's
        names = [info.alias or field for field, info in cls.model_fields.items()]
        keys = {name: f"{cls.prefix}.{name}" if cls.prefix else name for name in names}
        values = {name: params.get(key) for name, key in keys.items()}
        return _validated(cls, values, keys, params.source)


class EmbeddedData(_Section):
    """The ``data`` stage: which embedded data set, and how it is split."""

    prefix: ClassVar[str] = "data"
    source: Literal[SOURCES]
    n_train: Whole
    split_seed: Seed

    @classmethod
    def read(cls, params: Params) -> Self:
        data = super().read(params)
        size = SIZE[data.source]
        if data.n_train >= size:
            raise ConfigError(
                f"{params.source}: data.n_train = {data.n_train}: leaves no test example: "
                f"{data.source} has {size} images; allowed: 1..{size - 1}"
            )
        return data


class Data(_Section):
    """The data trained on and how it is prepared (``prepare``, ``render``)."""

    prefix: ClassVar[str] = "data"
    source: Literal[SOURCES]
    path: Text
    classes: Annotated[int, Strict(), Field(ge=2)]
    n_train: Whole
    split_seed: Seed
    zscore: Literal[ZSCORE_MODES]
    image_shape: Annotated[str, Strict(), AfterValidator(_image_shape)]

    @property
    def shape(self) -> tuple[int, int] | None:
        """``image_shape`` as (height, width), None for ``auto``."""
        if self.image_shape == "auto":
            return None
        h, w = self.image_shape.split("x")
        return int(h), int(w)


class DataFile(_Section):
    """The data file a training run records (``train``)."""

    prefix: ClassVar[str] = "data"
    path: Text


class Runtime(_Section):
    """How many threads run the blocks of training and evaluation (``auto``: the cores this
    process may use, at most the blocks); no output depends on it."""

    threads: Threads


class Render(_Section):
    prefix: ClassVar[str] = "render"
    seed: Seed


class Registry(_Section):
    """``mlflow.register``: whether the best configuration becomes ``model_name``'s champion."""

    prefix: ClassVar[str] = "mlflow"
    enabled: Annotated[bool, Strict(), Field(alias="register")]
    model_name: Text


class Tolerances(_Section):
    """The metrics gate's tolerances (``gate:``; not a stage's)."""

    prefix: ClassVar[str] = "gate"
    max_test_acc_drop: NonNegative
    max_train_acc_drop: NonNegative
    max_loss_rise: NonNegative


class Training(BaseModel):
    """One configuration: the training defaults with the configuration's pins applied."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    hidden: Annotated[tuple[Whole, ...], Field(min_length=1)]
    tau: Positive
    lamb: NonNegative
    iters: Whole
    seed: Seed
    gradient: Literal[GRADIENT_RULES]
    dtype: Literal[DTYPES]
    log_every: Whole
    blocks: Whole

    DEFAULTS: ClassVar[tuple[str, ...]] = (
        "tau",
        "iters",
        "lamb",
        "seed",
        "gradient",
        "dtype",
        "log_every",
        "blocks",
    )
    PINNABLE: ClassVar[tuple[str, ...]] = ("hidden", *DEFAULTS)

    @classmethod
    def read(cls, params: Params, name: str) -> Training:
        """Configuration ``name`` of ``params``: the top-level defaults, then ``configs.NAME``."""
        src = params.source
        problem = config_name_problem(name)
        if problem is not None:
            raise ConfigError(f"{src}: configs: {problem}; rename it")
        pins = params.get(f"configs.{name}")
        where = f"configs.{name}"
        if not isinstance(pins, Mapping):
            raise ConfigError(
                f"{src}: {where} must be a mapping of training parameters (e.g. hidden: [25]), "
                f"got {_kind(pins)}"
            )
        for key in pins:
            if key not in cls.PINNABLE:
                raise ConfigError(
                    f"{src}: {where}: {str(key)!r} is not a training parameter (a configuration "
                    f"may pin {', '.join(cls.PINNABLE)})"
                )
        if "hidden" not in pins:
            raise ConfigError(
                f"{src}: {where}.hidden is missing: a configuration lists its hidden layer "
                "sizes, e.g. hidden: [25]"
            )
        values: dict[str, Any] = {"name": name}
        labels = {"name": where}
        for key in cls.DEFAULTS:
            if key not in pins:
                values[key], labels[key] = params.get(key), key
        for key, value in pins.items():
            values[key], labels[key] = value, f"{where}.{key}"
        return _validated(cls, values, labels, src)


def config_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a configuration, or None if it can."""
    if isinstance(name, int) and not isinstance(name, bool):
        name = str(name)  # a YAML key such as 100: is an integer
    if isinstance(name, str) and CONFIG_NAME.fullmatch(name):
        return None
    return (
        f"configuration name {str(name)!r} is not a plain file name (letters, digits, '_' and "
        f"'-', not starting with '-'); it would name models/{name}.npz"
    )


def _why(error: Mapping[str, Any]) -> str:
    """A pydantic error as the end of a one-line message: ``must be > 0``."""
    kind, ctx = error["type"], error.get("ctx") or {}

    def bound(key: str) -> str:
        value = ctx[key]
        return f"{value:g}" if isinstance(value, float) else str(value)

    reasons = {
        "greater_than": lambda: f"must be > {bound('gt')}",
        "greater_than_equal": lambda: f"must be >= {bound('ge')}",
        "finite_number": lambda: "must be a finite number",
        "float_type": lambda: "must be a number",
        "int_type": lambda: "must be a whole number",
        "bool_type": lambda: "must be true or false",
        "string_type": lambda: "must be a string",
        "string_too_short": lambda: "must not be empty",
        "literal_error": lambda: f"must be {ctx['expected']}",
        "too_short": lambda: "must not be empty",
        "tuple_type": lambda: "must be a list",
        "value_error": lambda: str(ctx.get("error", error["msg"])),
    }
    return reasons[kind]() if kind in reasons else str(error["msg"]).lower()


def _validated(model: type[Any], values: dict[str, Any], labels: dict[str, str], src: str) -> Any:
    """``model`` made of ``values``; its first problem as a ``ConfigError`` naming the key."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        error = e.errors()[0]
        field, *inner = error["loc"]
        value = values.get(field)
        label = labels.get(str(field), str(field))
        # an item of a list: say which
        why = f"{error['input']!r} {_why(error)}" if inner else _why(error)
        raise ConfigError(f"{src}: {label} = {value!r}: {why}") from None
