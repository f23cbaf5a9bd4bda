"""`icm moderate --backend hf --preset ...` on tiny random checkpoints built offline.

The guards' real weights are gated and large. The checkpoints here are tiny and random:
a LLaVA (LlavaGuard-7B-hf's architecture, LLaVA's own template), a Qwen2-VL (QwenGuard is
Qwen2.5-VL; Qwen2-VL's processor and template are the same shape), a Gemma 3
(``Gemma3ForConditionalGeneration``, ShieldGemma 2's architecture) and, for Llama Guard 4, a
LLaVA carrying Llama Guard 4's prompt as its chat template (``Llama4ForConditionalGeneration``
is not used: its only image processor needs torchvision, which this install does not have, and a
tiny one's forward fails inside transformers 5.23).
The guards' templates are written here from the model cards' documented formats. A random
model gives random replies, so what is checked is the prompt, the plumbing and the reading:

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

from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.backends.hf_answers import resolve_answer_token_ids
from icm.moderation.backends.hf_processor import load_processor
from icm.moderation.images import load_image
from icm.moderation.job import read_records
from icm.moderation.presets.formats import llavaguard_prompt, shieldgemma2_policies
from icm.policy import load_policy

from tiny_models import build_tiny_llava, scored_texts

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
SG2_TEMPLATE = (  # Gemma 3's turns; the image where the processor puts it, before the policy
    "{{ bos_token }}{% for message in messages %}<start_of_turn>user\n<start_of_image>"
    + json.dumps(SG2_BEFORE)[1:-1].replace("\\n", "\n") + _TEXT + SG2_AFTER.replace("'", "\\'").join(["{{ '", "' }}"])
    + "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_LG4_HEAD, _LG4_TAIL = LG4_PROMPT.split("<image>")
LG4_TEMPLATE = (  # the user turn's parts where the card shows the conversation
    "{{ '" + _LG4_HEAD.replace("\n", "\\n").replace("'", "\\'") + "' }}"
    "{% for part in messages[0]['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '" + _LG4_TAIL.replace("\n", "\\n").replace("'", "\\'") + "' }}"
)


# ShieldGemma 2's architecture, tiny: a SigLIP tower, 4 pooled image tokens of a 32 px image, a 2-layer Gemma 3, a
# Gemma3Processor with the PIL image processor (no torchvision) and a byte-level BPE with Gemma's specials.
GEMMA_SPECIALS = ("<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                  "<image_soft_token>")


def build_tiny_gemma3(path: str | Path, chat_template: str, *, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        PreTrainedTokenizerFast,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from icm.training.tiny import training_corpus

    path = Path(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=list(GEMMA_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_corpus(seed=seed), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    fast.chat_template = chat_template
    text = Gemma3TextConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=4096, sliding_window=64,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    vision = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2)
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        boi_token_index=fast.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=fast.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=fast.convert_tokens_to_ids("<image_soft_token>"),
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=fast,
                                chat_template=chat_template, image_seq_length=4)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


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
        "shieldgemma2": build_tiny_gemma3(root / "shieldgemma2", SG2_TEMPLATE),  # ShieldGemma 2's architecture
        "llama-guard-4": guard_model(root, "llama-guard-4", LG4_TEMPLATE),
    }


def documented_ids(path: Path, text: str) -> list[int]:
    """The token ids of the documented prompt ``text`` with the image expanded, as the processor makes them."""
    proc, _ = load_processor(str(path))
    image = load_image(IMAGE).image.convert("RGB")
    bos = proc.tokenizer.bos_token
    add = bos is None or not text.startswith(bos)
    return proc(images=[image], text=[text], return_tensors="pt", add_special_tokens=add)["input_ids"][0].tolist()


class Forced:
    """``generate`` of the tiny LLaVA replaced: records the prompt ids, answers ``reply``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path, reply: str | None, cls: Any = LlavaForConditionalGeneration) -> None:
        self.seen: list[list[int]] = []
        tok = load_processor(str(path))[0].tokenizer
        real = cls.generate

        def generate(model: Any, input_ids: Any = None, **kw: Any) -> Any:
            self.seen += input_ids.tolist()
            if reply is None:
                return real(model, input_ids=input_ids, **kw)
            ids = [*tok.encode(reply, add_special_tokens=False), tok.eos_token_id]
            return torch.cat([input_ids, torch.tensor([ids] * input_ids.shape[0])], dim=1)

        monkeypatch.setattr(cls, "generate", generate)


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


def test_qwenguard_on_hf_qwen2vl(tiny_qwen2vl_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QwenGuard (LlavaGuard's prompt on Qwen2.5-VL) through a tiny Qwen2-VL and its chat template."""
    from transformers import Qwen2VLForConditionalGeneration

    reply = json.dumps({"rating": "Safe", "category": "NA: None applying", "rationale": "A flower in a garden."})
    forced = Forced(monkeypatch, tiny_qwen2vl_path, reply, Qwen2VLForConditionalGeneration)
    rec = moderate(tiny_qwen2vl_path, tmp_path, "llavaguard")
    documented = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + llavaguard_prompt(POLICY, RULES)
                  + "<|im_end|>\n<|im_start|>assistant\n")
    assert forced.seen == [documented_ids(tiny_qwen2vl_path, documented)]
    assert rec.verdict == "allow" and rec.explanation == "A flower in a garden."
    assert rec.flagged_categories["llavaguard"] == []


def test_llavaguard_on_hf_random_reply_is_never_allowed(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Forced(monkeypatch, models["llavaguard"], None)  # the random model's own (malformed) reply
    rec = moderate(models["llavaguard"], tmp_path, "llavaguard")
    assert rec.verdict == "review"
    assert rec.unanswered["term:sexy"].startswith(("off-format", "refused"))
    assert rec.flagged_categories["llavaguard"] == ["O4", "O3"]


def test_llama_guard_4_on_hf_prompt_and_forced_reply(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = models["llama-guard-4"]
    forced = Forced(monkeypatch, path, "unsafe\nS12")
    rec = moderate(path, tmp_path, "llama-guard-4", "--text-confidence", "0.9")
    assert forced.seen == [documented_ids(path, LG4_PROMPT)]
    assert rec.flagged_categories["mlcommons"] == ["S12"] and rec.verdict == "block"
    assert rec.category_scores["mlcommons"]["S12"] == pytest.approx(0.9)  # --text-confidence reaches the hf preset


def test_shieldgemma2_on_hf_p_yes_from_the_yes_no_logits(models, tmp_path: Path) -> None:
    path = models["shieldgemma2"]
    rec = moderate(path, tmp_path, "shieldgemma2", "--min-label-mass", "0")  # a random model puts little mass on Yes/No
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    tok = AutoProcessor.from_pretrained(path).tokenizer
    yes, no = resolve_answer_token_ids(tok, "Yes"), resolve_answer_token_ids(tok, "No")
    expected = {}
    for code, definition in shieldgemma2_policies(POLICY, RULES).items():
        documented = "<bos><start_of_turn>user\n<start_of_image>" + SG2_BEFORE + definition + SG2_AFTER + "<end_of_turn>\n<start_of_turn>model\n"
        ids = documented_ids(path, documented)
        proc = AutoProcessor.from_pretrained(path)
        enc = proc(images=[load_image(IMAGE).image.convert("RGB")], text=[documented], return_tensors="pt", add_special_tokens=False)
        assert enc["input_ids"][0].tolist() == ids
        with torch.inference_mode():
            p = torch.softmax(model(**enc).logits[0, -1].float(), dim=-1)
        expected[code] = float(p[yes].sum() / (p[yes].sum() + p[no].sum()))
    assert rec.category_scores["llavaguard"] == pytest.approx(expected, abs=1e-4)
    assert rec.term.p_yes == pytest.approx(max(expected.values()), abs=1e-4) and rec.term.source == "logits"


def test_the_hf_backend_scores_a_prompt_as_written(tiny_llava_path: Path) -> None:
    """Backend.score_prompts_yes_no: the prompt reaches the forward pass unchanged; with icm's wording written
    out it gives what score_yes_no gives for the bare question."""
    from icm.moderation.backends.hf import HFBackend
    from icm.prompting import yes_no_prompt

    backend = HFBackend(model=str(tiny_llava_path), device="cpu", min_label_mass=0.0)
    image = load_image(IMAGE).image.convert("RGB")
    prompt = "Is there a flower? Reply Yes or No."
    with scored_texts(backend) as seen:
        [as_written] = backend.score_prompts_yes_no([image], [prompt])
        [written_out] = backend.score_prompts_yes_no([image], [yes_no_prompt(prompt)])
        [asked] = backend.score_yes_no([image], [prompt])
    assert seen == [prompt, yes_no_prompt(prompt), yes_no_prompt(prompt)]
    assert as_written.source == "logits"  # type: ignore[union-attr]
    assert written_out.p_yes == pytest.approx(asked.p_yes, abs=1e-6)  # type: ignore[union-attr]
