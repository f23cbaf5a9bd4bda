"""Benchmark: HFBackend.ask (shared image prefix + KV cache) against the naive per-question path.

A ~35M-parameter LLaVA (224 px CLIP, 8-layer Llama), built locally with tests/tiny_models.py
and loaded by path. Every image gets 1 term (yes/no) question and 4 attribute questions with
4 options each. The naive path is what the paper's evaluation scripts do: for every image and
every question, process the image, build the prompt and call ``model.generate`` for one token
with its scores. Both paths score the same prompts; the script checks that they agree.

    .venv/bin/python bench/scoring.py [--images 64] [--threads 2] [--batch-size 8] [--image-size 224]

Both paths are compute-bound on a CPU, so the speed-up is bounded by how much of a prompt
the image prefix is: with P prefix tokens (plus the vision tower) and suffixes S_1..S_5,
ask costs P + sum(S) where the naive path costs 5 P + sum(S).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import torch

from icm.moderation.backends.base import Query
from icm.moderation.backends.hf import HFBackend, grouped_probs
from icm.policy.prompts_format import moderation_choice_prompt as choice_prompt
from icm.policy.prompts_format import yes_no_prompt
from icm.prompting import offered_answers, reply_lead

import tiny_models

QUERIES = [
    Query("term:sexy", "yes_no", "Is the image sexy?", term="sexy"),
    Query(
        "attr:exposure",
        "choice",
        "How much of the person's body is exposed?",
        ("fully clothed", "swimwear or underwear", "partially nude", "fully nude"),
    ),
    Query(
        "attr:pose",
        "choice",
        "What is the person's pose?",
        ("standing or sitting normally", "suggestive pose", "explicit pose", "no person visible"),
    ),
    Query(
        "attr:context",
        "choice",
        "In what context is the image taken?",
        ("beach or pool", "private room", "public street", "studio"),
    ),
    Query(
        "attr:focus",
        "choice",
        "What is the focus of the image?",
        ("the face", "the whole body", "intimate body parts", "an object"),
    ),
]


def naive_scores(backend: HFBackend, images: list, queries: list[Query]) -> list[dict[str, list[float]]]:
    """One processor call + one ``model.generate`` (1 token, with scores) per question per image."""
    processor, model = backend.processor, backend.model
    yes_no = [backend._yes_ids, backend._no_ids]
    out = []
    for image in images:
        answers: dict[str, list[float]] = {}
        for q in queries:
            if q.kind == "yes_no":
                text, groups = yes_no_prompt(q.question), yes_no
            else:
                text, groups = choice_prompt(q.question, q.options), backend._letters(len(q.options))
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt += reply_lead(processor, offered_answers(text))  # the lead of the answers offered (icm.prompting)
            inputs = processor(images=[image], text=[prompt], return_tensors="pt", add_special_tokens=False)
            with torch.inference_mode():
                gen = model.generate(
                    **inputs,
                    max_new_tokens=1,
                    do_sample=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                    pad_token_id=processor.tokenizer.pad_token_id,
                )
            probs, _ = grouped_probs(torch.log_softmax(gen.scores[0].float(), dim=-1), groups)
            answers[q.key] = probs[0].tolist()
        out.append(answers)
    return out


def ask_scores(backend: HFBackend, images: list, queries: list[Query]) -> list[dict[str, list[float]]]:
    out = []
    for start in range(0, len(images), backend.batch_size):
        for answers in backend.ask(images[start : start + backend.batch_size], queries):
            out.append(
                {
                    k: ([a.p_yes, 1 - a.p_yes] if hasattr(a, "p_yes") else list(a.probs))  # type: ignore[union-attr]
                    for k, a in answers.items()
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--image-size", type=int, default=224, help="CLIP input size: 224 -> 256 image tokens, 336 -> 576 (LLaVA-1.5)"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_models.build_tiny_llava(
            Path(tmp) / "llava-35m",
            image_size=args.image_size,
            patch_size=14,
            vision_hidden=384,
            vision_layers=6,
            vision_heads=6,
            text_hidden=512,
            text_layers=8,
            text_heads=8,
            intermediate=1376,
            init_scale=1.0,
            # a vocabulary in which the prompts' words are whole tokens, as with a real
            # tokenizer (a 420-token BPE would make every question suffix ~2x too long)
            vocab_size=2000,
            tokenizer_texts=[choice_prompt(q.question, q.options) if q.options else yes_no_prompt(q.question) for q in QUERIES],
        )
        backend = HFBackend(model=str(path), batch_size=args.batch_size, device="cpu", dtype="float32", min_label_mass=0.0)  # untrained: raw scores
        n_params = tiny_models.count_parameters(backend.model)
        images = [tiny_models.noise_image(args.image_size, seed=i) for i in range(args.images)]
        texts = [
            backend._render_user(yes_no_prompt(q.question) if q.kind == "yes_no" else choice_prompt(q.question, q.options))
            for q in QUERIES
        ]
        lengths = [len(backend.processor(images=[images[0]], text=[t], add_special_tokens=False)["input_ids"][0]) for t in texts]
        plan = backend._plan(texts)
        assert plan is not None, "the prompts do not split at the image"
        prefix = len(backend.processor(images=[images[0]], text=[plan.prefix_text], add_special_tokens=False)["input_ids"][0])
        prefix -= plan.cut
        bound = sum(lengths) / (prefix + sum(n - prefix for n in lengths))

        print(f"model: tiny LLaVA, {n_params / 1e6:.1f}M parameters, {args.image_size} px CLIP "
            f"(patch 14, {(args.image_size // 14) ** 2} image tokens); "
            f"prompts of {lengths[0]} (yes/no) and {lengths[1]} (4 options) tokens, shared image prefix {prefix}")
        print(f"torch {torch.__version__}, threads: {torch.get_num_threads()} (set with torch.set_num_threads)")
        print(f"workload: {args.images} images x (1 yes/no + 4 four-option questions), batch_size={args.batch_size}")

        # warm up both paths (allocators, lazy inits)
        ask_scores(backend, images[:2], QUERIES)
        naive_scores(backend, images[:1], QUERIES)

        # Interleave the two paths batch by batch, so that a neighbour process slowing the
        # machine down slows both alike and the ratio stays meaningful.
        fast: list[dict[str, list[float]]] = []
        slow: list[dict[str, list[float]]] = []
        t_ask = t_naive = 0.0
        for start in range(0, len(images), args.batch_size):
            chunk = images[start : start + args.batch_size]
            t0 = time.perf_counter()
            fast += ask_scores(backend, chunk, QUERIES)
            t1 = time.perf_counter()
            slow += naive_scores(backend, chunk, QUERIES)
            t2 = time.perf_counter()
            t_ask += t1 - t0
            t_naive += t2 - t1

        diff = max(abs(a - b) for f, s in zip(fast, slow, strict=True) for k in f for a, b in zip(f[k], s[k], strict=True))
        n = len(images)
        print(f"naive (generate per question per image): {t_naive:7.2f} s  {n / t_naive:6.2f} images/s")
        print(f"ask   (shared prefix + KV cache, batched):  {t_ask:7.2f} s  {n / t_ask:6.2f} images/s")
        print(f"speed-up: {t_naive / t_ask:.1f}x   max |p_ask - p_naive| = {diff:.2e}")
        print(f"(language-model tokens, naive / ask: {bound:.1f}x; the vision tower runs 5x / 1x)")


if __name__ == "__main__":
    main()
