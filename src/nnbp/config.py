"""The one place that turns ``params.yaml`` into typed, validated values: one schema.

A stage reads only the parameters that ``dvc.yaml`` declares for it (``read("train@h25")``), so
DVC re-runs exactly the stages a change touches: ``Params.get`` refuses any other key, but for
the machine settings of ``RUNTIME`` (``threads``), which change how fast a stage runs and never
a byte of what it writes, so that no stage declares them and DVC re-runs nothing for them. A
section (``Data``...) is read field by field, only the fields its stage declares. The values are
checked by pydantic (strict: no string is taken for a number, no number for a boolean) and every
error is one line naming the key the user typed:

    params.yaml: configs.h25.tau = 0.0: must be > 0

``Training`` is the schema of the training parameters: a configuration's values are the
defaults with its own pins applied (``Training.read``, the one place that merges them). Its
fields say where each goes: ``FIT`` marks the keywords of ``backprop.fit``, ``RECORDED`` the
values the model file records (``artifacts.TrainedModel``), which the metrics gate compares with
``dvc.lock``; the MLflow params are all of them. Adding a hyperparameter is a field here and its
math in ``backprop``. The schema checks the values a stage uses without importing the code that
uses them (the allowed gradient rules are ``backprop``'s, imported when a value is checked), so a
stage depends on no more code than it runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    ValidationError,
    create_model,
)

from .dvcfiles import DVC_FILE, PARAMS_FILE, declared, read_yaml
from .errors import ConfigError

# A configuration name: a plain file name (it names models/NAME.npz) that is also a clean DVC
# stage and params key (no '/', no '.', no '@' or ':'), and not an option (no leading '-').
CONFIG_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
RUNTIME = ("threads",)  # read by stages that do not declare them: they change no output


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


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

    def declares(self, key: str) -> bool:
        """Whether the stage declares ``key`` (itself, or a section holding it)."""
        return key in RUNTIME or any(key == k or key.startswith(f"{k}.") for k in self.keys)

    def get(self, key: str) -> Any:
        if not self.declares(key):
            raise ConfigError(
                f"{DVC_FILE}: stage {self.stage} reads {key} but does not declare it in its "
                "params (DVC would not re-run it when that changes); add it there"
            )
        try:
            return _select(self.values, key)
        except KeyError:
            raise ConfigError(f"{self.source}: {key} is missing") from None


def read(stage: str, params_file: str | os.PathLike = PARAMS_FILE, dvcfile=DVC_FILE) -> Params:
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


@dataclass(frozen=True)
class Role:
    """Where a training parameter goes besides the MLflow params (a field's metadata)."""

    name: str


FIT = Role("fit")  # a keyword of backprop.fit
RECORDED = Role("recorded")  # a value the model file records


def _one_of(value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        quoted = [repr(a) for a in allowed]
        raise ValueError(f"must be {', '.join(quoted[:-1])} or {quoted[-1]}")
    return value


def _gradient(value: str) -> str:
    from .backprop import GRADIENT_RULES

    return _one_of(value, tuple(GRADIENT_RULES))


def _dtype(value: str) -> str:
    from .backprop import DTYPES

    return _one_of(value, DTYPES)


def _source(value: str) -> str:
    from .datasets import SOURCES

    return _one_of(value, SOURCES)


def _zscore(value: str) -> str:
    from .labdata import ZSCORE_MODES

    return _one_of(value, ZSCORE_MODES)


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
# Strings among allowed values, which the code that uses them defines
Source = Annotated[str, Strict(), AfterValidator(_source)]
ZscoreMode = Annotated[str, Strict(), AfterValidator(_zscore)]
GradientRule = Annotated[str, Strict(), AfterValidator(_gradient)]
Dtype = Annotated[str, Strict(), AfterValidator(_dtype)]


class Section(BaseModel):
    """A group of parameters under ``prefix`` (``data`` for ``data.path``), one per field."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    prefix: ClassVar[str] = ""

    @classmethod
    def key(cls, field: str) -> str:
        """The params.yaml key of ``field`` (its alias, where its name would shadow pydantic's)."""
        name = cls.model_fields[field].alias or field
        return f"{cls.prefix}.{name}" if cls.prefix else name

    @classmethod
    def read(cls, params: Params) -> Self:
        """The fields of this section that the stage declares, checked; the others are left
        out (reading one is an AttributeError: the stage would have to declare it)."""
        fields = tuple(f for f in cls.model_fields if params.declares(cls.key(f)))
        keys = {cls.model_fields[f].alias or f: cls.key(f) for f in fields}
        values = {name: params.get(key) for name, key in keys.items()}
        checked = _validated(_part(cls, fields), values, keys, params.source)
        return cls.model_construct(**dict(checked))


@cache
def _part(model: type[Section], fields: tuple[str, ...]) -> type[BaseModel]:
    """A model of ``fields`` of ``model`` alone, as strict as the whole."""
    if fields == tuple(model.model_fields):
        return model
    return create_model(
        model.__name__,
        __config__=model.model_config,
        **{f: (model.model_fields[f].annotation, model.model_fields[f]) for f in fields},
    )


class Data(Section):
    """The data: which embedded set and how it is split (``data``), the file trained on and how
    it is prepared (``prepare``, ``render``)."""

    prefix: ClassVar[str] = "data"
    source: Source
    path: Text
    classes: Annotated[int, Strict(), Field(ge=2)]
    n_train: Whole
    split_seed: Seed
    zscore: ZscoreMode
    image_shape: Annotated[str, Strict(), AfterValidator(_image_shape)]

    @classmethod
    def read(cls, params: Params) -> Self:
        data = super().read(params)
        if "source" in data.__dict__ and "n_train" in data.__dict__:
            from .datasets import SIZE

            size = SIZE[data.source]
            if data.n_train >= size:
                raise ConfigError(
                    f"{params.source}: data.n_train = {data.n_train}: leaves no test example: "
                    f"{data.source} has {size} images; allowed: 1..{size - 1}"
                )
        return data

    @property
    def shape(self) -> tuple[int, int] | None:
        """``image_shape`` as (height, width), None for ``auto``."""
        if self.image_shape == "auto":
            return None
        h, w = self.image_shape.split("x")
        return int(h), int(w)


class Runtime(Section):
    """How many threads run the blocks of training and evaluation (``auto``: the cores this
    process may use, at most the blocks); no output depends on it."""

    threads: Annotated[int | str, PlainValidator(_threads)]


class Render(Section):
    prefix: ClassVar[str] = "render"
    seed: Seed


class Registry(Section):
    """``mlflow.register``: whether the best configuration becomes ``model_name``'s champion."""

    prefix: ClassVar[str] = "mlflow"
    enabled: Annotated[bool, Strict(), Field(alias="register")]
    model_name: Text


class Tolerances(Section):
    """The metrics gate's tolerances (``gate:``; not a stage's)."""

    prefix: ClassVar[str] = "gate"
    max_test_acc_drop: NonNegative
    max_train_acc_drop: NonNegative
    max_loss_rise: NonNegative


class Training(BaseModel):
    """One configuration: the training defaults with the configuration's pins applied. The
    recorded fields come first, in the order the model file stores them."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    hidden: Annotated[tuple[Whole, ...], Field(min_length=1)]
    lamb: Annotated[NonNegative, FIT, RECORDED]
    tau: Annotated[Positive, FIT, RECORDED]
    iters: Annotated[Whole, FIT, RECORDED]
    gradient: Annotated[GradientRule, FIT, RECORDED]
    blocks: Annotated[Whole, FIT, RECORDED]
    dtype: Annotated[Dtype, FIT]
    seed: Seed
    log_every: Whole

    @classmethod
    def fields(cls, role: Role | None = None) -> tuple[str, ...]:
        """The training parameters (not ``name``), or those of ``role``, in schema order."""
        return tuple(
            name
            for name, info in cls.model_fields.items()
            if name != "name" and (role is None or role in info.metadata)
        )

    @classmethod
    def defaults(cls) -> tuple[str, ...]:
        """The parameters with a top-level default in params.yaml (all but ``hidden``)."""
        return tuple(f for f in cls.fields() if f != "hidden")

    def values(self, role: Role) -> dict[str, Any]:
        """This configuration's values of ``role`` (``FIT``: ``backprop.fit``'s keywords)."""
        return {name: getattr(self, name) for name in self.fields(role)}

    @classmethod
    def read(cls, params: Params, name: str) -> Training:
        """Configuration ``name`` of ``params``: the top-level defaults, then ``configs.NAME``."""
        src, where = params.source, f"configs.{name}"
        problem = config_name_problem(name)
        if problem is not None:
            raise ConfigError(f"{src}: configs: {problem}; rename it")
        pins = params.get(where)
        if not isinstance(pins, Mapping):
            raise ConfigError(
                f"{src}: {where} must be a mapping of training parameters (e.g. hidden: [25]), "
                f"got {_kind(pins)}"
            )
        values: dict[str, Any] = {"name": name}
        labels = {"name": where}
        for key in cls.defaults():
            if key not in pins:
                values[key], labels[key] = params.get(key), key
        for key, value in pins.items():
            values[key], labels[key] = value, f"{where}.{key}"
        explain = {
            "extra_forbidden": lambda key: (
                f"{src}: {where}: {key!r} is not a training parameter (a configuration may pin "
                f"{', '.join(cls.fields())})"
            ),
            "missing": lambda key: (
                f"{src}: {where}.{key} is missing: a configuration lists its hidden layer "
                "sizes, e.g. hidden: [25]"
            ),
        }
        return _validated(cls, values, labels, src, explain)


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
        "too_short": lambda: "must not be empty",
        "tuple_type": lambda: "must be a list",
        "value_error": lambda: str(ctx.get("error", error["msg"])),
    }
    return reasons[kind]() if kind in reasons else str(error["msg"]).lower()


def _validated(
    model: type[Any],
    values: dict[str, Any],
    labels: dict[str, str],
    src: str,
    explain: Mapping[str, Any] | None = None,
) -> Any:
    """``model`` made of ``values``; its first problem as a ``ConfigError`` naming the key
    (``explain`` words the errors of a kind, such as a missing or an unknown key, itself)."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        error = e.errors()[0]
        field, *inner = error["loc"]
        if explain and error["type"] in explain:
            raise ConfigError(explain[error["type"]](field)) from None
        value = values.get(field)
        label = labels.get(str(field), str(field))
        # an item of a list: say which
        why = f"{error['input']!r} {_why(error)}" if inner else _why(error)
        raise ConfigError(f"{src}: {label} = {value!r}: {why}") from None
