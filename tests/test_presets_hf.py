"""`icm moderate --backend hf --preset ...` on tiny random checkpoints built offline.

The guard architectures' real weights are gated and large; these checkpoints are tiny
LLaVAs (LlavaGuard-7B-hf's architecture) carrying each guard model's chat template, written
here from the model cards' documented prompt formats. A random model gives random replies,
so what is checked is the prompt, the plumbing and the reading:

* the token ids the model is given are, token for token, those of the documented prompt
  with our policy in it (LlavaGuard's policy prompt after the image; ShieldGemma 2's
  safety-policy prompt around one definition; Llama Guard 4's task with S1-S14);
* replies forced through ``generate`` (LlavaGuard JSON, Llama Guard's ``unsafe\\nS12``)
  become records with categories through the real CLI; the random model's own reply
  (malformed) is never allowed;
* ShieldGemma 2's P(Yes) is the softmax over the Yes/No next-token logits of that prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoProcessor, LlavaForConditionalGeneration
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.backends.hf_answers import resolve_answer_token_ids
from icm.moderation.images import load_image
from icm.moderation.job import read_records
from icm.moderation.presets.formats import llavaguard_prompt, shieldgemma2_policies
from icm.policy import load_policy

from tiny_models import build_tiny_llava

runner = CliRunner()
IMAGE = str(Path(__file__).resolve().parents[1] / "examples" / "images" / "flower.jpg")
POLICY = load_policy("icm-sexy")
RULES = POLICY.rule_set(None)

# ------------------------------------------------------------------ the documented formats
# ShieldGemma 2 (google/shieldgemma-2-4b-it): the text its chat template puts around one
# policy definition, as the model's hosted demo logs the prompt.
SG2_BEFORE = (
    "You are a policy expert trying to help determine whether a generated or real image is in violation of the "
    "safety policy below. Your decision must very clearly follow the specific language used in the safety policy "
    "and should not include any interpretation outside of the safety policy.\n<BEGIN_SAFETY_POLICY>\n"
)
SG2_AFTER = "\n</END_SAFETY_POLICY>\nDoes the image violate the above policy? Your Answer must start with 'Yes' or 'No'."
# Llama Guard 4 (meta-llama/Llama-Guard-4-12B, llama.com prompt format): one user turn with an image.
LG4_CATEGORIES = [
    "Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation", "Defamation", "Specialized Advice",
    "Privacy", "Intellectual Property", "Indiscriminate Weapons", "Hate", "Self-Harm", "Sexual Content", "Elections",
    "Code Interpreter Abuse",
]
LG4_PROMPT = (
    "<|begin_of_text|><|header_start|>user<|header_end|>\n\nTask: Check if there is unsafe content in 'User' messages "
    "in conversations according to our safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
    + "".join(f"S{i}: {name}.\n" for i, name in enumerate(LG4_CATEGORIES, 1))
    + "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\nUser: <image>\n\n<END CONVERSATION>\n\n"
    "Provide your safety assessment for ONLY THE LAST User message in the above conversation:\n"
    " - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories."
    "<|eot|><|header_start|>assistant<|header_end|>\n\n"
)

_TEXT = "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
SG2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>user\n<image>"
    + json.dumps(SG2_BEFORE)[1:-1].replace("\\n", "\n") + _TEXT + SG2_AFTER.replace("'", "\\'").join(["{{ '", "' }}"])
    + "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_LG4_HEAD, _LG4_TAIL = LG4_PROMPT.split("<image>")
LG4_TEMPLATE = (  # the user turn's parts where the card shows the conversation
    "{{ '" + _LG4_HEAD.replace("\n", "\\n").replace("'", "\\'") + "' }}"
    "{% for part in messages[0]['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '" + _LG4_TAIL.replace("\n", "\\n").replace("'", "\\'") + "' }}"
)


def guard_model(root: Path, name: str, template: str | None) -> Path:
    path = build_tiny_llava(root / name)
    if template is not None:
        proc = AutoProcessor.from_pretrained(path)
        proc.chat_template = template
        proc.tokenizer.chat_template = template
        proc.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("guards")
    return {
        "llavaguard": guard_model(root, "llavaguard", None),  # LlavaGuard-7B-hf: LLaVA's own "USER: <image>\n..." template
        "shieldgemma2": guard_model(root, "shieldgemma2", SG2_TEMPLATE),
        "llama-guard-4": guard_model(root, "llama-guard-4", LG4_TEMPLATE),
    }


def documented_ids(path: Path, text: str) -> list[int]:
    """The token ids of the documented prompt ``text`` with the image expanded, as the processor makes them."""
    proc = AutoProcessor.from_pretrained(path)
    image = load_image(IMAGE).image.convert("RGB")
    add = not text.startswith(proc.tokenizer.bos_token)
    return proc(images=[image], text=[text], return_tensors="pt", add_special_tokens=add)["input_ids"][0].tolist()


class Forced:
    """``generate`` of the tiny LLaVA replaced: records the prompt ids, answers ``reply``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path, reply: str | None) -> None:
        self.seen: list[list[int]] = []
        tok = AutoProcessor.from_pretrained(path).tokenizer
        real = LlavaForConditionalGeneration.generate

        def generate(model: Any, input_ids: Any = None, **kw: Any) -> Any:
            self.seen += input_ids.tolist()
            if reply is None:
                return real(model, input_ids=input_ids, **kw)
            ids = [*tok.encode(reply, add_special_tokens=False), tok.eos_token_id]
            return torch.cat([input_ids, torch.tensor([ids] * input_ids.shape[0])], dim=1)

        monkeypatch.setattr(LlavaForConditionalGeneration, "generate", generate)


def moderate(path: Path, tmp_path: Path, preset: str, *extra: str) -> Any:
    out = tmp_path / "out.jsonl"
    args = ["moderate", IMAGE, "--policy", "icm-sexy", "--backend", "hf", "--model", str(path), "--device", "cpu",
            "--dtype", "float32", "--preset", preset, "--out", str(out), *extra]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    records, bad = read_records(str(out))
    assert bad == 0 and len(records) == 1
    return records[0]


def test_llavaguard_on_hf_prompt_and_forced_reply(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = models["llavaguard"]
    reply = json.dumps({"rating": "Unsafe", "category": "O4: Nudity Content", "rationale": "Bare back."})
    forced = Forced(monkeypatch, path, reply)
    rec = moderate(path, tmp_path, "llavaguard")
    # the card's usage: [image, policy] through the chat template (LLaVA's ends the user turn with the text's own newline)
    documented = "<s>USER: <image>\n" + llavaguard_prompt(POLICY, RULES) + "ASSISTANT:"
    assert forced.seen == [documented_ids(path, documented)]
    assert rec.flagged_categories["llavaguard"] == ["O4"]
    assert rec.category_scores["llavaguard"]["O4"] == pytest.approx(0.75)
    assert rec.explanation == "Bare back." and rec.verdict == "block"


def test_llavaguard_on_hf_random_reply_is_never_allowed(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Forced(monkeypatch, models["llavaguard"], None)  # the random model's own (malformed) reply
    rec = moderate(models["llavaguard"], tmp_path, "llavaguard")
    assert rec.verdict == "review"
    assert rec.unanswered["term:sexy"].startswith(("off-format", "refused"))
    assert rec.flagged_categories["llavaguard"] == ["O4", "O3"]


def test_llama_guard_4_on_hf_prompt_and_forced_reply(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = models["llama-guard-4"]
    forced = Forced(monkeypatch, path, "unsafe\nS12")
    rec = moderate(path, tmp_path, "llama-guard-4")
    assert forced.seen == [documented_ids(path, LG4_PROMPT)]
    assert rec.flagged_categories["mlcommons"] == ["S12"] and rec.verdict == "block"


def test_shieldgemma2_on_hf_p_yes_from_the_yes_no_logits(models, tmp_path: Path) -> None:
    path = models["shieldgemma2"]
    rec = moderate(path, tmp_path, "shieldgemma2", "--min-label-mass", "0")  # a random model puts little mass on Yes/No
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    tok = AutoProcessor.from_pretrained(path).tokenizer
    yes, no = resolve_answer_token_ids(tok, "Yes"), resolve_answer_token_ids(tok, "No")
    expected = {}
    for code, definition in shieldgemma2_policies(POLICY, RULES).items():
        documented = "<s><start_of_turn>user\n<image>" + SG2_BEFORE + definition + SG2_AFTER + "<end_of_turn>\n<start_of_turn>model\n"
        ids = documented_ids(path, documented)
        proc = AutoProcessor.from_pretrained(path)
        enc = proc(images=[load_image(IMAGE).image.convert("RGB")], text=[documented], return_tensors="pt", add_special_tokens=False)
        assert enc["input_ids"][0].tolist() == ids
        with torch.inference_mode():
            p = torch.softmax(model(**enc).logits[0, -1].float(), dim=-1)
        expected[code] = float(p[yes].sum() / (p[yes].sum() + p[no].sum()))
    assert rec.category_scores["llavaguard"] == pytest.approx(expected, abs=1e-4)
    assert rec.term.p_yes == pytest.approx(max(expected.values()), abs=1e-4) and rec.term.source == "logits"
