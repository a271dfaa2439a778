"""The two pages users look at, in a real browser (the system's Chromium, headless): the
`dvc plots show` page, opened from disk with the network cut off, and the MLflow UI that
`mlflow ui` serves on the pipeline's runs, checked against what the README says it shows.

One small pipeline run (scikit-learn's digits, few iterations, tracked to the copy's default
store) feeds both. Screenshots are kept in ``test-artifacts/`` (README: Working copy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Error as PlaywrightError

from nnbp.config import read_yaml
from tests.browser import chromium, screenshot
from tests.conftest import BIN, ROOT, clean_env, copy_repo, dvc, run

ITERS, LOG_EVERY = 60, 10
CONFIGS = ("h25", "h100", "h100_l2")
METRICS = ("loss", "train_acc", "test_acc")
TRACKED = clean_env(NNBP_TRACKING="on")  # the default store: mlflow.db in the copy
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository after `dvc repro` (tracked) and `dvc plots show`."""
    root = copy_repo(tmp_path_factory.mktemp("pages") / "repo", iters=ITERS, log_every=LOG_EVERY)
    dvc(root, "repro", env=TRACKED)
    run([str(BIN / "dvc"), "plots", "show"], root, TRACKED)
    return root


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


def test_plots_page_draws_every_chart_and_figure_offline(repo: Path, browser: Any) -> None:
    context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    errors: list[str] = []
    page = context.new_page()
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.add_init_script(KEEP_VIEWS)
    try:
        page.goto((repo / "dvc_plots" / "index.html").as_uri())
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
