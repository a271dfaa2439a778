"""Stage `plots_page`: the HTML page `dvc plots show` fills, with the Vega scripts inlined.

DVC's default page loads Vega, Vega-Lite and vega-embed from a CDN, so without internet its
charts stay blank. ``.dvc/config`` points ``plots.html_template`` at this stage's ``--out``, built
from the copies that the pip package django-js-lib-vega-embed installs (``nnbp.plots``).
"""

import click

from nnbp.files import write_text
from nnbp.plots import VEGA_PACKAGE, offline_page
from nnbp.tooling.cli import Stage, path_option


@click.command(cls=Stage)
@path_option("--out", "reports/plots_page.html")
def main(out: str) -> None:
    try:
        page = offline_page()
    except ModuleNotFoundError:
        raise click.ClickException(
            f"the Vega scripts' package ({VEGA_PACKAGE}) is not installed: "
            "pip install -c constraints.txt -e '.[dev]'"
        ) from None
    write_text(out, page)
    click.echo(f"{out}: DVC's plots page with Vega inlined ({len(page) // 1024} KiB)")


if __name__ == "__main__":
    main()
