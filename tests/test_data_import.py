"""`icm data import-icm`: the released ICM-Instruct layout into records.

The small fixture (tests/fixtures/data/icm-instruct-mini, written for these tests) has one
of each oddity; the seed test runs on the paper's released files in ../shared/seed and
checks the done-criterion: at least 99% of Q-A rows and every explanation parsed, every
failure listed with its reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import FIXTURES

from icm.data import import_icm, read_records, read_rejected
from icm.data.records import REASONS

MINI = FIXTURES / "data" / "icm-instruct-mini"


def test_the_mini_fixture_every_oddity_and_its_reason():
    res = import_icm(MINI)
    st = res.stats
    assert st.images == 3 and st.records == 2
    assert st.rows == {"mc": 4, "qa": 8} and st.rows_parsed == {"mc": 3, "qa": 5}
    assert st.header_only_tables == {"mc": 1, "qa": 0}
    assert st.explanations == 3 and st.explanations_parsed == 3 and st.empty_explanations == 1
    reasons = Counter((r.stage, r.reason) for r in res.rejected)
    assert reasons == Counter({
        ("mc", "no_answer"): 1, ("mc", "empty_table"): 1, ("qa", "bad_yes_no"): 1, ("qa", "no_question"): 1,
        ("qa", "no_answer"): 1, ("reason/1", "empty"): 1, ("category", "unknown_category"): 1,
    })
    # every failing row points at its file and line, with the raw row
    for r in res.rejected:
        assert r.reason in REASONS and r.detail
        if r.line is not None:
            assert r.raw and r.raw.startswith("|") and f":{r.line}:" in r.detail
    bust = next(r for r in res.records if r.product == "upper_chest")
    assert bust.positive and bust.category == "upper_bust" and bust.source == "icm-instruct"
    assert bust.explanation and bust.explanation.verdict is True and bust.explanation.flags == []
    kinds = Counter(q.kind for q in bust.qa)
    assert kinds == Counter({"choice": 2, "yes_no": 1, "open": 1, "what": 1, "how": 1})
    normal = next(r for r in res.records if r.product == "whole_normal")
    # reason/1 is empty: the explanation comes from reason/2, a refusal, flagged not hidden
    assert not normal.positive and normal.explanation and "refusal" in normal.explanation.flags
    with_filter = import_icm(MINI, filters=["refusal"])
    assert with_filter.stats.records == 1 and with_filter.stats.quarantined == 1
    assert any(r.item and r.reason == "refusal" for r in with_filter.rejected)


def test_not_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="not the released ICM-Instruct layout"):
        import_icm(tmp_path)


def test_import_the_published_data(seed_dir: Path, tmp_path):
    root = seed_dir / "icm-instruct-raw"
    res = import_icm(root)
    st = res.stats
    # the done-criterion: >= 99% of the Q-A rows (tables and choices), 100% of the explanations
    assert st.qa_rows > 20000
    assert st.qa_share >= 0.99, st.qa_share
    assert st.share("mc") >= 0.99 and st.share("qa") >= 0.99
    assert st.explanations > 1500 and st.explanations_parsed == st.explanations
    # every row that did not parse is listed, with a reason, file and line
    row_failures = [r for r in res.rejected if r.line is not None]
    assert len(row_failures) == st.qa_rows - st.qa_rows_parsed
    assert all(r.reason in REASONS and r.raw for r in row_failures)
    # header-only tables and empty explanation files are listed too
    assert sum(1 for r in res.rejected if r.reason == "empty_table") == sum(st.header_only_tables.values())
    assert sum(1 for r in res.rejected if r.reason == "empty") == st.empty_explanations
    assert st.unknown_categories == 0 and st.records == st.images
    # the verdict read from the explanations agrees with the category almost always
    assert st.verdicts["agree"] / sum(st.verdicts.values()) > 0.9
    # choices were split into four options with a valid answer
    choice = [q for r in res.records for q in r.qa if q.kind == "choice"]
    assert len(choice) == st.rows_parsed["mc"]
    assert all(len(q.choices) == 4 and q.answer == "ABCD"[q.answer_index] for q in choice)


def test_import_cli_prints_the_shares_and_writes_every_failure(seed_dir: Path, tmp_path):
    out = tmp_path / "imported"
    done = subprocess.run(
        [sys.executable, "-m", "icm.cli.main", "data", "import-icm", str(seed_dir / "icm-instruct-raw"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    pct = f"{100 * report['qa_share']:.2f}%"
    assert f"Q-A rows parsed:      {report['qa_rows_parsed']} / {report['qa_rows']} ({pct})" in done.stdout
    assert f"explanations parsed:  {report['explanations']} / {report['explanations']} (100.00%)" in done.stdout
    rejected = read_rejected(out)
    assert len(rejected) == report["failures"] > 0
    assert all(r.reason in REASONS and r.detail for r in rejected)
    assert len(read_records(out)) == report["records"]
