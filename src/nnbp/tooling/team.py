"""Sharing DVC experiments between machines through a git remote (the experiments, as refs) and
a DVC remote (their outputs), with one clear line when a remote cannot be used.

DVC alone gets two things wrong for a team: ``dvc exp push`` pushes the git refs first and the
outputs after, so refused credentials leave an experiment that everyone sees and nobody can
apply, told in a line that names no remote (``failed to push cache: Forbidden``); and ``dvc exp
apply`` of an experiment whose outputs were never pushed fails after it has already replaced the
workspace's params, lock and outputs. ``share`` checks the DVC remote before anything is pushed;
``apply`` pulls an experiment and applies it only once all its outputs are in the cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..dvcfiles import locked_outputs, parse_yaml
from ..errors import UserError, first_line, one_line
from . import git


class RemoteError(UserError):
    """A git or DVC remote that cannot be used; the message names it."""


def _remote(repo: Any, name: str | None) -> Any:
    from dvc.config import NoRemoteError, RemoteNotFoundError

    try:
        return repo.cloud.get_remote(name)
    except (NoRemoteError, RemoteNotFoundError) as e:
        raise RemoteError(f"DVC remote: {first_line(e)} (see `dvc remote list`)") from None


def _repo() -> Any:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo()
    except NotDvcRepoError:
        raise RemoteError(
            "not inside a DVC repository: run this in a clone of the project"
        ) from None


def check_remote(name: str | None = None, outcome: str = "nothing was pushed") -> str:
    """The DVC remote ``name`` (the default one if None), as ``'name' (url)``, once it answers:
    its credentials are taken and its bucket or folder is there. ``RemoteError`` (one line,
    ending in ``outcome``) otherwise."""
    with _repo() as repo:
        remote = _remote(repo, name)
        fs, path = remote.fs, remote.path
        url = repo.config["remote"][remote.name].get("url", path)
        label = f"DVC remote '{remote.name}' ({url})"
        try:
            # A new remote's folder appears with its first push; its bucket (the top) must exist.
            top = path
            while not fs.exists(top):
                parent = fs.parent(top)
                if not parent or parent == top:
                    raise RemoteError(
                        f"{label}: {fs.parts(path)[0]!r} does not exist (a bucket is made "
                        f"with the storage provider's tools); {outcome}"
                    )
                top = parent
        except PermissionError as e:
            where = (
                f"set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or `dvc remote modify --local "
                f"{remote.name} access_key_id ...`"
                if str(url).startswith("s3://")
                else f"see `dvc remote modify --local {remote.name} ...` for its credentials"
            )
            raise RemoteError(
                f"{label} refused the credentials ({first_line(e)}): {where}; {outcome}"
            ) from None
        except OSError as e:
            raise RemoteError(f"{label} cannot be used: {first_line(e)}; {outcome}") from None
    return label


def error_line(output: str, status: int) -> str:
    """The line of a failed command's ``output`` that says why: the first ``Error: ...`` of a
    stage or console tool, else DVC's first ``ERROR: ...`` (DVC adds a help line and warnings,
    which a failure would wrap), else git's ``fatal: ...``, else its first line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for prefix in ("Error: ", "ERROR: ", "fatal: "):
        found = [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]
        if found:
            return one_line(found[0])
    return lines[0] if lines else f"exit {status}"


def _dvc(*args: str) -> str | None:
    """Run ``dvc ARGS`` (the dvc beside this Python): None when it succeeds, its output shown;
    else its error line (``error_line``)."""
    dvc = Path(sys.executable).with_name("dvc")
    done = subprocess.run(
        [str(dvc if dvc.exists() else "dvc"), *args], capture_output=True, text=True, check=False
    )
    if done.returncode == 0:
        sys.stdout.write(done.stdout)
        return None
    return error_line(done.stderr + done.stdout, done.returncode)


def share(git_remote: str, experiments: list[str], remote: str | None) -> str:
    """``dvc exp push GIT_REMOTE EXPERIMENTS`` (all of the baseline's when none is named), once
    the DVC remote answers; its label."""
    label = check_remote(remote)
    push = ["exp", "push", *(["--remote", remote] if remote else []), git_remote, *experiments]
    if error := _dvc(*push):
        raise RemoteError(f"dvc exp push to git remote '{git_remote}' and {label}: {error}")
    return label


def _outputs(repo: Any, ref: str) -> list[tuple[str, str]]:
    """(path, md5) of every output that DVC caches (those with ``cache: false`` are in git,
    with the commit) in the dvc.lock of commit ``ref``, of the stages its pipeline has: a
    removed configuration's entry stays in dvc.lock, and its outputs are pushed by nobody."""
    lock = parse_yaml(git.show(ref, "dvc.lock"), f"dvc.lock at {ref}")
    in_git = set(git.run("ls-tree", "-r", "--name-only", ref).splitlines())
    with repo.switch(ref):
        stages = {stage.name for stage in repo.index.stages}  # train@h25, as dvc.lock names it
    return [
        (path, md5)
        for stage, path, md5 in locked_outputs(lock)
        if stage in stages and path not in in_git
    ]


def missing_outputs(ref: str) -> list[str]:
    """The outputs of commit ``ref`` whose bytes are not in the local DVC cache."""
    with _repo() as repo:
        cache = repo.cache.local
        missing = []
        for path, md5 in _outputs(repo, ref):
            manifest = Path(cache.oid_to_path(md5))
            if not manifest.is_file():
                missing.append(path)
            elif md5.endswith(".dir"):
                entries = json.loads(manifest.read_text())
                if not all(Path(cache.oid_to_path(e["md5"])).is_file() for e in entries):
                    missing.append(path)
    return missing


def apply(git_remote: str, experiment: str) -> None:
    """Pull ``experiment`` from ``git_remote`` (its ref, and its outputs from the DVC remote)
    and apply it to the workspace, only if every output arrived: an experiment whose outputs were
    never pushed leaves the workspace as it was (``RemoteError``, one line)."""
    if error := _dvc("exp", "pull", git_remote, experiment):
        raise RemoteError(f"experiment {experiment!r} not pulled from '{git_remote}': {error}")
    ref = git.run("for-each-ref", "--format=%(objectname)", f"refs/exps/*/*/{experiment}").split()
    if not ref:
        raise RemoteError(f"git remote '{git_remote}' has no experiment {experiment!r}")
    if missing := missing_outputs(ref[0]):
        label = check_remote(outcome="nothing was applied")
        raise RemoteError(
            f"experiment {experiment!r}'s outputs {', '.join(missing)} are not on {label} (its "
            "author pushed its ref without them; `nnbp-share` from the machine that ran it "
            "sends them); nothing was applied, the workspace is as it was"
        )
    if error := _dvc("exp", "apply", experiment):
        raise RemoteError(f"dvc exp apply {experiment}: {error}")
