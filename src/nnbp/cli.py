"""What every stage script shares: one-line errors, and SIGTERM handled like Ctrl-C.

A stage is ``@click.command(cls=Stage)`` over a function decorated with ``@user_errors``:

- a bad option (Click's usage errors: out of range, unknown choice, missing, misspelt) is one
  line ``Error: Invalid value for '--tau': ...`` and exit status 2, without Click's usage lines;
- bad data, an unusable tracking store, an output that cannot be written (read-only or full
  disk) or running out of memory is one line ``Error: ...`` and exit status 1;
- Ctrl-C is one line and exit status 130, SIGTERM likewise with 143; under DVC, a stage gets
  SIGTERM when DVC dies (``nnbp.parent``), so it never trains on as an orphan.

Outputs are written atomically (``nnbp.io``), so whatever was there before is left as it was.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from nnbp.data import DataError
from nnbp.params import ParamsError, config_name_problem
from nnbp.parent import end_with_dvc
from nnbp.tracking import TrackingError

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup for an interruption runs."""


def _sigterm(signum: int, frame: Any) -> None:
    # One SIGTERM is enough: a second (DVC's own and the parent-death signal can both arrive)
    # must not cut short the cleanup the first one started, such as closing the run as KILLED.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` inside the block (the previous handler is restored)."""
    try:
        previous = signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def fail(message: str, status: int = 1) -> None:
    """Print ``Error: message`` as one line on stderr and exit with ``status``."""
    click.echo(f"Error: {_one_line(message)}", err=True)
    sys.exit(status)


def interrupted(e: BaseException) -> None:
    """Report an interruption in one line and exit 130 (Ctrl-C) or 143 (SIGTERM)."""
    if any(isinstance(x, Terminated) for x in (e, e.__cause__, e.__context__)):
        click.echo("terminated (SIGTERM): stopped; no output is half-written", err=True)
        sys.exit(TERMINATED)
    click.echo("interrupted (Ctrl-C): stopped; no output is half-written", err=True)
    sys.exit(INTERRUPTED)


class Stage(click.Command):
    """A stage script's command: every error ends in one line on stderr and a non-zero exit.

    Every option also answers to its params.yaml spelling, ``--log_every`` for ``--log-every``:
    DVC's ``${item}`` turns a configuration's keys into options verbatim.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        dashed = {
            "--" + opt[2:].replace("-", "_"): opt
            for param in self.params
            for opt in param.opts
            if opt.startswith("--") and "-" in opt[2:]
        }

        def spelt(arg: str) -> str:
            name, eq, value = arg.partition("=")
            return dashed[name] + eq + value if name in dashed else arg

        return super().parse_args(ctx, [spelt(a) for a in args])

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            with _sigterm_interrupts():
                if getattr(self.callback, "__module__", None) == "__main__":  # the program itself
                    end_with_dvc()  # SIGTERM, handled like any other, when DVC dies
                status = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:  # UsageError (exit 2) included
            fail(e.format_message(), e.exit_code)
        except click.Abort as e:  # Click's wrapper of a KeyboardInterrupt outside the callback
            interrupted(e)
        except KeyboardInterrupt as e:
            interrupted(e)
        sys.exit(status if isinstance(status, int) else 0)


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``inf``."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number.", param, ctx)
        return rv


def config_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Click callback: a configuration name must be a plain file name (it names its outputs)."""
    problem = config_name_problem(value)
    if problem is not None:
        raise click.BadParameter(problem, ctx, param)
    return value


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the user's mistakes and environment faults into one line on stderr and exit 1.

    Bad data, an unusable tracking store, or an output that cannot be written (read-only or
    full disk) are the user's to fix, so they get a message, not a traceback. Outputs are written
    atomically, so whatever was there before is left as it was.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _sigterm_interrupts():
                return fn(*args, **kwargs)
        except (DataError, ParamsError, TrackingError) as e:
            raise click.ClickException(_one_line(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(_one_line(f"{where}{e.strerror or e}")) from None
        except MemoryError:
            raise click.ClickException(
                "out of memory: the data or the network is too large for this machine"
            ) from None
        except KeyboardInterrupt as e:
            interrupted(e)

    return wrapper
