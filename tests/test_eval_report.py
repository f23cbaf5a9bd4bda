"""The HTML report: Jinja2 templates shipped as package data, every value escaped."""

from __future__ import annotations

import fnmatch
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from icm.evaluation.meq import Explanations, MEQReport
from icm.evaluation.report import render_html, write_html
from icm.evaluation.summary import EvalSummary

REPO = Path(__file__).resolve().parents[1]
EVIL = '<script>alert("x")</script>'


def test_every_value_from_a_summary_is_escaped(tmp_path):
    meq = MEQReport(
        name=f"run {EVIL}", source="a&b.jsonl", mode="offline", n_items=1, n_complete=0, n_failed=0, n_partial=0, notes=[f"note {EVIL}"],
        worst=[Explanations(id=f"img {EVIL}", reference=f"ref {EVIL}", candidate=f"</pre>{EVIL}", scores={})],
    )
    summary = EvalSummary(name=EVIL, meta={EVIL: EVIL}, meq=meq)
    page = write_html(summary, tmp_path / "r.html").read_text(encoding="utf-8")
    assert page == render_html(summary)
    assert "<script" not in page and "</pre><script" not in page
    assert page.count("&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;") >= 7  # title, h1, meta key and value, name, note, worst
    assert "a&amp;b.jsonl" in page and "&lt;/pre&gt;" in page
    assert page.startswith("<!DOCTYPE html>") and "Lowest-scored explanations" in page
    assert "None" not in page  # absent values are empty, as before the templates


def test_an_empty_summary_says_so():
    page = render_html(EvalSummary(name="empty"))
    assert "<p>No figures in this summary.</p>" in page and "<style>" in page and "td.num" in page


def test_the_templates_are_package_data():
    """A wheel holds only what pyproject's package-data names: every template must match it."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["icm"]
    root = REPO / "src" / "icm"
    templates = sorted((root / "evaluation" / "templates").iterdir())
    assert {p.name for p in templates} >= {"report.html.j2", "report.css", "_macros.html.j2"}
    for t in templates:
        rel = t.relative_to(root).as_posix()
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), f"{rel} is not package data"
