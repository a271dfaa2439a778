"""What every stage script shares: one-line errors, and SIGTERM handled like Ctrl-C."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from nnbp.data import DataError
from nnbp.tracking import TrackingError


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the user's mistakes and environment faults into one line on stderr and exit 1.

    Bad data, an unusable tracking store, or an output that cannot be written (read-only or
    full disk) are the user's to fix, so they get a message, not a traceback. Outputs are written
    atomically, so whatever was there before is left as it was.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signal.signal(signal.SIGTERM, _sigterm)
        try:
            return fn(*args, **kwargs)
        except (DataError, TrackingError) as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)

    return wrapper
