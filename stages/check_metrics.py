"""The metrics gate: fail when reports/metrics.json regressed against a baseline.

    python stages/check_metrics.py                       # against the metrics committed at HEAD
    python stages/check_metrics.py --baseline-ref main   # in a pull request
    python stages/check_metrics.py --baseline old.json   # against a file

Not a DVC stage: it reads the tolerances from ``gate:`` in params.yaml (options override them):
an accuracy may fall by at most ``max_test_acc_drop`` / ``max_train_acc_drop`` percentage points,
the loss may rise by at most ``max_loss_rise`` percent of its baseline value. A change exactly at
the tolerance passes. Every configuration of the baseline must be in the new metrics and the
other way round: a configuration, or a gated metric, missing on either side fails the gate.

Prints a Markdown table (config, metric, baseline, new, change, verdict) on stdout, one line per
regression on stderr, and exits 1 if anything regressed, 0 otherwise.

It also checks that dvc.lock describes the models on disk (``nnbp.lockcheck``): a ``train@NAME``
entry whose params disagree with the hyperparameters ``models/NAME.npz`` records (two DVC
commands run in one workspace) fails the gate too, one line per disagreement on stderr.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from nnbp.cli import Stage, user_errors
from nnbp.data import first_line
from nnbp.lockcheck import lock_mismatches

# metric -> (params key, kind): "points" for an absolute fall of a percentage, "relative" for a
# relative rise in percent. Only these metrics are gated; others in the files are ignored.
GATED = {
    "test_acc": ("max_test_acc_drop", "points"),
    "train_acc": ("max_train_acc_drop", "points"),
    "loss": ("max_loss_rise", "relative"),
}
EPS = 1e-9  # float noise: a change at the tolerance must pass


class GateError(click.ClickException):
    """The gate could not run (a file missing or unreadable): one line, exit 1."""


@dataclass
class Check:
    config: str
    metric: str
    baseline: float | None
    new: float | None
    change: float | None  # points, or percent of the baseline
    verdict: str  # ok | better | REGRESSED | MISSING
    problem: str = ""  # the stderr line, for a failure

    @property
    def failed(self) -> bool:
        return self.verdict in ("REGRESSED", "MISSING")


def _parse_metrics(text: str, where: str) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise GateError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise GateError(f"{where}: expected an object mapping each configuration to its metrics")
    return data


def read_metrics_file(path: Path) -> dict[str, dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise GateError(f"{path}: no such metrics file (run the pipeline first)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GateError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    return _parse_metrics(text, str(path))


def read_metrics_at_ref(path: Path, ref: str) -> dict[str, dict[str, Any]]:
    """The metrics file as committed at ``ref``, through ``git show``."""
    folder = path.resolve().parent
    if not folder.is_dir():
        raise GateError(f"{path.parent}: no such folder")
    try:
        shown = subprocess.run(
            ["git", "show", f"{ref}:./{path.name}"],
            cwd=folder,
            capture_output=True,
            text=True,
        )
    except OSError as e:
        raise GateError(f"cannot run git to read the baseline: {e.strerror or e}") from None
    if shown.returncode != 0:
        detail = (shown.stderr.strip().splitlines() or ["git show failed"])[-1]
        detail = detail.removeprefix("fatal: ")
        raise GateError(f"baseline {path} at {ref} cannot be read: {detail}")
    return _parse_metrics(shown.stdout, f"{path} at {ref}")


def read_tolerances(params_path: Path, overrides: dict[str, float | None]) -> dict[str, float]:
    """``gate:`` of params.yaml, each value replaced by its option when that was given."""
    tolerances = {k: v for k, v in overrides.items() if v is not None}
    missing = [k for k in overrides if k not in tolerances]
    if not missing:
        return tolerances
    try:
        params = yaml.safe_load(params_path.read_text()) or {}
    except FileNotFoundError:
        raise GateError(
            f"{params_path}: no such params file; pass --params or every tolerance as an option"
        ) from None
    except (OSError, yaml.YAMLError) as e:
        raise GateError(f"{params_path}: cannot be read ({first_line(e)})") from None
    gate = params.get("gate") if isinstance(params, dict) else None
    for key in missing:
        value = gate.get(key) if isinstance(gate, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise GateError(
                f"{params_path}: gate.{key} is missing or not a non-negative number; "
                f"set it there or pass --{key.replace('_', '-')}"
            )
        tolerances[key] = float(value)
    return tolerances


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if GATED[metric][1] == "relative" else f"{value:.2f}"


def _fmt_change(metric: str, change: float | None) -> str:
    if change is None:
        return "-"
    if GATED[metric][1] == "relative":
        return f"{change:+.2f}%" if math.isfinite(change) else "+inf%"
    return f"{change:+.2f} points"


def compare(
    baseline: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]], tol: dict[str, float]
) -> list[Check]:
    """One check per configuration and gated metric, baseline's configurations first."""
    checks = []
    configs = list(baseline) + [c for c in new if c not in baseline]
    for config in configs:
        if config not in new or config not in baseline:
            side = "new metrics" if config not in new else "baseline"
            problem = f"missing: configuration {config} is not in the {side}"
            checks.append(Check(config, "*", None, None, None, "MISSING", problem))
            continue
        for metric, (key, kind) in GATED.items():
            b, n = _number(baseline[config].get(metric)), _number(new[config].get(metric))
            if b is None or n is None:
                side = "new metrics" if n is None else "baseline"
                problem = f"missing: {config} {metric} is absent or not a number in the {side}"
                checks.append(Check(config, metric, b, n, None, "MISSING", problem))
                continue
            allowed = tol[key]
            if kind == "points":  # higher is better; the change is in points
                change = n - b
                worse = -change > allowed + EPS
                limit = f"allowed -{allowed:g}"
            else:  # lower is better; the change is in percent of the baseline
                # (from a zero baseline, any rise is infinitely many percent)
                rise = math.inf if n > b else 0.0
                change = (n - b) / b * 100 if b > 0 else rise
                worse = change > allowed + EPS
                limit = f"allowed +{allowed:g}%"
            better = (change > EPS) if kind == "points" else (change < -EPS)
            verdict = "REGRESSED" if worse else "better" if better else "ok"
            problem = ""
            if worse:
                problem = (
                    f"regressed: {config} {metric} {_fmt(metric, b)} -> {_fmt(metric, n)} "
                    f"({_fmt_change(metric, change)}, {limit})"
                )
            checks.append(Check(config, metric, b, n, change, verdict, problem))
    return checks


def table(checks: list[Check]) -> str:
    """The checks as a Markdown table, padded to read as well in a terminal."""
    head = ["config", "metric", "baseline", "new", "change", "verdict"]
    rows = [
        [
            c.config,
            c.metric,
            _fmt(c.metric, c.baseline) if c.metric in GATED else "-",
            _fmt(c.metric, c.new) if c.metric in GATED else "-",
            _fmt_change(c.metric, c.change) if c.metric in GATED else "-",
            f"**{c.verdict}**" if c.failed else c.verdict,
        ]
        for c in checks
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {2, 3, 4}

    def line(cells: list[str]) -> str:
        padded = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)
    )
    return "\n".join([line(head), rule + "|", *(line(r) for r in rows)])


@click.command(cls=Stage)
@click.option(
    "--metrics",
    "metrics_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="reports/metrics.json",
    show_default=True,
    help="The new metrics.",
)
@click.option(
    "--baseline-ref",
    default="HEAD",
    show_default=True,
    help="Git revision whose committed metrics file is the baseline (`main` in a pull request).",
)
@click.option(
    "--baseline",
    "baseline_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A metrics file to compare with instead of --baseline-ref.",
)
@click.option(
    "--params",
    "params_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="params.yaml",
    show_default=True,
    help="Where the `gate:` tolerances are.",
)
@click.option(
    "--lock",
    "lock_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="dvc.lock",
    show_default=True,
    help="Checked against the models' own hyperparameters (skipped if absent).",
)
@click.option(
    "--models",
    "models_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default="models",
    show_default=True,
    help="The trained models that --lock must describe.",
)
@click.option(
    "--max-test-acc-drop",
    type=click.FloatRange(min=0),
    help="Percentage points test accuracy may fall [params: gate.max_test_acc_drop].",
)
@click.option(
    "--max-train-acc-drop",
    type=click.FloatRange(min=0),
    help="Percentage points training accuracy may fall [params: gate.max_train_acc_drop].",
)
@click.option(
    "--max-loss-rise",
    type=click.FloatRange(min=0),
    help="Percent (relative) the loss may rise [params: gate.max_loss_rise].",
)
@user_errors
def main(
    metrics_path: Path,
    baseline_ref: str,
    baseline_path: Path | None,
    params_path: Path,
    lock_path: Path,
    models_dir: Path,
    max_test_acc_drop: float | None,
    max_train_acc_drop: float | None,
    max_loss_rise: float | None,
) -> None:
    tolerances = read_tolerances(
        params_path,
        {
            "max_test_acc_drop": max_test_acc_drop,
            "max_train_acc_drop": max_train_acc_drop,
            "max_loss_rise": max_loss_rise,
        },
    )
    new = read_metrics_file(metrics_path)
    if baseline_path is not None:
        baseline, source = read_metrics_file(baseline_path), str(baseline_path)
    else:
        baseline, source = read_metrics_at_ref(metrics_path, baseline_ref), baseline_ref
    checks = compare(baseline, new, tolerances)
    if not checks:
        raise GateError(f"nothing to compare: {metrics_path} and {source} hold no configuration")
    failures = [c for c in checks if c.failed]
    mismatches = []
    if lock_path.is_file() and models_dir.is_dir():
        mismatches = lock_mismatches(lock_path, models_dir)
    click.echo(f"Metrics gate: {metrics_path} against {source}\n")
    click.echo(table(checks))
    if lock_path.is_file() and models_dir.is_dir() and not mismatches:
        click.echo(f"\n{lock_path}: its params are the hyperparameters {models_dir}/ records")
    if failures or mismatches:
        parts = [f"{len(failures)} of {len(checks)} checks"] if failures else []
        if mismatches:
            parts.append(f"{lock_path} disagrees with the models on {len(mismatches)} value(s)")
        click.echo(f"\nFAILED: {'; '.join(parts)}")
        for c in failures:
            click.echo(c.problem, err=True)
        for line in mismatches:
            click.echo(line, err=True)
        sys.exit(1)
    click.echo(f"\npassed: {len(checks)} checks")


if __name__ == "__main__":
    main()
