"""The metrics gate: fail when the metrics regressed against a baseline, or when ``dvc.lock``
does not describe the models on disk.

Every metric of ``artifacts.METRICS`` is gated, with a tolerance from ``gate:`` in params.yaml
(``config.Tolerances``): a metric that is better higher (an accuracy, in percent) may fall by at
most ``max_NAME_drop`` percentage points, one better lower (the loss) may rise by at most
``max_NAME_rise`` percent of its baseline value. A change exactly at the tolerance passes.
Every configuration of the baseline must be in the new metrics and the other way round: a
configuration, or a gated metric, missing on either side fails the gate.

The lock check: two DVC commands in one workspace can leave a dvc.lock whose params are not those
the outputs were made with (`dvc exp run -S iters=10` started while `dvc repro` trains is refused
by DVC's lock, but only after it has written ``iters: 10`` into params.yaml, and the running repro
records that beside models trained with 5,000). Each ``train@NAME`` entry's params, merged as the
train stage merges them (``config.Training.read``), are compared with what ``models/NAME.npz``
records (``artifacts.TrainedModel``): the values the schema marks ``RECORDED``, and the hidden
sizes and dtype that its weights have.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import METRICS, REPORTED, Metrics, TrainedModel, parse_metrics
from ..config import RECORDED, Params, Training
from ..dvcfiles import locked_params, nested, read_yaml
from ..errors import ConfigError, UserError
from . import git


class GateError(UserError):
    """The gate could not run (a file missing or unreadable, no configuration to compare)."""


def _gated(metric: str) -> tuple[str, str]:
    """(its tolerance's key in ``gate:``, its kind): "points" for the fall of a percentage that
    is better higher, "relative" for the rise, in percent, of a value that is better lower."""
    if METRICS[metric]["better"] == "higher":
        return f"max_{metric}_drop", "points"
    return f"max_{metric}_rise", "relative"


# Metrics not in METRICS that a metrics file holds are not gated.
GATED = {metric: _gated(metric) for metric in REPORTED}
EPS = 1e-9  # float noise: a change at the tolerance must pass


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


def metrics_at_ref(path: Path, ref: str) -> Metrics:
    """The metrics file as committed at ``ref``."""
    folder = path.resolve().parent
    if not folder.is_dir():
        raise GateError(f"{path.parent}: no such folder")
    try:
        text = git.show(ref, f"./{path.name}", cwd=folder)
    except git.GitError as e:
        raise GateError(f"baseline {path} at {ref} cannot be read: {e.detail}") from None
    return parse_metrics(text, f"{path} at {ref}")


def _disagreements(training: Training, model: TrainedModel) -> list[tuple[str, Any, Any]]:
    """(parameter, its value in the configuration, the model's) for each that differs."""
    pairs = {key: (value, model.hyper[key]) for key, value in training.values(RECORDED).items()}
    pairs["hidden"] = (list(training.hidden), model.hidden)
    pairs["dtype"] = (training.dtype, model.dtype)
    return [(key, wanted, got) for key, (wanted, got) in pairs.items() if wanted != got]


def lock_mismatches(lock: Path, models: Path) -> list[str]:
    """One line per hyperparameter on which a ``train@NAME`` entry of ``lock`` and
    ``models/NAME.npz`` disagree; models or stages without a counterpart are not compared."""
    problems = []
    for stage, locked in locked_params(read_yaml(lock)).items():
        name = stage.removeprefix("train@")
        path = models / f"{name}.npz"
        if not stage.startswith("train@") or not path.is_file():
            continue
        try:
            training = Training.read(Params(nested(locked), list(locked), source=str(lock)), name)
        except ConfigError as e:
            problems.append(f"{e}; run dvc repro -f {stage}")
            continue
        for key, wanted, got in _disagreements(training, TrainedModel.load(path)):
            problems.append(
                f"{lock} disagrees with {path}: {key} is {wanted} in {lock} but {got} in "
                f"the model (two DVC commands in one workspace?); run dvc repro -f {stage}"
            )
    return problems


@dataclass(frozen=True)
class Verdict:
    """The gate's outcome: its report (stdout), one line per failure (stderr)."""

    report: str
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures


def run_gate(
    new: Metrics,
    baseline: Metrics,
    tolerances: Mapping[str, float],
    *,
    title: str,
    lock: Path | None = None,
    models: Path | None = None,
) -> Verdict:
    """Compare ``new`` with ``baseline`` and, given ``lock`` and ``models``, the lock with the
    models."""
    checks = compare(baseline, new, dict(tolerances))
    if not checks:
        raise GateError(f"nothing to compare: {title} holds no configuration")
    failed = [c for c in checks if c.failed]
    mismatches = lock_mismatches(lock, models) if lock and models else []
    lines = [f"Metrics gate: {title}", "", table(checks)]
    if lock and models and not mismatches:
        lines += ["", f"{lock}: its params are the hyperparameters {models}/ records"]
    if failed or mismatches:
        parts = [f"{len(failed)} of {len(checks)} checks"] if failed else []
        if mismatches:
            parts.append(f"{lock} disagrees with the models on {len(mismatches)} value(s)")
        lines += ["", f"FAILED: {'; '.join(parts)}"]
    else:
        lines += ["", f"passed: {len(checks)} checks"]
    return Verdict("\n".join(lines), [c.problem for c in failed] + mismatches)
