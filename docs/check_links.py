"""Check the relative links of README.md and docs/*.md: each must name a file of the repository
and, after a ``#``, one of its headings (as GitHub makes anchors of them). Pages that other
branches add (``PENDING``) may be linked before they exist; their anchors are not checked.

    python docs/check_links.py      # one line per broken link; exit status 1 if any
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PENDING = {"docs/faults.md", "docs/cluster.md"}  # issue 23's and issue 24's pages
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def prose(text: str) -> list[str]:
    """The lines of ``text`` outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of ``path``: lower case, punctuation dropped but ``-``
    and ``_``, spaces as ``-``; a repeated heading gets ``-1``, ``-2``..."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path.read_text()):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def broken(page: Path) -> list[str]:
    problems = []
    for line in prose(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            where, _, anchor = target.partition("#")
            file = (page.parent / where).resolve() if where else page
            name = file.relative_to(ROOT).as_posix() if file.is_relative_to(ROOT) else str(file)
            if not file.exists():
                if name not in PENDING:
                    problems.append(f"{page.relative_to(ROOT)}: ({target}): no file {name}")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                problems.append(f"{page.relative_to(ROOT)}: ({target}): no heading #{anchor}")
    return problems


def main() -> int:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems = [problem for page in pages for problem in broken(page)]
    for problem in problems:
        print(problem)
    print(f"{len(pages)} pages, {len(problems)} broken links", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
