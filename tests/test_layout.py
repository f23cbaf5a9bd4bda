"""The package's layout rules that hold from now on (issue 22): no module over 600 lines.

A module that grows past the limit is split by concern (as ``images.py`` and the store were),
not trimmed by packing lines: the test names every such file with its line count.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "icm"
MAX_LINES = 600


def module_line_counts(root: Path) -> dict[str, int]:
    """Lines of every Python module under ``root``, keyed by its path relative to ``root``."""
    return {p.relative_to(root).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in sorted(root.rglob("*.py"))}


def test_the_line_count_sees_every_module() -> None:
    counts = module_line_counts(PACKAGE)
    assert {"__init__.py", "policy/model.py", "serve/routes/common.py"} <= counts.keys()  # sub-packages too
    assert counts["policy/model.py"] == (PACKAGE / "policy" / "model.py").read_bytes().count(b"\n")


def test_no_module_is_over_600_lines() -> None:
    over = {name: n for name, n in module_line_counts(PACKAGE).items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them by concern): " + ", ".join(
        f"src/icm/{name} ({n} lines)" for name, n in sorted(over.items(), key=lambda kv: -kv[1])
    )
