"""The command layer: what the stage scripts (``@click.command(cls=Stage)``) and the console tools
(``cls=Tool``) share, in one place: one-line errors and warnings, the one signal path, the progress
bar.

- a bad option (Click's usage errors: unknown, misspelt, missing) is one line ``Error: ...``
  and exit status 2, without Click's usage lines; so is a bad parameter in params.yaml;
- bad data, an unusable tracking store, an output that cannot be written (read-only or full
  disk) or running out of memory is one line ``Error: ...`` and exit status 1;
- a warning of nnbp's own (``nnbp.kernels.KernelWarning``) is one line ``warning: ...``;
- Ctrl-C is one line and exit status 130, SIGTERM likewise with 143.

The signal path. In a stage, SIGINT and SIGTERM only note the signal: the stage stops where it
may (``stop_point``): before every iteration of training (``nnbp.training.train``'s
``stop_check``), in every wait for the tracking store (``nnbp.tooling.tracking``), and when its
command returns. Stopping raises ``KeyboardInterrupt`` (SIGINT) or ``Terminated`` (SIGTERM, a
``KeyboardInterrupt`` too), so every cleanup written for Ctrl-C runs: the MLflow run is closed as
KILLED if the store answers within a few seconds, temporary files are removed. No signal lands
inside an MLflow, SQLAlchemy or HTTP call, nor between two renames of a group (``nnbp.files``).
A stage that is still running ``FORCE_SECONDS`` after the signal is interrupted wherever it is,
and ``EXIT_SECONDS`` after it the process ends, so a stage always exits within 10 s of a signal.
A second signal changes nothing (DVC's own SIGTERM and the parent-death one can both arrive). A
console tool stops at once, where it is (it writes no group of files). A signal that arrives
before the command starts (Python starting, the imports: the first few tenths of a second) ends
the process as it ends any Python program; it has written nothing then.

Under DVC, a stage gets SIGTERM when DVC dies (``nnbp.tooling.parent``), so it never trains on as
an orphan. Outputs are written atomically (``nnbp.files``), so whatever was there before is left
as it was, or the whole new group is in place.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ..errors import UserError, one_line
from ..kernels import KernelWarning
from .parent import end_with_dvc

if TYPE_CHECKING:  # a stage that draws no progress loads none of the formats
    from ..artifacts import LogPoint

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
TERMINATED = 143  # 128 + SIGTERM
STATUS = {signal.SIGINT: INTERRUPTED, signal.SIGTERM: TERMINATED}
FORCE_SECONDS = 8.0  # after a signal: a stage still running is interrupted where it is
EXIT_SECONDS = 9.5  # after a signal: the process ends, whatever it is doing


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup for an interruption runs."""


class _Interrupted(Exception):
    """A ``KeyboardInterrupt`` out of a command's callback, carried past Click (which would turn
    it into ``Abort`` after printing an empty line)."""


class _SignalPath:
    """This process's one handler of SIGINT and SIGTERM, while a command runs."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal, once one came
        self.at_once = True  # a tool: raise where the signal lands
        self.forced = False  # the stage overran FORCE_SECONDS: raise where it is

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            threading.Thread(target=self._watch, name="nnbp-signal", daemon=True).start()
            if self.at_once:
                raise self.stop()
        elif self.forced and signum == self.signum:
            raise self.stop()

    def stop(self) -> KeyboardInterrupt:
        return Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()

    def _watch(self) -> None:
        """The bound on a stop: interrupt the main thread where it is, then end the process."""
        signum = self.signum
        assert signum is not None
        time.sleep(FORCE_SECONDS)
        self.forced = True
        with contextlib.suppress(OSError):
            signal.pthread_kill(threading.main_thread().ident or 0, signum)
        time.sleep(EXIT_SECONDS - FORCE_SECONDS)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        name = signal.Signals(signum).name
        os.write(2, f"{name}: still running {EXIT_SECONDS:g} s after the signal; ended\n".encode())
        os._exit(STATUS.get(signum, 1))


_PATH = _SignalPath()


def stop_point() -> None:
    """Where a stage may stop: raise ``KeyboardInterrupt`` (SIGINT) or ``Terminated`` (SIGTERM)
    if a signal came, else nothing."""
    if _PATH.signum is not None:
        raise _PATH.stop()


def stopping() -> bool:
    """Whether a signal asked this command to stop."""
    return _PATH.signum is not None


@contextlib.contextmanager
def _signal_path(at_once: bool) -> Iterator[None]:
    """SIGINT and SIGTERM handled by ``_PATH`` inside the block; the previous handlers after it
    (in the main thread only: elsewhere signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _PATH.signum, _PATH.at_once, _PATH.forced = None, at_once, False
    previous = {s: signal.signal(s, _PATH.handle) for s in STATUS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """nnbp's own warnings as one line ``warning: ...``; any other as Python shows it."""
    shown = warnings.showwarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, KernelWarning):
            click.echo(f"warning: {one_line(message)}", err=True)
        else:
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


_BEFORE: set[threading.Thread] = set()  # the threads alive when the command started
# For a thread of the command that is ending as the command exits. Each was already waited for
# within its own budget (a run's end, its KILLED status, a join): a thread still alive then is
# stuck on a store that does not answer, and a second more bought nothing (a stage stopped while
# its server was frozen exited 3.0 s after the signal, 2.2 s with 0.2).
GRACE_SECONDS = 0.2


def _exit(status: int) -> NoReturn:
    """``sys.exit(status)``; but while a thread the command started still runs (a tracking
    call left in flight by a store that did not answer within its budget) ``GRACE_SECONDS``
    later, the process ends there, its output flushed. Python's finalization would stop that
    thread wherever it is, and in a library's C++ code (matplotlib drawing a run's figure)
    that aborts the process: exit -6, "terminate called without an active exception", seen
    under load with a killed server."""
    current = threading.current_thread()
    left = [
        t
        for t in threading.enumerate()
        if t.name.startswith("nnbp-")
        and t.name != "nnbp-signal"
        and t is not current
        and t not in _BEFORE
    ]
    deadline = time.monotonic() + GRACE_SECONDS
    for thread in left:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in left):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)
    sys.exit(status)


def _fail(message: object, status: int = 1) -> None:
    """``Error: message`` as one line on stderr, and exit with ``status``."""
    click.echo(f"Error: {one_line(message)}", err=True)
    _exit(status)


def _interrupted(e: BaseException | None = None) -> None:
    """Report an interruption in one line and exit 130 (Ctrl-C) or 143 (SIGTERM)."""
    chain = (e, e.__cause__, e.__context__) if e is not None else ()
    if _PATH.signum == signal.SIGTERM or any(isinstance(x, Terminated) for x in chain):
        click.echo("terminated (SIGTERM): stopped; no output is half-written", err=True)
        _exit(TERMINATED)
    click.echo("interrupted (Ctrl-C): stopped; no output is half-written", err=True)
    _exit(INTERRUPTED)


class Command(click.Command):
    """A command whose every error ends in one line on stderr and a non-zero exit."""

    at_once = True  # a signal stops it where it lands (a stage: at its stop points)

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
        _BEFORE.clear()
        _BEFORE.update(threading.enumerate())
        try:
            with _signal_path(self.at_once), _one_line_warnings():
                status = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            # Once the previous handlers are back, so that no signal goes unanswered: one that
            # came while the command had no point to stop at (its outputs are whole), or later.
            stop_point()
        except _Interrupted as e:
            _interrupted(e.__cause__ or e)
        except (click.Abort, KeyboardInterrupt) as e:  # outside the callback
            _interrupted(e)
        except (click.ClickException, UserError, OSError, MemoryError) as e:
            if stopping():  # an error on the way out of a stop: the stop is what happened
                _interrupted(e)
            _fail(*_error_line(e))
        except Exception as e:
            if stopping():
                _interrupted(e)
            raise
        _exit(status if isinstance(status, int) else 0)


def _error_line(e: click.ClickException | UserError | OSError | MemoryError) -> tuple[str, int]:
    """The one line (without ``Error: ``) and the exit status of a command's error."""
    if isinstance(e, click.ClickException):  # UsageError (exit 2) included
        return e.format_message(), e.exit_code
    if isinstance(e, UserError):
        return str(e), e.exit_code
    if isinstance(e, OSError):
        return (f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e)), 1
    return "out of memory: the data or the network is too large for this machine", 1


class Stage(Command):
    """A DVC stage's script: under DVC, it ends with DVC (``end_with_dvc``); a signal stops it at
    its next stop point (``stop_point``)."""

    at_once = False

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
