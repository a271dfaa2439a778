"""What dvc.yaml may hand to a shell: every interpolated parameter, checked before any command.

DVC builds each stage's command line by pasting parameters into it (``${data.path}``) and runs it
through a shell, so a value holding shell syntax would run as a command. dvc.yaml therefore puts
every scalar ``${...}`` of a command between single quotes, inside which a POSIX shell gives no
character a meaning but the closing quote; DVC's ``${item}`` (a configuration unpacked into
``--KEY VALUE`` options) quotes string values with ``shlex.quote`` but pastes keys as they are.
``check`` makes sure that every ``${...}`` of dvc.yaml resolves, in params.yaml, to a value that
can be passed that way, and refuses, in one line naming the parameter, anything else:

- a list or a mapping where one value goes (DVC unpacks a mapping into a command unquoted);
- a single quote (it would close the quotes), a backslash (fish reads ``\\'`` inside quotes as a
  quote) or a newline or other non-printable character (DVC splits a command at line breaks);
- a configuration name that is not a plain file name (it names ``models/NAME.npz``);
- a configuration key that is not a training parameter, or not a plain identifier.

It also refuses a dvc.yaml command that interpolates a value outside single quotes, so that an
edit of dvc.yaml cannot reopen the hole unnoticed. Every command of dvc.yaml runs this check first
(``stages/check_params.py``): it only reads, and only decides whether the stage may run at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# DVC's own pattern (dvc/parsing/interpolate.py): `${...}`, except when escaped as `\${...}`.
INTERPOLATION = re.compile(r"(?<!\\)\$\{(?P<inner>.*?)\}")
# A configuration name: a plain file name that is also a clean DVC stage and params key
# (no '/', no '.', no '@' or ':'), and not an option (no leading '-').
CONFIG_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
OPTION_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # `${item}` turns a key into `--KEY`
PINNABLE_EXTRA = ("hidden",)  # configuration keys besides the top-level training defaults
LIST_KEYS = ("hidden",)  # the one option given once per item (`--hidden 100 --hidden 50`)


class ParamsError(ValueError):
    """A parameter that cannot be passed to a command safely; ``str()`` is one line."""


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


def load_yaml(path: Path) -> Any:
    """``path`` parsed as DVC parses it (ruamel.yaml, safe), so both see the same values."""
    from ruamel.yaml import YAML, YAMLError

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ParamsError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    try:
        return YAML(typ="safe").load(text) or {}
    except YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ParamsError(f"{path}: not valid YAML{line}") from None


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _check_text(source: str, label: str, value: str) -> None:
    why = None
    if "'" in value:
        why = "a single quote (')"
    elif "\\" in value:
        why = "a backslash (\\)"
    elif not value.isprintable():
        why = "a newline or another control character"
    if why is not None:
        raise ParamsError(
            f"{source}: {label} = {value!r} holds {why}, which cannot be passed to a stage "
            "command safely; change it (refused before any command ran)"
        )


def _check_scalar(source: str, label: str, value: Any) -> None:
    """One value pasted between single quotes: a string, a number, a boolean or null."""
    if isinstance(value, str):
        _check_text(source, label, value)
    elif value is not None and not isinstance(value, bool | int | float):
        raise ParamsError(
            f"{source}: {label} must be a single number or string, got {_kind(value)}"
        )


def _check_item(source: str, label: str, item: Any, pinnable: tuple[str, ...]) -> None:
    """A configuration unpacked by ``${item}`` into ``--KEY VALUE`` options for train.py."""
    if not isinstance(item, Mapping):
        raise ParamsError(
            f"{source}: {label} must be a mapping of training parameters "
            f"(e.g. hidden: [25]), got {_kind(item)}"
        )
    for key, value in item.items():
        where = f"{label}.{key}"
        if not isinstance(key, str) or not OPTION_KEY.fullmatch(key) or key not in pinnable:
            raise ParamsError(
                f"{source}: {label}: {str(key)!r} is not a training parameter "
                f"(a configuration may pin {', '.join(pinnable)})"
            )
        # DVC renders true as a bare flag and false as nothing, and a list as the option given
        # once per item, of which train.py keeps the last: such a pin would silently vanish.
        if isinstance(value, list) and key not in LIST_KEYS:
            raise ParamsError(f"{source}: {where} must be a number or a string, got a list")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or v is None or isinstance(v, Mapping | list):
                what = "a list of numbers" if isinstance(value, list) else "a number or a string"
                raise ParamsError(f"{source}: {where} must be {what}, got {v!r}")
            _check_scalar(source, where, v)


def _select(context: Mapping[str, Any], expr: str) -> Any:
    """The value of ``a.b[0].c`` in ``context``; KeyError if it is not there."""
    value: Any = context
    for part in expr.replace("[", ".").replace("]", "").split("."):
        if isinstance(value, Mapping):
            match = [k for k in value if str(k) == part]
            if not match:
                raise KeyError(expr)
            value = value[match[0]]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(expr)
    return value


def _strings(node: Any, field: str = "") -> Iterator[tuple[str, str]]:
    """(field, string) for every string under ``node``; field is the top-level key (cmd...)."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _strings(k, field or str(k))
            yield from _strings(v, field or str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v, field)
    elif isinstance(node, str):
        yield field, node


def _quoted_spans(cmd: str) -> list[tuple[int, int]]:
    """The (start, end) of every single-quoted stretch of ``cmd``, quotes excluded."""
    spans, start = [], None
    for i, ch in enumerate(cmd):
        if ch == "'":
            if start is None:
                start = i + 1
            else:
                spans.append((start, i))
                start = None
    return spans


def _check_quoting(dvcfile: str, stage: str, cmd: str) -> None:
    spans = _quoted_spans(cmd)
    for m in INTERPOLATION.finditer(cmd):
        inside = any(a <= m.start() and m.end() <= b for a, b in spans)
        if m["inner"] == "item":
            if inside:
                raise ParamsError(f"{dvcfile}: stage {stage}: ${{item}} must not be quoted")
        elif not inside:
            raise ParamsError(
                f"{dvcfile}: stage {stage}: ${{{m['inner']}}} is not between single quotes in "
                "its command, so its value would reach the shell as code; quote it: "
                f"'${{{m['inner']}}}'"
            )


def _check_stage(
    dvcfile: str,
    source: str,
    stage: str,
    body: Mapping[str, Any],
    params: Mapping[str, Any],
    local: Mapping[str, Any],
    pinnable: tuple[str, ...],
) -> int:
    checked = 0
    for field, text in _strings(body):
        if field == "cmd":
            _check_quoting(dvcfile, stage, text)
        for m in INTERPOLATION.finditer(text):
            expr = m["inner"].strip()
            if expr == "key":
                continue  # the configuration name, checked with its configuration
            if expr == "item":
                _check_item(source, f"configs.{local['key']}", local["item"], pinnable)
                checked += 1
                continue
            context = local if expr.split(".")[0].split("[")[0] in local else params
            try:
                value = _select(context, expr)
            except KeyError:
                raise ParamsError(
                    f"{dvcfile}: stage {stage} uses ${{{expr}}}, which is not in {source}"
                ) from None
            _check_scalar(source, expr, value)
            checked += 1
    return checked


def check(dvcfile: Path = Path("dvc.yaml"), params_file: Path = Path("params.yaml")) -> int:
    """Refuse (``ParamsError``) any value of ``params_file`` that a command of ``dvcfile`` cannot
    be given safely, or a command that interpolates a value unquoted; returns how many
    interpolations were checked."""
    pipeline, params = load_yaml(dvcfile), load_yaml(params_file)
    if not isinstance(params, Mapping):
        raise ParamsError(f"{params_file}: expected a mapping of parameters, got {_kind(params)}")
    if not isinstance(pipeline, Mapping) or not isinstance(pipeline.get("stages"), Mapping):
        raise ParamsError(f"{dvcfile}: no stages")
    if "vars" in pipeline or any(
        isinstance(s, Mapping) and "vars" in s for s in pipeline["stages"].values()
    ):
        raise ParamsError(f"{dvcfile}: uses vars; this check reads {params_file} only")
    src, dvc = str(params_file), str(dvcfile)
    pinnable = (
        *PINNABLE_EXTRA,
        *(k for k, v in params.items() if isinstance(k, str) and not isinstance(v, Mapping | list)),
    )
    checked = 0
    for name, stage in pipeline["stages"].items():
        if not isinstance(stage, Mapping):
            continue
        if "foreach" not in stage:
            checked += _check_stage(dvc, src, name, stage, params, {}, pinnable)
            continue
        m = INTERPOLATION.fullmatch(str(stage["foreach"]).strip())
        if m is None:
            raise ParamsError(f"{dvc}: stage {name}: foreach must be one ${{...}} of {src}")
        try:
            items = _select(params, m["inner"].strip())
        except KeyError:
            raise ParamsError(
                f"{dvc}: stage {name} uses {stage['foreach']}, which is not in {src}"
            ) from None
        if not isinstance(items, Mapping):
            raise ParamsError(
                f"{src}: {m['inner']} must be a mapping of configurations, got {_kind(items)}"
            )
        for key, item in items.items():
            problem = config_name_problem(key)
            if problem is not None:
                raise ParamsError(f"{src}: {m['inner']}: {problem}; rename it")
            local = {"key": key, "item": item}
            checked += _check_stage(dvc, src, f"{name}@{key}", stage["do"], params, local, pinnable)
    return checked
