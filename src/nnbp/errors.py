"""The user's mistakes, told in one line: the base of every error a stage reports without a
traceback, and the helpers that fold a message into one line."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (a bad file, a bad parameter, an unusable store); ``str()`` is
    one line naming what is wrong. ``exit_code`` is the status a command exits with."""

    exit_code = 1


class DataError(UserError, ValueError):
    """A data or model file that cannot be used; the message names the file."""


class ConfigError(UserError):
    """A parameter, params.yaml or dvc.yaml that cannot be used; ``str()`` names the key."""

    exit_code = 2  # a bad parameter, as Click reports a bad option


def one_line(text: object) -> str:
    """``text`` with its lines joined by spaces: a message that cannot wrap a terminal's log."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), at most 300
    characters: for a one-line error that quotes what a library said."""
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__
