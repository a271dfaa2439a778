"""What every command shares (the stage scripts, ``nnbp-gate``, ``nnbp-close-orphans``):
one-line errors, SIGTERM handled like Ctrl-C, and the progress bar.

A command is ``@click.command(cls=Stage)`` over a function decorated with ``@user_errors``:

- a bad option (Click's usage errors: unknown, misspelt, missing) is one line ``Error: ...``
  and exit status 2, without Click's usage lines; so is a bad parameter in params.yaml;
- bad data, an unusable tracking store, an output that cannot be written (read-only or full
  disk) or running out of memory is one line ``Error: ...`` and exit status 1;
- Ctrl-C is one line and exit status 130, SIGTERM likewise with 143; under DVC, a stage gets
  SIGTERM when DVC dies (``nnbp.parent``), so it never trains on as an orphan.

Outputs are written atomically (``nnbp.files``), so whatever was there before is left as it was.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from .backprop import LogPoint
from .errors import UserError, one_line
from .parent import end_with_dvc

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


def fail(message: str, status: int = 1) -> None:
    """Print ``Error: message`` as one line on stderr and exit with ``status``."""
    click.echo(f"Error: {one_line(message)}", err=True)
    sys.exit(status)


def interrupted(e: BaseException) -> None:
    """Report an interruption in one line and exit 130 (Ctrl-C) or 143 (SIGTERM)."""
    if any(isinstance(x, Terminated) for x in (e, e.__cause__, e.__context__)):
        click.echo("terminated (SIGTERM): stopped; no output is half-written", err=True)
        sys.exit(TERMINATED)
    click.echo("interrupted (Ctrl-C): stopped; no output is half-written", err=True)
    sys.exit(INTERRUPTED)


class Stage(click.Command):
    """A command whose every error ends in one line on stderr and a non-zero exit."""

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
        except UserError as e:
            error = click.ClickException(one_line(e))
            error.exit_code = e.exit_code
            raise error from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(one_line(f"{where}{e.strerror or e}")) from None
        except MemoryError:
            raise click.ClickException(
                "out of memory: the data or the network is too large for this machine"
            ) from None
        except KeyboardInterrupt as e:
            interrupted(e)

    return wrapper


def path_option(name: str, default: str, *, folder: bool = False, dest: str | None = None) -> Any:
    """An option naming an input or output of a command, its default the path dvc.yaml gives."""
    kind = click.Path(file_okay=not folder, dir_okay=folder)
    decls = (name, dest) if dest else (name,)
    return click.option(*decls, type=kind, default=default, show_default=True)


class Progress:
    """A progress bar of a training (iteration, loss, accuracy) on a terminal; in a log (CI,
    ``dvc exp run --queue``) it stays out of the way."""

    def __init__(self, total: int, name: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=name, unit="it", disable=None, leave=False)

    def show(self, point: LogPoint) -> None:
        self._bar.update(point.iteration - self._bar.n)
        self._bar.set_postfix(loss=f"{point.loss:.4f}", acc=f"{point.train_acc:.1f}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
