"""The Hugging Face backend on tiny checkpoints built and loaded by path (no hub, CPU).

The tiny models are randomly initialised, except the LoRA adapter which the
``color_adapter_path`` fixture trains to answer "Is the image red/blue?": with it the
scores must follow the image and the question, which a constant or a mixed-up batch
cannot fake.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from icm.moderation.backends.base import Choice, NotJudged, Query, YesNoScore
from icm.moderation.backends.hf import (
    HFBackend,
    grouped_probs,
    resolve_answer_token_ids,
)
from icm.policy.prompts_format import moderation_choice_prompt, option_labels, yes_no_prompt
from icm.prompting import reply_lead

from tiny_models import COLOR_P_CORRECT, COLOR_QUESTIONS, held_out_squares, noise_image, square_image

REPO = Path(__file__).resolve().parents[1]
TOL = 2e-5

QUESTIONS = [
    "Is the image sexy?",
    "Is the person in the picture showing a lot of bare skin in a suggestive way?",
    "Is it violent?",
    "Does this photo show anything that would upset a child?",
]
OPTIONS4 = ("fully clothed", "swimwear or underwear", "partially nude", "fully nude")
OPTIONS3 = ("beach", "bedroom", "street")


def _images(backend: HFBackend, n: int = 4) -> list:
    """``n`` images; for models with dynamic resolution, of different shapes (prompt lengths)."""
    model_type = backend.model.config.model_type
    if model_type == "llava":  # CLIP resizes every image to 32 px
        return [noise_image(32, seed=i) for i in range(n - 1)] + [square_image("red", size=32)]
    base = 56 if model_type == "qwen2_vl" else 32
    shapes = [(base, base), (2 * base, base), (base, 2 * base), (2 * base, 2 * base)]
    images = [noise_image(w, seed=i, height=h) for i, (w, h) in enumerate(shapes * n)]
    return [*images[:n - 1], square_image("red", size=base)]


# The untrained tiny models put almost no probability on Yes/No or the option labels, so
# with the default minimum label mass every answer would be "not judged". The tests of the
# scoring arithmetic below turn that check off (min_label_mass=0); the tests at the end of
# the file check it.
@pytest.fixture(scope="module")
def llava(tiny_llava_path: Path) -> HFBackend:
    return HFBackend(model=str(tiny_llava_path), batch_size=8, device="cpu", min_label_mass=0.0)


@pytest.fixture(scope="module")
def qwen(tiny_qwen2vl_path: Path) -> HFBackend:
    return HFBackend(model=str(tiny_qwen2vl_path), batch_size=8, device="cpu", min_label_mass=0.0)


@pytest.fixture(scope="module")
def idefics3(tiny_idefics3_path: Path) -> HFBackend:
    return HFBackend(model=str(tiny_idefics3_path), batch_size=8, device="cpu", min_label_mass=0.0)


@pytest.fixture(params=["llava", "qwen", "idefics3"])
def backend(request: pytest.FixtureRequest) -> HFBackend:
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------- import / install


def test_import_icm_does_not_import_torch() -> None:
    code = (
        "import sys, icm, icm.moderation.backends.hf\n"
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_missing_torch_says_how_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # import torch now raises ImportError
        "from icm.moderation.backends.hf import HFBackend\n"
        "try:\n"
        "    HFBackend(model='some/model')\n"
        "except ImportError as err:\n"
        "    print(err)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True, text=True)
    assert "pip install 'icm-assistant[hf]'" in out.stdout


# --------------------------------------------------------------------------- loading and scoring


def test_loads_by_path_and_scores(backend: HFBackend) -> None:
    images = _images(backend)
    scores = backend.score_yes_no(images, [QUESTIONS[0]] * len(images))
    assert all(isinstance(s, YesNoScore) and s.source == "logits" for s in scores)
    p = [s.p_yes for s in scores]  # type: ignore[union-attr]
    assert all(0.0 < x < 1.0 for x in p)
    assert max(p) - min(p) > 1e-3, "P(Yes) does not depend on the image"
    other = backend.score_yes_no(images[:1], [QUESTIONS[2]])[0]
    assert abs(other.p_yes - p[0]) > 1e-4, "P(Yes) does not depend on the question"  # type: ignore[union-attr]

    choices = backend.choose(images, "How dressed is the person?", OPTIONS4)
    for c in choices:
        assert isinstance(c, Choice) and len(c.probs) == 4
        assert sum(c.probs) == pytest.approx(1.0, abs=1e-6)
        assert all(0.0 < x < 1.0 for x in c.probs)

    texts = backend.generate(images[:2], [[{"role": "user", "content": "Describe the image."}]] * 2, max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert backend.model_id == str(Path(backend.model_id))


def test_qwen2vl_processor_loads_without_torchvision(qwen: HFBackend, tiny_qwen2vl_path: Path) -> None:
    import importlib.util

    from transformers import AutoProcessor

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the stock processor loads")
    # transformers 5.x: OSError (no video processor config); older releases said ImportError
    with pytest.raises((OSError, ImportError)):
        AutoProcessor.from_pretrained(tiny_qwen2vl_path)
    assert qwen.processor_fallback
    assert type(qwen.processor).__name__ == "Qwen2VLProcessor"
    assert not hasattr(qwen.processor, "video_processor")


def test_explicit_processor_class(tiny_qwen2vl_path: Path, qwen: HFBackend) -> None:
    from transformers import Qwen2VLProcessor

    from icm.moderation.backends.hf import image_only_processor_class

    b = HFBackend(model=str(tiny_qwen2vl_path), processor_class=image_only_processor_class(Qwen2VLProcessor), min_label_mass=0.0)
    assert not b.processor_fallback
    image = _images(b, 1)
    assert b.score_yes_no(image, [QUESTIONS[0]])[0].p_yes == pytest.approx(  # type: ignore[union-attr]
        qwen.score_yes_no(image, [QUESTIONS[0]])[0].p_yes, abs=TOL  # type: ignore[union-attr]
    )
    by_name = HFBackend(model=str(tiny_qwen2vl_path), processor_class="Qwen2VLProcessor", min_label_mass=0.0)
    assert type(by_name.processor).__name__ == "Qwen2VLProcessor"
    assert by_name.score_yes_no(image, [QUESTIONS[0]])[0].p_yes == pytest.approx(  # type: ignore[union-attr]
        qwen.score_yes_no(image, [QUESTIONS[0]])[0].p_yes, abs=TOL  # type: ignore[union-attr]
    )


def test_bad_arguments(tiny_llava_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        HFBackend(model=str(tiny_llava_path), dtype="int3")
    with pytest.raises(ValueError, match="batch_size"):
        HFBackend(model=str(tiny_llava_path), batch_size=0)


# --------------------------------------------------------------------------- agreement


def _reference_p_yes(backend: HFBackend, image, question: str) -> float:
    """P(Yes) from a plain forward of the processor's encoding, computed without the backend.

    Yes/No ids: every spelling in {Yes, " Yes", yes, " yes"} that is one token. The prompt
    is the template's generation prompt and the whitespace the template puts before replies
    where the tokenizer spells it as a token of its own (reply_lead of Yes/No: none on the tiny LLaVA).
    """
    processor, model = backend.processor, backend.model
    tok = processor.tokenizer
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": yes_no_prompt(question)}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text += reply_lead(processor, ("Yes", "No"))  # the lead of the answers the question offers
    template_wrote_bos = tok.bos_token is not None and text.startswith(tok.bos_token)
    inputs = processor(images=[image], text=[text], return_tensors="pt", add_special_tokens=not template_wrote_bos)
    if tok.bos_token_id is not None:  # exactly one BOS, from the template or the tokenizer
        assert inputs["input_ids"][0, 0] == tok.bos_token_id != inputs["input_ids"][0, 1]
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()

    def ids(variants: tuple[str, ...]) -> list[int]:
        encoded = [tok.encode(v, add_special_tokens=False) for v in variants]
        return sorted({e[0] for e in encoded if len(e) == 1})

    yes = torch.logsumexp(logits[ids(("Yes", " Yes", "yes", " yes"))], 0)
    no = torch.logsumexp(logits[ids(("No", " No", "no", " no"))], 0)
    return float(torch.sigmoid(yes - no))


def test_scores_match_a_plain_forward(backend: HFBackend) -> None:
    images = _images(backend)
    got = backend.score_yes_no(images, QUESTIONS)
    for image, question, score in zip(images, QUESTIONS, got, strict=True):
        assert score.p_yes == pytest.approx(_reference_p_yes(backend, image, question), abs=TOL)  # type: ignore[union-attr]


def test_batched_equals_unbatched(backend: HFBackend) -> None:
    images = _images(backend)
    batched = backend.score_yes_no(images, QUESTIONS)  # prompts of different lengths: padding
    single = [backend.score_yes_no([im], [q])[0] for im, q in zip(images, QUESTIONS, strict=True)]
    for b, s in zip(batched, single, strict=True):
        assert b.p_yes == pytest.approx(s.p_yes, abs=TOL)  # type: ignore[union-attr]

    batched_c = backend.choose(images, "What is shown?", OPTIONS4)
    single_c = [backend.choose([im], "What is shown?", OPTIONS4)[0] for im in images]
    for b, s in zip(batched_c, single_c, strict=True):
        assert b.probs == pytest.approx(s.probs, abs=TOL)  # type: ignore[union-attr]

    old = backend.batch_size
    backend.batch_size = 3  # chunks of 3 images: 3 + 1
    try:
        chunked = backend.score_yes_no(images, QUESTIONS)
    finally:
        backend.batch_size = old
    assert [c.p_yes for c in chunked] == pytest.approx([b.p_yes for b in batched], abs=TOL)  # type: ignore[union-attr]


def _queries() -> list[Query]:
    return [
        Query("term:sexy", "yes_no", QUESTIONS[0], term="sexy"),
        Query("attr:exposure", "choice", "How much of the body is exposed?", OPTIONS4, attribute="exposure"),
        Query("attr:place", "choice", "Where is the photo taken?", OPTIONS3, attribute="place"),
        Query("term:violent", "yes_no", QUESTIONS[2], term="violent"),
    ]


def test_ask_equals_separate_calls_and_uncached_path(backend: HFBackend) -> None:
    images = _images(backend)
    queries = _queries()
    asked = backend.ask(images, queries)
    assert [set(a) for a in asked] == [{q.key for q in queries}] * len(images)

    backend.prefix_cache = False
    try:
        uncached = backend.ask(images, queries)
    finally:
        backend.prefix_cache = True

    for q in queries:
        if q.kind == "yes_no":
            separate = [s.p_yes for s in backend.score_yes_no(images, [q.question] * len(images))]  # type: ignore[union-attr]
            got = [a[q.key].p_yes for a in asked]  # type: ignore[union-attr]
            plain = [u[q.key].p_yes for u in uncached]  # type: ignore[union-attr]
        else:
            assert all(len(a[q.key].probs) == len(q.options) for a in asked)  # type: ignore[union-attr]
            separate = [x for c in backend.choose(images, q.question, q.options) for x in c.probs]  # type: ignore[union-attr]
            got = [x for a in asked for x in a[q.key].probs]  # type: ignore[union-attr]
            plain = [x for u in uncached for x in u[q.key].probs]  # type: ignore[union-attr]
        assert got == pytest.approx(separate, abs=TOL), q.key
        assert got == pytest.approx(plain, abs=TOL), q.key


def test_prefix_split_inside_merged_tokens(tiny_llava_path: Path) -> None:
    """A template whose text after the image merges with the question ("<image> Is"):
    the cached prefix must stop before the merged token and still score the exact prompt."""
    from tiny_models import LLAVA_CHAT_TEMPLATE

    b = HFBackend(model=str(tiny_llava_path), device="cpu", min_label_mass=0.0)
    b.processor.chat_template = LLAVA_CHAT_TEMPLATE.replace("<image>\n", "<image> ")
    images = _images(b)
    queries = [  # questions whose first word merges with the space before it ("\u0120the")
        Query("term:sexy", "yes_no", "the image: is it sexy?"),
        Query("attr:exposure", "choice", "the body: how much is exposed?", OPTIONS4),
    ]
    plan = b._plan([b._render_user(yes_no_prompt(queries[0].question))])
    assert plan is not None and plan.cut == 1  # the trailing space is re-tokenised with the question
    cached = b.ask(images, queries)
    b.prefix_cache = False
    plain = b.ask(images, queries)
    for c, p in zip(cached, plain, strict=True):
        assert c["term:sexy"].p_yes == pytest.approx(p["term:sexy"].p_yes, abs=TOL)  # type: ignore[union-attr]
        assert c["attr:exposure"].probs == pytest.approx(p["attr:exposure"].probs, abs=TOL)  # type: ignore[union-attr]
    reference = _reference_p_yes(b, images[0], queries[0].question)
    assert cached[0]["term:sexy"].p_yes == pytest.approx(reference, abs=TOL)  # type: ignore[union-attr]


def test_ask_encodes_each_image_once(llava: HFBackend) -> None:
    """One image + several questions: the vision tower sees the image once, not per question."""
    seen: list[int] = []

    def count(module, args, kwargs):
        pixels = args[0] if args else kwargs["pixel_values"]
        seen.append(int(pixels.shape[0]))

    handle = llava.model.model.vision_tower.register_forward_pre_hook(count, with_kwargs=True)
    try:
        images = _images(llava, 3)
        llava.ask(images, _queries())
        assert sum(seen) == len(images)
        seen.clear()
        llava.prefix_cache = False
        llava.ask(images, _queries())
        assert sum(seen) == len(images) * len(_queries())
    finally:
        llava.prefix_cache = True
        handle.remove()


def test_same_image_object_shares_its_prefix(llava: HFBackend) -> None:
    image = _images(llava, 1)[0]
    together = llava.score_yes_no([image] * len(QUESTIONS), QUESTIONS)
    copies = llava.score_yes_no([image.copy() for _ in QUESTIONS], QUESTIONS)
    assert [t.p_yes for t in together] == pytest.approx([c.p_yes for c in copies], abs=TOL)  # type: ignore[union-attr]


def test_generate_is_greedy_and_batch_independent(backend: HFBackend) -> None:
    images = _images(backend, 3)
    conversations = [
        [{"role": "user", "content": "Describe the image."}],
        [{"role": "system", "content": "You are a content moderator."}, {"role": "user", "content": "Is it safe?"}],
        [
            {"role": "user", "content": "Is the image sexy?"},
            {"role": "assistant", "content": "No."},
            {"role": "user", "content": "Why not? Explain in detail."},
        ],
    ]
    batched = backend.generate(images, conversations, max_new_tokens=6)
    single = [backend.generate([im], [conv], max_new_tokens=6)[0] for im, conv in zip(images, conversations, strict=True)]
    assert batched == single
    assert backend.generate(images, conversations, max_new_tokens=6) == batched


# --------------------------------------------------------------------------- LoRA adapter


@pytest.fixture(scope="module")
def tuned(tiny_llava_path: Path, color_adapter_path: Path) -> HFBackend:
    return HFBackend(model=str(tiny_llava_path), adapter=str(color_adapter_path), device="cpu")


# The fixture trains until every question about these squares (never trained on) is answered
# with probability > COLOR_P_CORRECT (~0.94; tiny_models says why): the thresholds below are
# that guarantee, on any CPU and under any ICM_TEST_SEED, not what one run happened to give.
YES, NO = COLOR_P_CORRECT, 1 - COLOR_P_CORRECT


def _squares(color: str, n: int = 6) -> list:
    return held_out_squares(color, n)


def test_adapter_scores_follow_image_and_question(tuned: HFBackend, llava: HFBackend, color_adapter_path: Path) -> None:
    red, blue = _squares("red"), _squares("blue")
    n = len(red)
    for asked in ("red", "blue"):
        p = [s.p_yes for s in tuned.score_yes_no(red + blue, [COLOR_QUESTIONS[asked]] * 2 * n)]  # type: ignore[union-attr]
        matching, not_matching = (p[:n], p[n:]) if asked == "red" else (p[n:], p[:n])
        assert min(matching) > YES, (asked, p)
        assert max(not_matching) < NO, (asked, p)
        assert min(matching) - max(not_matching) > 2 * COLOR_P_CORRECT - 1, (asked, p)
    # the base model cannot tell them apart: the scores come from the adapter (the base is
    # built untrained with a fixed seed, so this does not vary with ICM_TEST_SEED; its P(Yes)
    # is near-constant across images, far from a gap of 0.5)
    base = [s.p_yes for s in llava.score_yes_no(red + blue, [COLOR_QUESTIONS["red"]] * 2 * n)]  # type: ignore[union-attr]
    assert abs(sum(base[:n]) - sum(base[n:])) / n < 0.5
    assert str(color_adapter_path) in tuned.model_id


def test_adapter_ask_flips_with_the_question(tuned: HFBackend) -> None:
    queries = [
        Query("red", "yes_no", COLOR_QUESTIONS["red"]),
        Query("blue", "yes_no", COLOR_QUESTIONS["blue"]),
    ]
    images = _squares("red", 3) + _squares("blue", 3)
    answers = tuned.ask(images, queries)
    for i, a in enumerate(answers):
        is_red = i < 3
        red, blue = a["red"].p_yes, a["blue"].p_yes  # type: ignore[union-attr]
        assert (red > YES and blue < NO) if is_red else (red < NO and blue > YES), (i, red, blue)


def test_adapter_generate_answers_from_the_image(tuned: HFBackend) -> None:
    images = _squares("red", 2) + _squares("blue", 2)
    ask = [[{"role": "user", "content": yes_no_prompt(COLOR_QUESTIONS["red"])}]] * 4
    # greedy: the trained answer's probability > COLOR_P_CORRECT > 0.5 makes it the top token
    words = [t[:3] for t in tuned.generate(images, ask, max_new_tokens=1)]
    assert [w.startswith("Yes") for w in words] == [True, True, False, False], words
    assert all(w.startswith(("Yes", "No")) for w in words)


def test_unmerged_adapter_scores_the_same(tiny_llava_path: Path, color_adapter_path: Path, tuned: HFBackend) -> None:
    """The adapter kept as a peft wrapper (not merged) scores like the merged one, padding included."""
    unmerged = HFBackend(model=str(tiny_llava_path), adapter=str(color_adapter_path), merge_adapter=False, min_label_mass=0.0)
    images = _squares("red", 2) + _squares("blue", 2)
    queries = [
        Query("red", "yes_no", COLOR_QUESTIONS["red"]),
        Query("long", "yes_no", "Is the image red? Look carefully at the colours of the square."),
        Query("pick", "choice", "What colour is the square?", ("red", "blue", "green")),
    ]
    tuned.min_label_mass = 0.0  # "pick" was never trained: compare the raw scores
    try:
        a, b = unmerged.ask(images, queries), tuned.ask(images, queries)
    finally:
        tuned.min_label_mass = 0.5
    for x, y in zip(a, b, strict=True):
        assert x["red"].p_yes == pytest.approx(y["red"].p_yes, abs=1e-4)  # type: ignore[union-attr]
        assert x["long"].p_yes == pytest.approx(y["long"].p_yes, abs=1e-4)  # type: ignore[union-attr]
        assert x["pick"].probs == pytest.approx(y["pick"].probs, abs=1e-4)  # type: ignore[union-attr]


# --------------------------------------------------------------------------- answer tokens


def _bpe(merges: list[tuple[str, str]]):
    """A byte-level BPE with exactly the given merges (so we control what is one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _ids(tok, *pieces: str) -> list[int]:
    return [tok.convert_tokens_to_ids(p) for p in pieces]


def test_yes_is_one_token_with_and_without_space() -> None:
    tok = _bpe([("Y", "e"), ("Ye", "s"), ("\u0120", "Yes"), ("N", "o"), ("\u0120", "No")])
    assert sorted(resolve_answer_token_ids(tok, "Yes")) == sorted(_ids(tok, "Yes", "\u0120Yes"))
    assert sorted(resolve_answer_token_ids(tok, "No")) == sorted(_ids(tok, "No", "\u0120No"))


def test_yes_is_one_token_only_after_a_space() -> None:
    tok = _bpe([("\u0120", "Y"), ("\u0120Y", "e"), ("\u0120Ye", "s")])
    assert len(tok.encode("Yes", add_special_tokens=False)) == 3
    assert resolve_answer_token_ids(tok, "Yes") == _ids(tok, "\u0120Yes")


def test_yes_is_one_token_only_without_a_space() -> None:
    tok = _bpe([("Y", "e"), ("Ye", "s")])
    assert len(tok.encode(" Yes", add_special_tokens=False)) == 2
    assert resolve_answer_token_ids(tok, "Yes") == _ids(tok, "Yes")


def test_lower_case_yes_counts() -> None:
    tok = _bpe([("y", "e"), ("ye", "s")])
    assert resolve_answer_token_ids(tok, "Yes") == _ids(tok, "yes")


def test_no_single_token_yes_is_an_error() -> None:
    tok = _bpe([("N", "o")])
    with pytest.raises(ValueError, match="single-token spelling of 'Yes'"):
        resolve_answer_token_ids(tok, "Yes")
    assert resolve_answer_token_ids(tok, "No") == _ids(tok, "No")


def test_unknown_token_does_not_count() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    assert fast.encode("Yes", add_special_tokens=False) == [0]  # one token, but the unknown one
    with pytest.raises(ValueError):
        resolve_answer_token_ids(fast, "Yes")


def test_sentencepiece_style_pieces() -> None:
    """Metaspace tokenizers encode "Yes" as "\u2581Yes"; the bare "Yes" piece counts too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("\u2581YesNo"))
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [("Y", "e"), ("Ye", "s"), ("\u2581", "Yes")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert fast.convert_ids_to_tokens(fast.encode("Yes", add_special_tokens=False)) == ["\u2581Yes"]
    assert sorted(resolve_answer_token_ids(fast, "Yes")) == sorted(_ids(fast, "\u2581Yes", "Yes"))


def test_option_letters() -> None:
    tok = _bpe([("\u0120", "B")])
    assert resolve_answer_token_ids(tok, "A") == _ids(tok, "A")
    assert sorted(resolve_answer_token_ids(tok, "B")) == sorted(_ids(tok, "B", "\u0120B"))


def test_grouped_probs_is_softmax_over_logsumexp() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, generator=gen) * 3
    probs, scores = grouped_probs(logits, [[1, 3], [2], [5, 6, 7]])
    e = logits.exp()
    mass = torch.stack([e[:, 1] + e[:, 3], e[:, 2], e[:, 5] + e[:, 6] + e[:, 7]], dim=-1)
    assert torch.allclose(probs, mass / mass.sum(-1, keepdim=True), atol=1e-6)
    again, _ = grouped_probs(torch.log_softmax(logits, -1), [[1, 3], [2], [5, 6, 7]])
    assert torch.allclose(again, probs, atol=1e-6)
    assert scores.shape == (3, 3)


def test_backend_uses_every_single_token_spelling(llava: HFBackend) -> None:
    tok = llava.tokenizer
    assert len(tok.encode("Yes", add_special_tokens=False)) == 1
    assert len(tok.encode(" Yes", add_special_tokens=False)) == 1
    image = _images(llava, 1)[0]
    prompt = moderation_choice_prompt("What is it?", OPTIONS3)
    # the choice protocol over the option labels agrees with a plain forward too
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = llava.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text += reply_lead(llava.processor, option_labels(3))  # the space before B, C, D is prompt (icm.prompting)
    inputs = llava.processor(images=[image], text=[text], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = llava.model(**inputs).logits[0, -1]
    groups = [sorted({tok.encode(v, add_special_tokens=False)[0] for v in (c, " " + c)
                      if len(tok.encode(v, add_special_tokens=False)) == 1}) for c in option_labels(3)]
    expected = torch.softmax(torch.stack([torch.logsumexp(logits[g], 0) for g in groups]), 0)
    got = llava.choose([image], "What is it?", OPTIONS3)[0]
    assert got.probs == pytest.approx(expected.tolist(), abs=TOL)  # type: ignore[union-attr]


# --------------------------------------------------------------------------- label mass: not judged


def test_untrained_model_whose_first_token_is_not_a_label_is_not_judged(tiny_llava_path: Path) -> None:
    """The random tiny LLaVA would say anything but Yes/No or a label: with the default
    minimum label mass nothing it says is read as an answer, and the note says why."""
    strict = HFBackend(model=str(tiny_llava_path), device="cpu")
    assert strict.min_label_mass == 0.5
    images = _images(strict, 2)
    answers = strict.ask(images, _queries())
    for a in answers:
        for key, ans in a.items():
            assert isinstance(ans, NotJudged), (key, ans)
            assert ans.reason in ("off-format", "refused")
            assert "< 0.5" in ans.detail and ans.raw["top_token"] is not None
    # the same model with the check off gives numbers: the check is what refuses them
    assert isinstance(strict.score_yes_no(images[:1], [QUESTIONS[0]])[0], NotJudged)
    strict.min_label_mass = 0.0
    assert isinstance(strict.score_yes_no(images[:1], [QUESTIONS[0]])[0], YesNoScore)


def test_tuned_adapter_answers_are_judged_and_the_base_model_is_not(tiny_llava_path: Path, tuned: HFBackend) -> None:
    from tiny_models import HUE_OPTIONS, HUE_QUESTION

    images = _squares("red", 2) + _squares("blue", 2)
    queries = [Query("term:red", "yes_no", COLOR_QUESTIONS["red"]), Query("attr:hue", "choice", HUE_QUESTION, HUE_OPTIONS)]
    for i, a in enumerate(tuned.ask(images, queries)):
        term, hue = a["term:red"], a["attr:hue"]
        assert isinstance(term, YesNoScore) and term.raw["yes_no_mass"] >= 0.5
        assert isinstance(hue, Choice) and hue.raw["letter_mass"] >= 0.5
        # the trained answer's probability > COLOR_P_CORRECT > 0.5: its label mass is too
        assert (term.p_yes > YES if i < 2 else term.p_yes < NO), (i, term.p_yes)
        assert (hue.probs[0] > YES if i < 2 else hue.probs[1] > YES), (i, hue.probs)
    base = HFBackend(model=str(tiny_llava_path), device="cpu")
    assert all(isinstance(x, NotJudged) for a in base.ask(images, queries) for x in a.values())


def test_a_refusal_token_is_refused_and_a_label_token_is_an_answer(llava: HFBackend) -> None:
    """Next-token distributions built on the real tokenizer: "I" (of "I'm sorry") on top
    with Yes/No far below is a refusal, never the 0.12 a renormalised softmax would give."""
    tok = llava.tokenizer
    vocab = len(tok)
    old = llava.min_label_mass
    llava.min_label_mass = 0.5
    try:

        def dist(top: dict[str, float]) -> torch.Tensor:
            logits = torch.full((vocab,), -30.0)
            for piece, value in top.items():
                logits[tok.convert_tokens_to_ids(piece)] = value
            return torch.log_softmax(logits, -1)

        refused = llava._yes_no(dist({"I": 0.0, "No": -9.0, "Yes": -11.0}))
        assert isinstance(refused, NotJudged) and refused.reason == "refused" and refused.raw["top_token"] == "I"
        off = llava._yes_no(dist({"The": 0.0, "No": -9.0, "Yes": -11.0})) if "The" in tok.get_vocab() else None
        if off is not None:
            assert isinstance(off, NotJudged) and off.reason == "off-format"
        yes = llava._yes_no(dist({"Yes": 0.0, "No": -1.0, "I": -3.0}))
        assert isinstance(yes, YesNoScore) and yes.p_yes == pytest.approx(1 / (1 + torch.e ** -1), abs=1e-3)
        groups = llava._letters(3)
        # in a lettered question a bare "I" is the letter I (never offered), not "I'm sorry" (issue 19)
        letter_i = llava._choice(dist({"I": 0.0, "B": -5.0}), groups)
        assert isinstance(letter_i, NotJudged) and letter_i.reason == "off-format"
        assert letter_i.detail.startswith("label not offered")
        picked = llava._choice(dist({"C": 0.0, "B": -2.0}), groups)
        assert isinstance(picked, Choice) and max(range(3), key=picked.probs.__getitem__) == 1
    finally:
        llava.min_label_mass = old
