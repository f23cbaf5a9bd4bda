"""The manual under docs/ and the README that points to it (issue 22, item 6).

The README keeps the two commands, what icm is, a quick tour and links: 300 lines at most, so
new topics become pages of the manual. The CLI reference page is written from the Typer app
(icm.cli.reference) and must match it, so it cannot drift from the commands.
"""

from __future__ import annotations

import re
from pathlib import Path

from icm.cli.reference import cli_reference

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300


def test_readme_stays_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the new text to a page under docs/ "
        "and link it from the README with one line"
    )


def test_cli_reference_page_matches_the_commands():
    page = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    assert page == cli_reference(), "docs/cli.md is stale: run `python -m icm.cli.reference > docs/cli.md`"
    # the reference names every command and an option the tour uses
    for heading in ("### `icm moderate`", "#### `icm policy diff`", "#### `icm train run`", "### `icm serve`"):
        assert heading in page
    assert "--max-frames" in page


def test_readme_links_to_the_manual_resolve():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)]*)?\)", readme)
    assert "docs/index.md" in targets and "docs/cli.md" in targets
    missing = [t for t in targets if not (REPO / t).is_file()]
    assert not missing, f"README.md links to pages that do not exist: {missing}"
    # every page of the manual is reachable from the README
    pages = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert pages <= set(targets) | {"docs/index.md"}, f"pages the README does not link: {sorted(pages - set(targets))}"
