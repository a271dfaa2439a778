"""git, as the tooling asks it: the commit trained from, the repository's top, a file as
committed at a revision, refs. Every failure is a ``GitError`` whose message is git's last line."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..errors import UserError


class GitError(UserError):
    """git failed or is missing; ``detail`` is what it said (its last line)."""

    def __init__(self, args: tuple[str, ...], detail: str) -> None:
        super().__init__(f"git {' '.join(args)}: {detail}")
        self.detail = detail


def run(*args: str, cwd: str | Path | None = None) -> str:
    """What ``git ARGS`` prints; ``GitError`` if it fails."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except OSError as e:
        raise GitError(args, f"cannot run git ({e.strerror or e})") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise GitError(args, lines[-1].removeprefix("fatal: "))
    return done.stdout


def answer(*args: str, cwd: str | Path | None = None) -> str | None:
    """What ``git ARGS`` prints, stripped; None outside a repository or without git."""
    try:
        return run(*args, cwd=cwd).strip()
    except GitError:
        return None


def head() -> str | None:
    """The commit checked out, None outside a repository."""
    return answer("rev-parse", "HEAD")


def top_level() -> Path | None:
    """The top of the working tree, None outside a repository."""
    top = answer("rev-parse", "--show-toplevel")
    return Path(top) if top else None


def show(ref: str, path: str, cwd: str | Path | None = None) -> str:
    """The file ``path`` (relative to ``cwd``, as ``./NAME``) as committed at ``ref``."""
    return run("show", f"{ref}:{path}", cwd=cwd)
