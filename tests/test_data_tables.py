"""Markdown Q-A table parsing: the shapes real models write, and a round-trip property."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icm.data.records import QAPair
from icm.data.tables import find_tables, normalise_yes_no, parse_qa_text, split_options, split_row


def pairs(text: str, **kw):
    r = parse_qa_text(text, **kw)
    return [(p.kind, p.question, p.choices, p.answer) for p in r.pairs], [(p.reason, p.line) for p in r.problems], r


def test_choices_in_one_cell_with_text_around_the_table():
    got, problems, r = pairs(
        "Here are the question-answer pairs:\n\n"
        "| type | question | choices | answer |\n|---|---|---|---|\n"
        "| yes/no | Is the woman smiling? | | Yes |\n"
        "| choice | What is she wearing? | A. A red dress B. A blue coat C. Jeans D. A swimsuit | B |\n"
        "| choice | Which colour? | (A) red, (B) blue, (C) green, (D) white | blue |\n"
        "| choice | Which pose? | A) Sitting<br>B) Standing<br>C) Lying<br>D) Kneeling | C) Lying |\n"
        "| what | What is the mood? | | Playful and relaxed. |\n"
        "| how | How is she posing? | | Leaning on a wall. |\n\nHope this helps!"
    )
    assert problems == [] and r.rows == 6 and r.tables == 1
    assert got == [
        ("yes_no", "Is the woman smiling?", [], "Yes"),
        ("choice", "What is she wearing?", ["A red dress", "A blue coat", "Jeans", "A swimsuit"], "B"),
        ("choice", "Which colour?", ["red", "blue", "green", "white"], "B"),
        ("choice", "Which pose?", ["Sitting", "Standing", "Lying", "Kneeling"], "C"),
        ("what", "What is the mood?", [], "Playful and relaxed."),
        ("how", "How is she posing?", [], "Leaning on a wall."),
    ]


def test_choices_spread_over_cells_as_in_the_released_data():
    got, problems, _ = pairs(
        "| Question | Choices | Answer |\n| --- | --- | --- |\n"
        "| What is she doing? |A. Reading |B. Cooking |C. Running |D. Sleeping |D. |\n"
        "| What is she wearing? |A. A dress |B. Gray leggings |C. A skirt |D. Shorts | |B. |\n"
        "| What is taken off? |A) Her dress |B) Her jacket |C) Her shoes |D) Her hat |- |B. |\n"
        "| Which focus? |A - Face |B - Hands |C - Book |D - Couch |A. |\n"
        "| What is she doing with her lip? |A.She is not moving it |B.She is biting it |C. She licks it |D. She pouts |B. |\n"
        "| Where is she looking? |A. The camera |B. Her phone |C. Her feet |D. The wall |. |\n"
        "| What is she doing? |A) Taking off her bra |B) Putting on her bra |C} Adjusting it |D) Holding it |B. |\n"
        "| What is she holding? |A) A cup |B) A book |Cc A phone |D) Nothing |B. |\n",
        default_kind="choice",
    )
    assert [g[3] for g in got] == ["D", "B", "B", "A", "B", "B"]
    assert got[1][2] == ["A dress", "Gray leggings", "A skirt", "Shorts"]
    assert got[4][2][0] == "She is not moving it"
    assert got[5][2] == ["Taking off her bra", "Putting on her bra", "Adjusting it", "Holding it"]
    # a broken option must not leave a silently shorter question behind
    assert problems == [("no_answer", 8), ("bad_choices", 10)]


def test_header_with_one_column_per_option():
    got, problems, _ = pairs(
        "| # | Question | A | B | C | D | Answer |\n|---|---|---|---|---|---|---|\n"
        "| 1 | What colour is the dress? | Red | Blue | Green | Black | C |\n"
        "| 2 | Where is she? | Beach | Office | Park | Kitchen | (A) |\n"
    )
    assert problems == []
    assert got == [
        ("choice", "What colour is the dress?", ["Red", "Blue", "Green", "Black"], "C"),
        ("choice", "Where is she?", ["Beach", "Office", "Park", "Kitchen"], "A"),
    ]


def test_tick_and_cross_answers_marks_on_options_bold_and_fences():
    got, problems, _ = pairs(
        "```markdown\n| Question | Answer |\n| --- | --- |\n"
        "| Is she wearing a hat? | ✓ |\n| Is the image dark? | ✘ |\n| **Is it outdoors?** | **Yes.** |\n"
        "| 2. Is there a dog? | ❌ No |\n```\n\n"
        "| Question | Options | Answer |\n|---|---|---|\n"
        "| Which body part is shown? | A) Back ✓<br>B) Legs<br>C) Face<br>D) Hands |  |\n"
    )
    assert problems == []
    assert got == [
        ("yes_no", "Is she wearing a hat?", [], "Yes"),
        ("yes_no", "Is the image dark?", [], "No"),
        ("yes_no", "Is it outdoors?", [], "Yes"),
        ("yes_no", "Is there a dog?", [], "No"),
        ("choice", "Which body part is shown?", ["Back", "Legs", "Face", "Hands"], "A"),
    ]


def test_missing_cells_rows_without_outer_pipes_and_blank_lines_between_rows():
    got, problems, r = pairs(
        "Type | Question | Answer\n--- | --- | ---\n"
        "Yes/No | Is she standing? |\n"
        "What | What is in the background? | |\n\n"
        "Yes/No | Is she sitting? | No\n"
    )
    assert got == [("yes_no", "Is she sitting?", [], "No")]
    assert problems == [("no_answer", 3), ("no_answer", 4)]
    assert r.rows == 3


def test_headings_above_tables_set_the_type_and_several_tables_are_read():
    got, problems, r = pairs(
        "### Yes/No questions\n| Question | Answer |\n|---|---|\n| Is she smiling? | Yes |\n\n"
        "### Multiple-choice questions\n| Question | Choices | Answer |\n|---|---|---|\n"
        "| What is she holding? | A. A cup B. A book C. A phone D. Nothing | C. A phone |\n"
        "| What colour is the wall? | | B |\n"
    )
    assert r.tables == 2
    assert got == [
        ("yes_no", "Is she smiling?", [], "Yes"),
        ("choice", "What is she holding?", ["A cup", "A book", "A phone", "Nothing"], "C"),
    ]
    assert problems == [("bad_choices", 10)]


def test_the_odd_rows_of_the_released_data():
    got, problems, _ = pairs(
        "| Type of Question | Question | Answer |\n| --- | --- | --- |\n"
        "| Yes/No | Is the image in black and white or color? | Color. |\n"
        "| Yes/No | Why is she taking off her coat? | Because it is warm. |\n"
        "| Yes/No | Does the image evoke desire? | Maybe. |\n"
        "| Yes/No | 1. Yes | 1. Yes. |\n"
        "| Yes/No | Black lace underwear | Black lace underwear. |\n"
        "| How | How is she dressed? | Is she? Yes. |\n"
        "| How | Is she trying to show off? | Yes |\n"
        "| What | How much skin is visible? | None. |\n"
    )
    assert got == [
        ("open", "Is the image in black and white or color?", [], "Color."),
        ("open", "Why is she taking off her coat?", [], "Because it is warm."),
        ("how", "How is she dressed?", [], "Is she? Yes."),
        ("yes_no", "Is she trying to show off?", [], "Yes"),
        ("what", "How much skin is visible?", [], "None."),
    ]
    assert [p[0] for p in problems] == ["bad_yes_no", "no_question", "no_question"]


def test_an_answer_given_as_the_option_text_is_not_read_as_a_letter():
    got, problems, _ = pairs(
        "| Question | Choices | Answer |\n|---|---|---|\n"
        "| What is she wearing? | A. A hat B. A dress C. Jeans D. A coat | A dress |\n"
        "| What is behind her? | A. A wall B. A car C. A tree D. A door | A |\n"
    )
    assert problems == [] and [g[3] for g in got] == ["B", "A"]


@pytest.mark.parametrize(
    "answer, options, expected",
    [("E", 4, "bad_choice_answer"), ("a fish", 4, "bad_choice_answer"), ("", 4, "no_answer")],
)
def test_unusable_choice_answers_say_why(answer, options, expected):
    opts = " ".join(f"{'ABCD'[i]}. opt{i}" for i in range(options))
    _, problems, _ = pairs(f"| Question | Choices | Answer |\n|---|---|---|\n| Which? | {opts} | {answer} |\n")
    assert [p[0] for p in problems] == [expected]


def test_no_table_at_all_and_header_only():
    r = parse_qa_text("Sure! 1. Is she standing? Yes.")
    assert r.tables == 0 and r.rows == 0 and not r.pairs
    r = parse_qa_text("| Question | Choices | Answer |\n| --- | --- | --- |\n")
    assert r.tables == 1 and r.rows == 0 and r.header_only == 1


def test_generic_helpers():
    assert split_row(r"| a \| b | c |") == ["a | b", "c"]
    assert split_options("A. A dress B. Plan B jeans C. A skirt D. Shorts") == ["A dress", "Plan B jeans", "A skirt", "Shorts"]
    assert split_options("A red dress") is None
    assert split_options("Choose: A. x B. y") is None
    for yes in ("Yes", "yes.", "✓", "✔️", "Yes, she is.", "TRUE"):
        assert normalise_yes_no(yes) == "Yes", yes
    for no in ("No.", "✘", "❌", "no, it is not", "N"):
        assert normalise_yes_no(no) == "No", no
    for neither in ("Maybe", "Nobody knows", "Yesterday", ""):
        assert normalise_yes_no(neither) is None, neither
    t = find_tables("intro\n| h1 | h2 |\n|---|---|\n| a | b |\n| h1 | h2 |\n| c | d |\ntail")
    assert len(t) == 1 and t[0].header == ["h1", "h2"] and [r.cells for r in t[0].rows] == [["a", "b"], ["c", "d"]]


# --------------------------------------------------------------------------- round trip

WORDS = ["red", "coat", "wall", "smiling", "woman", "bright", "soft", "standing", "window", "dress", "lamp", "calm",
         "sofa", "blue", "hair", "street", "garden", "book", "shirt", "warm"]
text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=5).map(" ".join)
question = text.map(lambda s: s[0].upper() + s[1:] + "?")


@st.composite
def qa_pairs(draw) -> QAPair:
    kind = draw(st.sampled_from(["yes_no", "choice", "what", "how"]))
    q = draw(question)
    if kind == "yes_no":
        return QAPair(kind="yes_no", question="Is the " + q[0].lower() + q[1:], answer=draw(st.sampled_from(["Yes", "No"])))
    if kind == "choice":
        article = st.sampled_from(["", "A ", "The "])  # "A dress": an article, not the letter A
        opts = draw(st.lists(st.tuples(article, text).map(lambda t: (t[0] + t[1]).capitalize()),
                             min_size=4, max_size=4, unique_by=str.lower))
        idx = draw(st.integers(0, 3))
        return QAPair(kind="choice", question="Which " + q[0].lower() + q[1:], answer="ABCD"[idx], choices=opts, answer_index=idx)
    lead = "What" if kind == "what" else "How"
    return QAPair(kind=kind, question=f"{lead} {q[0].lower()}{q[1:]}", answer=draw(text).capitalize() + ".")


@st.composite
def rendering(draw):
    items = draw(st.lists(qa_pairs(), min_size=1, max_size=8))
    layout = draw(st.sampled_from(["one_cell", "spread", "type_column"]))
    letter = draw(st.sampled_from(["{L}. ", "{L}) ", "({L}) ", "{L}: ", "{L} - "]))
    joiner = draw(st.sampled_from([" ", ", ", "<br>", "; "]))
    answer_style = draw(st.sampled_from(["letter", "letter_dot", "letter_text", "text", "tick"]))
    yes_style = draw(st.sampled_from(["word", "dot", "tick"]))
    outer = draw(st.booleans())
    around = draw(st.booleans())
    bold = draw(st.booleans())

    def opt(i, o):
        return letter.format(L="ABCD"[i]) + o

    def answer_of(p):
        if p.kind == "yes_no":
            return {"word": p.answer, "dot": p.answer + ".", "tick": "✓" if p.answer == "Yes" else "✘"}[yes_style]
        if p.kind == "choice":
            i = p.answer_index
            return {"letter": p.answer, "letter_dot": p.answer + ".", "letter_text": f"{p.answer}. {p.choices[i]}",
                    "text": p.choices[i], "tick": ""}[answer_style]
        return p.answer

    def choices_of(p):
        if p.kind != "choice":
            return [""]
        opts = [opt(i, o) + (" ✓" if answer_style == "tick" and i == p.answer_index else "") for i, o in enumerate(p.choices)]
        return opts if layout == "spread" else [joiner.join(opts)]

    def q_of(p):
        return f"**{p.question}**" if bold else p.question

    kinds = {"yes_no": "Yes/No", "choice": "Multiple choice", "what": "What", "how": "How"}
    if layout == "type_column":
        header = ["Type", "Question", "Choices", "Answer"]
        rows = [[kinds[p.kind], q_of(p), *choices_of(p), answer_of(p)] for p in items]
    else:
        header = ["Question", "Choices", "Answer"]
        rows = [[q_of(p), *choices_of(p), answer_of(p)] for p in items]

    def line(cells):
        body = " | ".join(cells)
        return f"| {body} |" if outer else body

    lines = [line(header), line(["---"] * len(header)), *(line(r) for r in rows)]
    table = "\n".join(lines)
    if around:
        table = "Here are the questions and answers:\n\n" + table + "\n\nI hope these help."
    return items, table, layout


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rendering())
def test_round_trip_every_rendering_parses_back(case):
    items, table, layout = case
    r = parse_qa_text(table)
    assert r.problems == [], (table, r.problems)
    assert r.rows == len(items)
    for want, got in zip(items, r.pairs, strict=True):
        assert got.question == want.question, table
        assert got.answer == want.answer, table
        assert got.choices == want.choices, table
        if want.kind == "choice":
            assert got.kind == "choice" and got.answer_index == want.answer_index
        elif want.kind == "yes_no":
            assert got.kind == "yes_no"
        elif layout == "type_column":
            assert got.kind == want.kind
