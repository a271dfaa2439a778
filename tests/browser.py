"""The system's Chromium, driven by Playwright (from PyPI) through ``executable_path``: nothing
is downloaded (never `playwright install`). Screenshots go to ``ARTIFACTS``, which the README's
"Working copy" section names."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.project import ROOT
from tests.servers import missing

CHROMIUM = Path(os.environ.get("NNBP_CHROMIUM", "/usr/bin/chromium"))  # Debian's package
ARTIFACTS = ROOT / "test-artifacts"  # git-ignored; kept after the run


def chromium() -> Iterator[Any]:
    """A headless Chromium (``playwright.sync_api.Browser``), closed after use; skipped in one
    line where there is none (a failure under CI=true)."""
    if not CHROMIUM.is_file():
        missing(f"no browser at {CHROMIUM}: apt-get install chromium (or set NNBP_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed: pip install -c constraints.txt -e '.[dev]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page: Any, name: str) -> Path:
    """Save the whole page as ``ARTIFACTS/NAME.png``; its path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
