"""What ``dvc plots show`` draws: every history in one table (``reports/curves.json``, a chart
per metric with a line per configuration), and the page it fills, with Vega, Vega-Lite and
vega-embed inlined so that the charts render offline (DVC's own page loads them from a CDN)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the offline page needs none of the formats
    from .artifacts import History


def curve_rows(histories: Mapping[str, History]) -> list[dict[str, float | str | None]]:
    """Every configuration's history in one table, a row per configuration and log point, for
    ``dvc plots``: one chart per metric with a line per configuration (a directory of history
    files gives a chart per file instead, with the loss on the accuracies' 0-100 axis)."""
    rows = []
    for name, history in histories.items():
        for row in history.rows():
            rows.append({"configuration": name, **row})
    return rows


# Vega, Vega-Lite and vega-embed as a PyPI package ships them (django-js-lib-vega-embed: the
# upstream builds, no Django needed to read them); DVC's own page fetches them from a CDN.
VEGA_PACKAGE = "js_lib_vega_embed"
VEGA_SCRIPTS = ("vega5.js", "vega-lite5.js", "vega-embed6.js")
_PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Vega, Vega-Lite and vega-embed, inlined (nnbp.plots.offline_page): no network -->
{inlined}
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def offline_page() -> str:
    """DVC's HTML page (``dvc plots show --html-template``) with the Vega scripts inlined from the
    installed package instead of DVC's CDN links, so the charts render without internet.

    DVC fills ``{plot_divs}`` and ``{refresh_tag}``; the page leaves out ``{scripts}``, where
    DVC would put its CDN ``<script>`` tags. The same package version gives the same bytes.
    """
    from importlib.resources import files

    folder = files(VEGA_PACKAGE) / "static" / VEGA_PACKAGE
    scripts = []
    for name in VEGA_SCRIPTS:
        code = (folder / name).read_text(encoding="utf-8")
        if "</script" in code.lower():  # would end the inline element early
            raise ValueError(f"{name} cannot be inlined: it contains '</script'")
        scripts.append(f"    <script>/* {name} */\n{code}\n    </script>")
    return _PAGE.replace("{inlined}", "\n".join(scripts))
