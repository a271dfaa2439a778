"""The two pages users look at, in a real browser (the system's Chromium, headless): the
`dvc plots show` page, opened from disk with the network cut off, and the MLflow UI that the
README's command serves on the pipeline's runs, checked against what docs/tracking.md says it
shows; and that command as light as the README says.

One small pipeline run (scikit-learn's digits, few iterations, tracked to the copy's default
store) feeds both. Screenshots are kept in ``test-artifacts/`` (docs/development.md: The tests).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Error as PlaywrightError

from nnbp.dvcfiles import read_yaml
from nnbp.files import file_md5
from tests.browser import chromium, screenshot
from tests.project import ROOT, Pipeline, dvc
from tests.servers import UI_MARKER, start_ui, stop_server, ui_command
from tests.store import runs

ITERS, LOG_EVERY, CONFIGS = Pipeline.ITERS, Pipeline.LOG_EVERY, Pipeline.CONFIGS
METRICS = ("loss", "train_acc", "test_acc")
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(pipeline: Pipeline) -> Path:
    """The shared run (tracked), whose runs the UI shows."""
    return pipeline.root


@pytest.fixture(scope="module")
def plots_page(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page `dvc plots show` writes of the shared run (to a folder of this module)."""
    out = tmp_path_factory.mktemp("plots")
    dvc(pipeline.root, "plots", "show", "-o", str(out), env=pipeline.env)
    return out / "index.html"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from chromium()


# --- the dvc plots show page ---------------------------------------------------------------

# Before the page's scripts run: keep the view vega-embed makes of each chart, by its element,
# so the test can read what Vega drew (the charts are canvases: no DOM to count lines in).
KEEP_VIEWS = """
window.__views = {};
window.__failed = {};
let embed;
Object.defineProperty(window, 'vegaEmbed', {
  configurable: true,
  get() { return embed; },
  set(real) {
    embed = Object.assign(function (el, spec, options) {
      const shown = real(el, spec, options);
      shown.then(r => { window.__views[el] = r.view; }, e => { window.__failed[el] = String(e); });
      return shown;
    }, real);
  },
});
"""

# What each view drew: its title, its line marks (one per configuration), and whether a canvas
# or SVG of non-zero size is on the page.
DRAWN = """
(element) => {
  const view = window.__views[element];
  if (!view) return null;
  const lines = [], titles = [];
  const walk = (mark) => {
    if (mark.marktype === 'line' && mark.items.length)
      lines.push({configuration: mark.items[0].datum.configuration, points: mark.items.length});
    if (mark.role === 'title-text') mark.items.forEach(i => titles.push(String(i.text)));
    (mark.items || []).forEach(item => (item.items || []).forEach(walk));
  };
  walk(view.scenegraph().root);
  const surface = document.querySelector(`${element} canvas, ${element} svg.marks`);
  const box = surface ? surface.getBoundingClientRect() : {width: 0, height: 0};
  return {lines, titles, width: box.width, height: box.height};
}
"""


def _plot_titles() -> dict[str, str]:
    """dvc.yaml's plots: chart id -> title (the images are listed as bare paths)."""
    plots = read_yaml(ROOT / "dvc.yaml")["plots"]
    return {k: v["title"] for p in plots if isinstance(p, dict) for k, v in p.items()}


def test_plots_page_draws_every_chart_and_figure_offline(browser: Any, plots_page: Path) -> None:
    context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    errors: list[str] = []
    page = context.new_page()
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.add_init_script(KEEP_VIEWS)
    try:
        page.goto(plots_page.as_uri())
        page.wait_for_load_state("load")
        expected = _plot_titles()
        assert set(expected) == set(METRICS), "dvc.yaml's charts are not the metrics"
        with contextlib.suppress(PlaywrightError):  # a chart that never renders: said below
            page.wait_for_function(
                f"Object.keys(window.__views).length + Object.keys(window.__failed).length"
                f" >= {len(expected)}",
                timeout=TIMEOUT_MS,
            )
        path = screenshot(page, "plots_page")
        failed = page.evaluate("window.__failed || {}")
        for chart, title in expected.items():
            drawn = page.evaluate(DRAWN, f"#{chart}")
            assert drawn is not None, (
                f"chart {chart!r} ({title!r}) did not render: "
                f"{failed.get('#' + chart, 'no Vega view')}; page errors: {errors[:3]}; "
                f"screenshot {path}"
            )
            assert drawn["width"] > 100 and drawn["height"] > 100, (chart, drawn)
            assert drawn["titles"] == [title], f"chart {chart!r}: titled {drawn['titles']}"
            lines = sorted(drawn["lines"], key=lambda line: CONFIGS.index(line["configuration"]))
            points = len(range(0, ITERS + 1, LOG_EVERY))
            assert lines == [{"configuration": c, "points": points} for c in CONFIGS], (
                f"chart {chart!r} does not draw a line of {points} points per configuration"
            )
        figures = page.evaluate(
            "Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])"
        )
        for name in ("curves.png", "features.png"):
            loaded = [w for src, w in figures if src and src.endswith(name)]
            assert loaded and loaded[0] > 100, f"figure {name} did not load: {figures}"
        assert errors == [], errors
        off_machine = [u for u in requests if not u.startswith(("file://", "data:", "blob:"))]
        assert off_machine == [], f"the page asked the network for {off_machine}"
    finally:
        context.close()


# --- the MLflow UI -------------------------------------------------------------------------

README = ROOT / "README.md"
PAGE = ROOT / "docs" / "tracking.md"  # what the UI shows
SECTION = "## The UI and what it shows"
UI_LINK = re.compile(r"<(http://127\.0\.0\.1:5000)(/#/experiments/[^>]+)>")


def docs_say(fragment: str) -> str:
    """The bullet or paragraph of docs/tracking.md's section on the UI that holds ``fragment``,
    as one line: what an assertion quotes when the UI no longer does what it says."""
    text = PAGE.read_text()
    if SECTION not in text:
        pytest.fail(f"docs/tracking.md has no section {SECTION!r}")
    section = text[text.index(SECTION) :]
    end = section.find("\n## ", 3)
    section = section if end < 0 else section[:end]
    for block in re.split(r"\n(?=- )|\n\n", section):
        if fragment in block:
            return " ".join(block.split())
    pytest.fail(f"docs/tracking.md's {SECTION!r} no longer says {fragment!r}")


def stale(sentence: str) -> str:
    return f"the MLflow UI no longer shows what docs/tracking.md says: {sentence!r}"


def _runs(repo: Path) -> dict[str, tuple[str, str]]:
    """configuration -> (run name, run id), from the copy's store."""
    return {run.config: (run.name, run.run_id) for run in runs(repo / "mlflow.db")}


# The runs table's cells, row by row: column id -> text (the grid splits a row in parts).
TABLE = """
() => {
  const rows = {};
  document.querySelectorAll('[role=row][row-index]').forEach(row => {
    const cells = rows[row.getAttribute('row-index')] ||= {};
    row.querySelectorAll('[role=gridcell][col-id]').forEach(cell => {
      cells[cell.getAttribute('col-id').replaceAll('`', '')] = cell.innerText;
    });
  });
  return Object.values(rows);
}
"""


@pytest.fixture(scope="module")
def ui_server(
    repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen, str]]:
    """The README's UI command run from the copy's root: the process and its URL."""
    proc, url = start_ui(repo, tmp_path_factory.mktemp("ui"))
    try:
        yield proc, url
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def ui(ui_server: tuple[subprocess.Popen, str]) -> str:
    return ui_server[1]


def test_mlflow_ui_shows_what_the_docs_say(browser: Any, repo: Path, ui: str) -> None:
    found = _runs(repo)
    assert sorted(found) == sorted(CONFIGS)
    digest = file_md5(repo / "data" / "digits.npz")
    context = browser.new_context(viewport={"width": 1920, "height": 1080})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        # The documented link opens the runs table.
        link_sentence = docs_say("workflowType=machine_learning")
        match = UI_LINK.search(link_sentence)
        assert match, f"docs/tracking.md's UI link is gone: {link_sentence!r}"
        page.goto(ui + match.group(2))
        table = docs_say("*Runs*, the table")
        for name, _ in found.values():
            try:
                page.get_by_text(name, exact=True).first.wait_for()
            except PlaywrightError:
                screenshot(page, "mlflow_ui_runs")
                pytest.fail(f"run {name!r} is not in the runs table; " + stale(link_sentence))
        headers = page.evaluate(
            "Array.from(document.querySelectorAll('[role=columnheader]')).map(e => e.innerText)"
        )
        for column in ("Dataset", "Duration", "Source", "Models"):
            assert column in headers, f"no column {column!r} ({headers}); " + stale(table)
        page.wait_for_function(
            "document.querySelectorAll('[role=gridcell][col-id*=Models]').length >= 3"
        )
        # a run's name cell: its colour, then its name
        rows = {r.get("attributes.Run Name", "").split("\n")[-1]: r for r in page.evaluate(TABLE)}
        screenshot(page, "mlflow_ui_runs")
        for config, (name, _) in found.items():
            row = rows.get(name)
            assert row is not None, f"no row for {name!r} in {sorted(rows)}; " + stale(table)
            dataset = row.get("attributes.Dataset", "")
            assert dataset.startswith(f"digits.npz:training ({digest[:8]}"), (
                f"{name}: Dataset {dataset!r}; " + stale(table)
            )
            assert "+1" in dataset, f"{name}: Dataset {dataset!r}; " + stale(table)
            assert row.get("attributes.Source", "").strip() == "dvc.yaml", stale(table)
            assert row.get("attributes.Models", "").strip() == config, (
                f"{name}: Models {row.get('attributes.Models')!r}; " + stale(table)
            )

        # The chart view: a chart per metric, a line per run; and the system metrics.
        charts = docs_say("The chart view")
        page.locator("label:has(input[name=runs-view-mode][value=CHART])").click()
        for metric in METRICS:
            for name, _ in found.values():
                legend = f"{name} ({metric})"
                try:
                    page.get_by_text(legend, exact=True).first.wait_for()
                except PlaywrightError:
                    screenshot(page, "mlflow_ui_charts")
                    pytest.fail(f"no line {legend!r} in the chart view; " + stale(charts))
        system = docs_say("*System metrics*")
        section = page.get_by_text(re.compile(r"^System metrics")).first
        section.wait_for()
        cores = page.get_by_text("system/process_cpu_cores", exact=True)
        try:
            cores.first.wait_for()
        except PlaywrightError:
            screenshot(page, "mlflow_ui_charts")
            pytest.fail("no chart system/process_cpu_cores; " + stale(system))
        screenshot(page, "mlflow_ui_charts")

        # A run's page, from its name in the table: its datasets and its logged model.
        config = "h25"
        name, run_id = found[config]
        run_page = docs_say("A run's page")
        page.goto(f"{ui}/#/experiments/1/runs/{run_id}")
        try:
            page.get_by_text("Logged models (1)", exact=True).wait_for()
            page.get_by_text("Ready", exact=True).first.wait_for()  # the model, loaded
        except PlaywrightError:
            screenshot(page, "mlflow_ui_run")
            pytest.fail(f"{name}: no Logged models on its page; " + stale(run_page))
        text = page.inner_text("body")
        screenshot(page, "mlflow_ui_run")
        shown = f"Datasets\ndigits.npz:training ({digest})\nTraining\n+1\n"
        assert shown in text, f"{name}: not on its page: {shown!r}; " + stale(run_page)
        logged = text[text.index("Logged models") :]
        for shown in ("Output", str(ITERS), config, "Ready"):
            assert f"\n{shown}\n" in logged, f"{name}: {shown!r} not under Logged models; " + stale(
                run_page
            )
    finally:
        context.close()


# --- the UI command: as light as the README says ----------------------------------------

LIGHT = re.compile(r"(\d+) processes holding ([\d,]+) MiB")
MEMORY_MARGIN = 1.25  # the README's figure is one measurement; this much more is still "it"


def _readme_ui_sentence() -> str:
    """The README's paragraph right after the UI command's block, as one line."""
    text = README.read_text()
    after = text[text.index(UI_MARKER) :].split("```", 2)[2]
    return " ".join(after.strip().split("\n\n", 1)[0].split())


def _process_group(leader: int) -> dict[int, int]:
    """pid -> resident memory (VmRSS, kB) of every process in ``leader``'s process group."""
    group = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != leader:
                continue
            status = (entry / "status").read_text()
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue  # gone meanwhile, or not ours
        rss = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        group[int(entry.name)] = int(rss.group(1)) if rss else 0  # a zombie has no VmRSS
    return group


def test_the_ui_command_is_as_light_as_the_readme_says(
    ui_server: tuple[subprocess.Popen, str],
) -> None:
    """Run after the UI test, so the UI has served every page the docs describe."""
    assert ui_command(PAGE) == ui_command(README), (
        "docs/tracking.md's UI command is not the README's"
    )
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc: the process group's memory is read from Linux's /proc")
    sentence = _readme_ui_sentence()
    stated = LIGHT.search(sentence)
    assert stated, f"the README no longer says what its UI command costs: {sentence!r}"
    processes, mib = int(stated.group(1)), int(stated.group(2).replace(",", ""))
    proc, _ = ui_server
    group = _process_group(proc.pid)
    rss_mib = sum(group.values()) / 1024
    assert len(group) == processes, (
        f"the README's UI command runs {len(group)} processes, not {processes}: {sentence!r}"
    )
    assert rss_mib <= mib * MEMORY_MARGIN, (
        f"the README's UI command holds {rss_mib:.0f} MiB, more than {MEMORY_MARGIN}x the "
        f"{mib} MiB the README says: {sentence!r}"
    )
