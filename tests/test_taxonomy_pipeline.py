"""The paper's pipeline on every term of the harm taxonomy (issue 18).

For every member of the ``icm-standard`` bundle (read from the bundle file, so a member
added there is checked here; a member whose YAML does not exist fails, it is not
skipped):

* ``icm policy prompts NAME --json`` compiles the term question, one lettered question
  per attribute and the data-generation prompts of every product;
* ``icm data generate`` for a handful of products runs against the scripted teacher on
  loopback (:mod:`icm.demo.policy_teacher`: it writes from the product description in
  the prompt), on synthetic drawings only - no realistic image is drawn or fetched - and
  every record names its product; ``icm data export`` (LLaVA and ShareGPT JSON) holds them;
* ``icm train``'s moderation examples (:func:`icm.training.datasets.moderation_examples`,
  from the parquet export that carries the product) ask the term question and every
  attribute question, each answered with the product's label.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icm.cli.main import app
from icm.data import read_records, read_rejected
from icm.demo.policy_teacher import policy_qa_table, policy_texts
from icm.demo.synth import draw_figure, random_figure
from icm.demo.teacher import TeacherServer
from icm.policy import Policy, Product, load_policy
from icm.policy.bundle import load_bundle
from icm.policy.prompts_format import moderation_choice_prompt, option_labels, yes_no_prompt

runner = CliRunner()

_bundle = load_bundle("icm-standard")
assert _bundle is not None, "the built-in bundle icm-standard is missing"
MEMBERS = list(_bundle.policies)


def handful(policy: Policy, most: int = 5) -> list[Product]:
    """A few products that between them set every attribute, with a positive and a
    negative one where the policy has them."""
    chosen: list[Product] = []
    covered: set[str] = set()
    for p in sorted(policy.products, key=lambda p: -len(p.assignment)):
        if set(p.assignment) - covered:
            chosen.append(p)
            covered |= set(p.assignment)
    for positive in (True, False):
        if not any(p.positive == positive for p in chosen):
            chosen += [p for p in policy.products if p.positive == positive][:1]
    assert covered == set(policy.attribute_map), f"no product of {policy.name} sets {set(policy.attribute_map) - covered}"
    return chosen[: max(most, len(chosen))]


def draw_inputs(root: Path, products: list[Product]) -> Path:
    """One synthetic drawing (the demo's figures, 32 px) per product, in product folders."""
    rng = random.Random(root.name)
    folder = root / "inputs"
    for i, p in enumerate(products):
        (folder / p.id).mkdir(parents=True)
        draw_figure(random_figure(rng), size=32, seed=f"{root.name}-{i}").save(folder / p.id / f"drawing{i}.png")
    return folder


def test_a_verdict_statement_without_the_term_word_is_read():
    """Most taxonomy terms state their verdict without their id ("The image shows a weapon"
    for ``weapons``): an explanation opening with the statement has its verdict."""
    from icm.data.quality import check_explanation, first_person, statement_verdict

    pos, neg = "The image shows a weapon", "It is not true that the image shows a weapon"
    why = "because a long dark shape with a grip is drawn at the centre of the picture."
    assert statement_verdict(f"{pos}, {why}", pos, neg).label is True
    assert statement_verdict(f"{neg}, {why}", pos, neg).label is False
    assert statement_verdict(f"The picture is calm, {why}", pos, neg).label is None
    assert statement_verdict(f"{pos}less room, {why}", pos, neg).label is None  # not at a word boundary
    verdict, findings = check_explanation(f"{neg}, {why}", "weapons", False, statements=(pos, neg))
    assert verdict.label is False and not findings
    _, findings = check_explanation(f"{neg}, {why}", "weapons", False)
    assert [f.reason for f in findings] == ["no_verdict"]  # without the statements, as before
    # "mine" the noun is no first person; the pronoun still is
    assert first_person("A bomb, grenade or mine lies on the ground.") is None
    assert first_person("The drawing is a favourite of mine.") == "mine"


def test_the_teacher_writes_clean_texts_for_every_product_of_the_existing_members():
    """Texts that pass the quality filters and tables that parse whole, for every product
    (not only the handful the pipeline test runs), of each member that exists today."""
    from icm.data.quality import check_description, check_explanation
    from icm.data.tables import parse_qa_text
    from icm.policy import builtin_policy_names

    counts = {"yes_no": 4, "choice": 5, "what": 3, "how": 3}
    for name in [m for m in MEMBERS if m in builtin_policy_names()]:
        policy = load_policy(name)
        for p in policy.products:
            explicit, implicit, explanation = policy_texts(policy, p)
            assert not check_description(explicit) and not check_description(implicit), (name, p.id)
            t = policy.term
            verdict, findings = check_explanation(explanation, t.id, p.positive,
                                                  statements=(t.positive_statement, t.negative_statement))
            assert not findings and verdict.label is p.positive, (name, p.id, findings, explanation)
            parsed = parse_qa_text(policy_qa_table(policy, p, counts))
            assert not parsed.problems and parsed.pairs[0].answer == ("Yes" if p.positive else "No"), (name, p.id)


def test_the_teacher_answers_moderation_questions_consistently_per_image():
    """For a policy the drawings do not show, one image gets the term and attribute answers
    of one product (picked from its pixels), with logprobs."""
    import base64
    import io

    from icm.demo.teacher import teacher_reply

    policy = load_policy("gambling")
    buf = io.BytesIO()
    draw_figure(random_figure(random.Random(1)), size=32, seed="moderation").save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def ask(text: str):
        return teacher_reply(policy, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                   {"type": "text", "text": text}]}])

    term = ask(yes_no_prompt(policy.term.question))
    assert term.text in ("Yes", "No") and term.logprobs
    activity = policy.attribute("activity")
    got = ask(moderation_choice_prompt(activity.question, [v.option_text for v in activity.values]))
    value = activity.value_ids[option_labels(len(activity.values)).index(got.text)]
    assert any(p.positive is (term.text == "Yes") and p.assignment.get("activity") == value for p in policy.products)


@pytest.mark.parametrize("name", MEMBERS)
def test_pipeline_on_every_taxonomy_term(name, tmp_path):
    from icm.training.datasets import load_examples, moderation_examples

    policy = load_policy(name)  # a member without its YAML fails here

    # (a) the compiled prompts
    r = runner.invoke(app, ["policy", "prompts", name, "--json"])
    assert r.exit_code == 0, r.output
    compiled = json.loads(r.output)
    assert compiled["term"]["prompt"] == yes_no_prompt(policy.term.question)
    assert [a["attribute"] for a in compiled["attributes"]] == [a.id for a in policy.attributes]
    for got, attr in zip(compiled["attributes"], policy.attributes, strict=True):
        assert got["prompt"] == moderation_choice_prompt(attr.question, [v.option_text for v in attr.values])
    assert [s["product"] for s in compiled["stages"]] == [p.id for p in policy.products]
    for stage, p in zip(compiled["stages"], policy.products, strict=True):
        assert stage["hint"] == p.description and p.description in stage["combined"]
        assert policy.term.question in stage["combined"] and policy.term.positive_statement in stage["explanation"]

    # (b) ICM-Instruct generation against the scripted teacher, then the trainer's exports
    products = handful(policy)
    inputs = draw_inputs(tmp_path, products)
    out = tmp_path / "instruct"
    with TeacherServer(policy) as teacher:
        r = runner.invoke(app, [
            "data", "generate", str(inputs), "--policy", name, "--out", str(out), "--mllm-model", teacher.model,
            "--mllm-base-url", teacher.base_url, "--yes-no", "3", "--choice", "2", "--what", "2", "--how", "1",
            "--concurrency", "4", "--retries", "0", "--timeout", "20", "--json",
        ])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["written"] == len(products) and summary["rejected"] == 0 and summary["failed"] == 0, summary
    assert not read_rejected(out), "a Q-A row of the teacher's table was not usable"
    records = read_records(out)
    assert sorted(rec.product for rec in records) == sorted(p.id for p in products)
    for rec in records:
        p = policy.product(rec.product)
        assert rec.policy == name and rec.term == policy.term.id and rec.positive is p.positive
        assert rec.explanation is not None and rec.explanation.verdict is p.positive
        assert rec.explanation.text.startswith(policy.term.positive_statement if p.positive else policy.term.negative_statement)
        kinds = [q.kind for q in rec.qa]  # as many as asked, fewer where the product sets few attributes
        assert kinds.count("yes_no") == 3 and kinds.count("choice") <= 2 and kinds.count("what") == 2, kinds
        assert rec.qa[0].question == policy.term.question
        assert rec.qa[0].answer == ("Yes" if p.positive else "No")
    ids = {rec.id for rec in records}
    for fmt in ("llava", "sharegpt", "parquet"):
        r = runner.invoke(app, ["data", "export", str(out), "-f", fmt, "-o", str(tmp_path / fmt), "--val-ratio", "0"])
        assert r.exit_code == 0, (fmt, r.output)
    llava = json.loads((tmp_path / "llava" / "llava_train.json").read_text())
    assert {row["id"] for row in llava} == ids  # a record's id is <product>-<image hash>
    shared = [json.loads(f.read_text()) for f in (tmp_path / "sharegpt").glob("*train*.json")]
    rows = [row for rows in shared for row in rows]
    assert len(rows) == len(records) and all(len(row["images"]) == 1 for row in rows)
    for rec in records:
        assert any(rec.explanation.text in m["content"] for row in rows for m in row["messages"]), rec.id  # type: ignore[union-attr]

    # (c) the moderation questions icm train adds, from the export that carries the product
    examples = load_examples([tmp_path / "parquet"])["train"]
    assert sorted(ex.product or "" for ex in examples) == sorted(p.id for p in products)
    mq, skipped = moderation_examples(examples)
    assert skipped == 0
    asked_attributes: set[str] = set()
    for ex in examples:
        p = policy.product(ex.product or "")
        asked = {m.messages[0]["content"][-1]["text"]: m.messages[1]["content"][0]["text"]
                 for m in mq if m.image_key == ex.image_key}
        assert asked[yes_no_prompt(policy.term.question)] == ("Yes" if p.positive else "No"), p.id
        for attr in policy.attributes:
            prompt = moderation_choice_prompt(attr.question, [v.option_text for v in attr.values])
            value = p.assignment.get(attr.id)
            if value is None:
                assert prompt not in asked, (p.id, attr.id)
                continue
            assert asked[prompt] == option_labels(len(attr.values))[attr.value_ids.index(value)], (p.id, attr.id)
            asked_attributes.add(attr.id)
    assert asked_attributes == set(policy.attribute_map)
