"""The command layer: what the stage scripts (``@click.command(cls=Stage)``) and the console tools
(``cls=Tool``) share, in one place: one-line errors, the one signal path, the progress bar.

- a bad option (Click's usage errors: unknown, misspelt, missing) is one line ``Error: ...``
  and exit status 2, without Click's usage lines; so is a bad parameter in params.yaml;
- bad data, an unusable tracking store, an output that cannot be written (read-only or full
  disk) or running out of memory is one line ``Error: ...`` and exit status 1;
- Ctrl-C is one line and exit status 130, SIGTERM likewise with 143: SIGTERM raises
  ``Terminated``, a ``KeyboardInterrupt``, so every cleanup written for Ctrl-C runs for it too
  (an MLflow run is closed as KILLED, a group of renames finishes first: ``nnbp.files``);
- a stage, under DVC, gets SIGTERM when DVC dies (``nnbp.tooling.parent``), so it never trains
  on as an orphan.

Outputs are written atomically (``nnbp.files``), so whatever was there before is left as it was.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from ..errors import UserError, one_line
from .parent import end_with_dvc

if TYPE_CHECKING:  # a stage that draws no progress loads none of the formats
    from ..artifacts import LogPoint

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup for an interruption runs."""


class _Interrupted(Exception):
    """A ``KeyboardInterrupt`` out of a command's callback, carried past Click (which would turn
    it into ``Abort`` after printing an empty line)."""


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


def _fail(message: object, status: int = 1) -> None:
    """``Error: message`` as one line on stderr, and exit with ``status``."""
    click.echo(f"Error: {one_line(message)}", err=True)
    sys.exit(status)


def _interrupted(e: BaseException) -> None:
    """Report an interruption in one line and exit 130 (Ctrl-C) or 143 (SIGTERM)."""
    chain = (e, e.__cause__, e.__context__)
    if any(isinstance(x, Terminated) for x in chain):
        click.echo("terminated (SIGTERM): stopped; no output is half-written", err=True)
        sys.exit(TERMINATED)
    click.echo("interrupted (Ctrl-C): stopped; no output is half-written", err=True)
    sys.exit(INTERRUPTED)


class Command(click.Command):
    """A command whose every error ends in one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise _Interrupted() from e

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
                status = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:  # UsageError (exit 2) included
            _fail(e.format_message(), e.exit_code)
        except UserError as e:
            _fail(e, e.exit_code)
        except OSError as e:
            _fail(f"{e.filename}: {e.strerror or e}" if e.filename else (e.strerror or e))
        except MemoryError:
            _fail("out of memory: the data or the network is too large for this machine")
        except _Interrupted as e:
            _interrupted(e.__cause__ or e)
        except (click.Abort, KeyboardInterrupt) as e:  # outside the callback
            _interrupted(e)
        sys.exit(status if isinstance(status, int) else 0)


class Stage(Command):
    """A DVC stage's script: under DVC, it ends with DVC (``end_with_dvc``)."""

    def invoke(self, ctx: click.Context) -> Any:
        end_with_dvc()  # SIGTERM, handled like any other, when DVC dies
        return super().invoke(ctx)


class Tool(Command):
    """A console tool of the package (``nnbp-gate``...)."""


def path_option(name: str, default: str, *, folder: bool = False, dest: str | None = None) -> Any:
    """An option naming an input or output of a stage, its default the path dvc.yaml gives."""
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
        scores = point.scores
        self._bar.set_postfix(loss=f"{scores.loss:.4f}", acc=f"{scores.train_acc:.1f}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
