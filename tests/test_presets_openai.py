"""`icm moderate --preset ...` on the openai backend, against loopback servers answering
in each guard model's format (tests/fake_openai.py on 127.0.0.1).

Through the real CLI, job, engine and backend: each preset's records carry the guard's
categories (its own scheme and, through the policy's products, the others), its rationale
as the explanation and its reply in the notes; malformed JSON, a missing category, a
refusal, an unknown first line are never allowed and flag every category the policy maps;
ShieldGemma 2's P(Yes) comes from the Yes/No logprobs (leading-space tokens too), else
from the text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.job import read_records
from icm.moderation.presets.formats import llavaguard_prompt, shieldgemma2_policies
from icm.policy import load_policy

from fake_openai import Reply, text_body, vllm_logprobs_body

runner = CliRunner()
IMAGE = str(Path(__file__).resolve().parents[1] / "examples" / "images" / "flower.jpg")
POLICY = load_policy("icm-sexy")
RULES = POLICY.rule_set(None)  # icm-default: review 0.3, block 0.7


def moderate(vlm: tuple[Any, str], tmp_path: Path, preset: str, *extra: str) -> tuple[Any, list]:
    out = tmp_path / f"{preset}.jsonl"
    args = ["moderate", IMAGE, "--policy", "icm-sexy", "--backend", "openai", "--model", "guard", "--base-url", vlm[1],
            "--preset", preset, "--out", str(out), "--max-retries", "0", *extra]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    records, bad = read_records(str(out))
    assert bad == 0 and len(records) == 1
    return result, records


def user_texts(body: dict[str, Any]) -> list[str]:
    parts = body["messages"][-1]["content"]
    assert parts[0]["type"] == "image_url"  # the image first, as the model cards send it
    return [p["text"] for p in parts if p.get("type") == "text"]


def assert_never_clean(rec: Any) -> None:
    assert rec.verdict == "review"
    assert rec.unanswered["term:sexy"].startswith(("off-format", "refused"))
    assert rec.flagged_categories == {s: list(c) for s, c in POLICY.standard_categories.items()}
    assert rec.category_scores == {}


# ------------------------------------------------------------------ LlavaGuard


def llavaguard_reply(obj: Any) -> Reply:
    text = obj if isinstance(obj, str) else json.dumps(obj, indent=4)
    return Reply(json=text_body(text, completion_tokens=60))


def test_llavaguard_unsafe_reply_becomes_a_record_with_categories(vlm, fake, tmp_path: Path) -> None:
    fake.script("default", llavaguard_reply(
        {"rating": "Unsafe", "category": "O3: Sexual Content", "rationale": "A person lifting her skirt."}))
    _, [rec] = moderate(vlm, tmp_path, "llavaguard")
    [body] = fake.bodies("default")
    assert user_texts(body) == [llavaguard_prompt(POLICY, RULES)]  # the policy in LlavaGuard's format, as is
    assert rec.term.p_yes == pytest.approx(0.75) and rec.term.source == "text"
    assert rec.category_scores["llavaguard"] == {"O3": pytest.approx(0.75), "O4": pytest.approx(0.25)}
    assert rec.flagged_categories["llavaguard"] == ["O3"]
    assert rec.category_scores["mlcommons"]["S12"] == pytest.approx(0.75)  # O3's products are S12's
    assert rec.verdict == "block"  # 0.75 >= block 0.7 of icm-default
    assert rec.explanation == "A person lifting her skirt."
    assert rec.reason.startswith("The llavaguard guard said '{ \"rating\": \"Unsafe\"")
    assert "(preset llavaguard)" in (rec.model or "")
    assert any("preset llavaguard: the guard said" in n for n in rec.notes)


def test_llavaguard_safe_reply_allows(vlm, fake, tmp_path: Path) -> None:
    fake.script("default", llavaguard_reply(
        '```json\n{\n    "rating": "Safe",\n    "category": "NA: None applying",\n    "rationale": "A flower.",\n}\n```'))
    _, [rec] = moderate(vlm, tmp_path, "llavaguard")  # fenced, with the template's trailing comma
    assert rec.verdict == "allow"
    assert rec.flagged_categories["llavaguard"] == []
    assert rec.explanation == "A flower."


def test_llavaguard_safe_rating_with_a_category_allows(vlm, fake, tmp_path: Path) -> None:
    fake.script("default", llavaguard_reply(
        {"rating": "Safe", "category": "O3: Sexual Content", "rationale": "Affectionate, not sexually explicit."}))
    _, [rec] = moderate(vlm, tmp_path, "llavaguard")
    assert rec.verdict == "allow" and rec.term.p_yes == pytest.approx(0.25)
    assert rec.category_scores["llavaguard"] == {"O3": pytest.approx(0.25), "O4": pytest.approx(0.25)}


@pytest.mark.parametrize(
    "said",
    [
        '{"rating": "Unsafe", "category": "O3: Sexual Content", "rationale": "cut off',  # malformed JSON
        "The image shows a flower.",  # no JSON at all
        '{"rating": "Maybe", "category": "O3"}',  # an unknown rating
        '{"rating": "Unsafe", "category": "O7: Self-Harm", "rationale": "x"}',  # a category not offered
        "I'm sorry, but I can't help with that.",  # a refusal
    ],
)
def test_llavaguard_unreadable_reply_is_never_allowed(vlm, fake, tmp_path: Path, said: str) -> None:
    fake.script("default", llavaguard_reply(said))
    _, [rec] = moderate(vlm, tmp_path, "llavaguard")
    assert_never_clean(rec)


def test_llavaguard_unsafe_without_category_flags_every_category(vlm, fake, tmp_path: Path) -> None:
    fake.script("default", llavaguard_reply({"rating": "Unsafe", "rationale": "Suggestive pose."}))
    _, [rec] = moderate(vlm, tmp_path, "llavaguard")
    assert rec.verdict == "block"
    assert rec.flagged_categories["llavaguard"] == ["O3", "O4"]
    assert any("unsafe without a category" in n for n in rec.notes)


# ------------------------------------------------------------------ ShieldGemma 2


def test_shieldgemma2_p_yes_per_category_from_logprobs(vlm, fake, tmp_path: Path) -> None:
    fake.script("default", Reply(json=vllm_logprobs_body([(" Yes", -0.2), (" No", -2.0), ("I", -5.0)])))
    _, [rec] = moderate(vlm, tmp_path, "shieldgemma2")
    defs = shieldgemma2_policies(POLICY, RULES)
    sent = sorted(t for b in fake.bodies("default") for t in user_texts(b))
    assert sent == sorted(defs.values())  # one request per category, the definition alone
    p = math.exp(-0.2) / (math.exp(-0.2) + math.exp(-2.0))  # 0.858: leading-space tokens count
    assert rec.term.p_yes == pytest.approx(p, abs=1e-6) and rec.term.source == "logprobs"
    assert rec.category_scores["llavaguard"] == {"O3": pytest.approx(p, abs=1e-6), "O4": pytest.approx(p, abs=1e-6)}
    assert rec.flagged_categories["llavaguard"] == ["O3", "O4"]
    assert rec.verdict == "block"


def test_shieldgemma2_without_logprobs_reads_the_text(vlm, fake, tmp_path: Path) -> None:
    fake.script("default", Reply(json=text_body("No")))
    _, [rec] = moderate(vlm, tmp_path, "shieldgemma2")
    assert rec.term.source == "text" and rec.term.p_yes == pytest.approx(0.25)
    assert rec.verdict == "allow"


def test_shieldgemma2_refusal_is_never_allowed(vlm, fake, tmp_path: Path) -> None:
    fake.script("default", Reply(json=vllm_logprobs_body([("I", -0.01), ("No", -9.0), ("Yes", -9.5)])))
    _, [rec] = moderate(vlm, tmp_path, "shieldgemma2")
    assert_never_clean(rec)


# ------------------------------------------------------------------ Llama Guard 4


def test_llama_guard_4_unsafe_codes_map_through_mlcommons(vlm, fake, tmp_path: Path) -> None:
    fake.script("default", Reply(json=text_body("unsafe\nS1,S12", completion_tokens=5)))
    _, [rec] = moderate(vlm, tmp_path, "llama-guard-4")
    [body] = fake.bodies("default")
    assert user_texts(body) == [""]  # the image alone: the model's chat template writes the task and S1-S14
    assert rec.category_scores["mlcommons"] == {"S12": pytest.approx(0.75)}
    assert rec.flagged_categories["mlcommons"] == ["S12"]
    assert rec.flagged_categories["llavaguard"] == ["O3", "O4"]  # S12's products are O3's and O4's
    assert rec.verdict == "block"


def test_llama_guard_4_safe_and_other_hazards_allow(vlm, fake, tmp_path: Path) -> None:
    fake.script("default", Reply(json=text_body("safe")))
    _, [rec] = moderate(vlm, tmp_path, "llama-guard-4")
    assert rec.verdict == "allow" and rec.flagged_categories["mlcommons"] == []
    fake.reset()
    fake.script("default", Reply(json=text_body("unsafe\nS7")))  # privacy: not a hazard this policy maps
    _, [rec] = moderate(vlm, tmp_path, "llama-guard-4")
    assert rec.verdict == "allow"
    assert any("unsafe in S7" in n for n in rec.notes)


@pytest.mark.parametrize("said", ["unsure", "unsafe\nviolence", "", "Sorry, I cannot assess this image."])
def test_llama_guard_4_unreadable_reply_is_never_allowed(vlm, fake, tmp_path: Path, said: str) -> None:
    fake.script("default", Reply(json=text_body(said)))
    _, [rec] = moderate(vlm, tmp_path, "llama-guard-4")
    assert_never_clean(rec)


def test_llama_guard_4_unsafe_without_codes_flags_every_category(vlm, fake, tmp_path: Path) -> None:
    fake.script("default", Reply(json=text_body("unsafe")))
    _, [rec] = moderate(vlm, tmp_path, "llama-guard-4")
    assert rec.verdict == "block" and rec.flagged_categories["mlcommons"] == ["S12"]


def test_moderate_help_lists_the_presets() -> None:
    result = runner.invoke(app, ["moderate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in ("llavaguard", "shieldgemma2", "llama-guard-4"):
        assert name in result.output


def test_preset_needs_an_mllm_backend(tmp_path: Path) -> None:
    result = runner.invoke(app, ["moderate", IMAGE, "--preset", "llavaguard"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "--preset llavaguard runs on the hf or openai backend" in result.output
    result = runner.invoke(app, ["moderate", IMAGE, "--backend", "openai", "--model", "m", "--preset", "llamaguard"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "--preset" in result.output and "llama-guard-4" in result.output


def test_serve_and_eval_run_take_the_preset() -> None:
    from icm.moderation.presets import PresetBackend
    from icm.moderation.spec import create_backends
    from icm.serve.config import ServeConfig

    spec = ServeConfig(backend="openai", model="guard", base_url="http://127.0.0.1:9/v1", preset="llama-guard-4").backend_spec()
    assert spec.preset == "llama-guard-4"
    first, second = create_backends(spec)
    try:
        assert isinstance(first, PresetBackend) and second is None and first.preset == "llama-guard-4"
    finally:
        first.close()
    for command in (["serve", "--help"], ["eval", "run", "--help"]):
        result = runner.invoke(app, command, env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "--preset" in result.output


def test_one_guard_serves_each_rule_set_with_its_own_prompt(vlm, fake) -> None:
    """The server shares one backend among a Moderator per (policy, rule set): each asks in its own rules."""
    from icm.moderation.engine import Moderator
    from icm.moderation.presets import PresetBackend
    from icm.moderation.spec import BackendSpec, create_backend

    fake.script("default", llavaguard_reply({"rating": "Safe", "category": "NA: None applying", "rationale": "ok"}))
    shared = create_backend(BackendSpec(backend="openai", model="guard", base_url=vlm[1], preset="llavaguard"))
    assert isinstance(shared, PresetBackend)
    try:
        for rules in ("icm-default", "adult-platform"):
            [rec] = Moderator(shared, policy=POLICY, rules=rules).moderate_paths([IMAGE])
            assert rec.ok and rec.verdict == "allow", rec.error
    finally:
        shared.close()
    sent = [user_texts(b)[0] for b in fake.bodies("default")]
    assert sent == [llavaguard_prompt(POLICY, POLICY.rule_set(r)) for r in ("icm-default", "adult-platform")]
    assert sent[0] != sent[1]  # the adult platform allows what icm-default does not


def test_bundle_members_the_guard_cannot_judge_go_to_review(vlm, fake, tmp_path: Path) -> None:
    fake.script("default", Reply(json=text_body("safe")))
    out = tmp_path / "bundle.jsonl"
    args = ["moderate", IMAGE, "--policy", "icm-standard", "--backend", "openai", "--model", "guard", "--base-url", vlm[1],
            "--preset", "llama-guard-4", "--out", str(out)]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    records = {r.policy: r for r in read_records(str(out))[0]}
    assert records["violence"].verdict == "allow"  # maps S1 (and others): judged, "safe"
    for name in ("gambling", "disasters"):  # no MLCommons hazard mapped: never passed as clean
        assert records[name].verdict == "review"
        assert "maps no MLCommons hazard" in records[name].unanswered["term:" + load_policy(name).term.id]
    unmapped = {n for n in records if not load_policy(n).standard_categories.get("mlcommons")}
    assert unmapped == {"gambling", "disasters", "gore", "horrifying"}
    assert len(fake.bodies("default")) == len(records) - len(unmapped)  # those are not asked


def test_eval_run_scores_a_guard_preset(vlm, fake, tmp_path: Path) -> None:
    """`icm eval run --preset`: the guard's verdicts go through the same evaluation as icm's own."""
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(Path(IMAGE).parent, photos, ignore=shutil.ignore_patterns("*.md"))
    labels = tmp_path / "labels.csv"
    labels.write_text("image,category\nchina.jpg,whole_normal\nflower.jpg,upper_normal\ngrace_hopper.jpg,upper_normal\n")
    fake.script("default", llavaguard_reply({"rating": "Safe", "category": "NA: None applying", "rationale": "Nothing unsafe."}))
    out = tmp_path / "run"
    args = ["eval", "run", str(photos), "--labels", str(labels), "--out-dir", str(out), "--json", "--backend", "openai",
            "--model", "guard", "--base-url", vlm[1], "--preset", "llavaguard", "--max-retries", "0"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["icm"]["n_evaluated"] == 3 and (s["icm"]["confusion"]["tn"], s["icm"]["confusion"]["fp"]) == (3, 0)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert all(rec["category_scores"]["llavaguard"] == {"O3": 0.25, "O4": 0.25} for rec in records)
    assert all(rec["explanation"] == "Nothing unsafe." for rec in records)
    assert len(fake.bodies("default")) == 3  # one guard request per image, nothing else


def test_serve_answers_with_the_guard_per_rule_set(vlm, fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`icm serve --preset`: each request's rule set is rendered into the guard's prompt; the record has categories."""
    pytest.importorskip("sqlalchemy")
    from fastapi.testclient import TestClient

    from icm.serve import ServeConfig, create_app

    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    fake.script("default", llavaguard_reply({"rating": "Unsafe", "category": "O4: Nudity Content", "rationale": "Bare back."}))
    cfg = ServeConfig(backend="openai", model="guard", base_url=vlm[1], preset="llavaguard", db=str(tmp_path / "d.sqlite"),
                      allowed_hosts=["testserver"], max_retries=0)
    got = {}
    with TestClient(create_app(cfg), client=("127.0.0.1", 50123)) as c:
        for rules in ("icm-default", "adult-platform"):
            fake.requests.clear()
            r = c.post("/v1/moderate", files={"image": ("flower.jpg", Path(IMAGE).read_bytes(), "image/jpeg")},
                       data={"rules": rules})
            assert r.status_code == 200, r.text
            got[rules] = r.json()["record"]
            assert user_texts(fake.bodies("default")[-1]) == [llavaguard_prompt(POLICY, POLICY.rule_set(rules))]
    rec = got["icm-default"]
    assert rec["flagged_categories"]["llavaguard"] == ["O4"] and rec["verdict"] == "block"
    assert rec["explanation"] == "Bare back." and "(preset llavaguard)" in rec["model"]


def test_cascade_escalates_to_the_guard(vlm, fake, tmp_path: Path) -> None:
    """`--backend cascade --escalate-backend openai --preset`: what the detector cannot clear goes to the guard."""
    fake.script("default", Reply(json=text_body("unsafe\nS1")))
    out = tmp_path / "cascade.jsonl"
    args = ["moderate", IMAGE, "--policy", "violence", "--backend", "cascade", "--escalate-backend", "openai", "--model", "guard",
            "--base-url", vlm[1], "--preset", "llama-guard-4", "--out", str(out)]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    [rec] = read_records(str(out))[0]
    assert rec.stage == "openai" and rec.notes[0].startswith("escalated by detector")
    assert rec.flagged_categories["mlcommons"] == ["S1"]
    # P(violence) = 0.75 but general-audience allows some violent products (news): from the term alone, review
    assert rec.verdict == "review" and rec.basis == "term"
    assert len(fake.bodies("default")) == 1


@pytest.mark.parametrize("preset", ["llavaguard", "shieldgemma2", "llama-guard-4"])
def test_a_failed_guard_request_is_an_error_record(vlm, fake, tmp_path: Path, preset: str) -> None:
    fake.script("default", Reply(503, json={"object": "error", "message": "Service Unavailable", "code": 503}))
    out = tmp_path / "down.jsonl"
    args = ["moderate", IMAGE, "--policy", "icm-sexy", "--backend", "openai", "--model", "guard", "--base-url", vlm[1],
            "--preset", preset, "--out", str(out), "--max-retries", "0"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    [rec] = read_records(str(out))[0]
    assert rec.verdict is None and "503" in (rec.error or "")


def test_eval_bench_runs_a_guard_preset(vlm, fake, tmp_path: Path) -> None:
    """`icm eval bench NAME DATA --preset`: a guard model on a public benchmark, scored as icm is."""
    fake.script("default", llavaguard_reply({"rating": "Safe", "category": "NA: None applying", "rationale": "ok"}))
    fixture = Path(__file__).resolve().parent / "fixtures" / "bench" / "llavaguard"
    args = ["eval", "bench", "llavaguard", str(fixture), "--policy", "icm-sexy", "--backend", "openai", "--model", "guard",
            "--base-url", vlm[1], "--preset", "llavaguard", "--out-dir", str(tmp_path / "b"), "--json", "--bootstrap", "50"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["backend"] == "openai"
    records = read_records(str(tmp_path / "b" / "records.jsonl"))[0]
    assert records and all((r.model or "").endswith(" (preset llavaguard)") for r in records)
    assert all(r.category_scores["llavaguard"] == {"O3": 0.25, "O4": 0.25} for r in records)
    assert len(fake.bodies("default")) == len(records)


def test_the_openai_backend_scores_a_prompt_as_written(vlm, fake) -> None:
    """Backend.score_prompts_yes_no: the guard's prompt reaches the server unchanged (score_yes_no adds icm's
    "Answer with Yes or No."), and P(Yes) is read from the logprobs as score_yes_no reads it."""
    from PIL import Image

    from icm.moderation.backends.openai_compat import OpenAIBackend
    from icm.prompting import yes_no_prompt

    fake.script("default", Reply(json=vllm_logprobs_body([(" Yes", -0.2), (" No", -2.0)])))
    prompt = "Does the image show a flower? Reply Yes or No."
    with OpenAIBackend(model="guard", base_url=vlm[1], max_retries=0) as backend, Image.open(IMAGE) as image:
        [as_written] = backend.score_prompts_yes_no([image], [prompt])
        [asked] = backend.score_yes_no([image], [prompt])
    first, second = fake.bodies("default")
    assert user_texts(first) == [prompt] and user_texts(second) == [yes_no_prompt(prompt)] != [prompt]
    p = math.exp(-0.2) / (math.exp(-0.2) + math.exp(-2.0))
    assert as_written.p_yes == pytest.approx(p, abs=1e-6) and as_written.source == "logprobs"  # type: ignore[union-attr]
    assert asked.p_yes == pytest.approx(p, abs=1e-6)  # type: ignore[union-attr]
