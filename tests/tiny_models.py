"""Tiny multimodal checkpoints for tests and benchmarks (no model hub).

The builders live in the package (:mod:`icm.training.tiny`, which ``icm demo e2e`` uses
too, so the recipe exists once); they are re-exported here for the tests and benches
that import ``tiny_models``. This module adds what only tests need: synthetic images and
a LoRA adapter trained in a fixture.

Every builder writes a directory with ``save_pretrained`` (model + processor + tokenizer +
chat template), so code under test loads it by path exactly as it would load a real
checkpoint. Randomly initialised, seeded, and small enough to build in about a second on
a 2-core CPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from icm.training.tiny import (  # noqa: F401 - re-exported for the tests and benches
    IDEFICS3_CHAT_TEMPLATE,
    LLAVA_CHAT_TEMPLATE,
    LLAVA_SPECIALS,
    QWEN_CHAT_TEMPLATE,
    QWEN_SPECIALS,
    build_tiny_idefics3,
    build_tiny_llava,
    build_tiny_qwen2vl,
    build_tokenizer,
    count_parameters,
    training_corpus,
)

# --------------------------------------------------------------------------- images


def square_image(color: str, *, size: int = 32, seed: int = 0) -> Image.Image:
    """A ``color`` square at a random place on a random greyish background."""
    rng = random.Random(f"{color}-{size}-{seed}")
    grey = rng.randint(90, 170)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    side = rng.randint(size // 2, size - 2)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    rgb = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 40)}[color]
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in rgb)
    ImageDraw.Draw(img).rectangle([x, y, x + side - 1, y + side - 1], fill=jitter)
    return img


def noise_image(size: int = 32, seed: int = 0, *, height: int | None = None) -> Image.Image:
    """Random RGB noise (``size`` wide, ``height`` or ``size`` high): distinct vision features."""
    rng = random.Random(seed)
    h = height or size
    return Image.frombytes("RGB", (size, h), rng.randbytes(size * h * 3))


# --------------------------------------------------------------------------- seeds


def test_seed() -> int:
    """The seed of every test fixture that trains (``ICM_TEST_SEED``, default 0).

    Tests on a trained outcome must pass under any seed: they assert what the training
    target guarantees, not what one seed happened to give on one CPU (issue 25). Run
    e.g. ``ICM_TEST_SEED=1 pytest tests/test_moderate_hf.py`` to check one.
    """
    return int(os.environ.get("ICM_TEST_SEED", "0"))


test_seed.__test__ = False  # a helper, not a test pytest should collect


# --------------------------------------------------------------------------- LoRA


COLOR_QUESTIONS = {"red": "Is the image red?", "blue": "Is the image blue?"}
# A moderation multiple-choice question the adapter also learns, worded exactly as the
# backends word it (moderation_choice_prompt): options Red, Blue -> labels B, C.
HUE_QUESTION = "Which colour is the square?"
HUE_OPTIONS = ("Red", "Blue")

# What the colour adapter is trained to, and what the tests on it may therefore assert.
# The fixture trains until the cross-entropy of the trained answer token is below
# COLOR_TARGET_CE on *every* question about *every* held-out square (held_out_squares:
# never trained on; the tests ask about exactly these). CE < t means P(correct token) >
# exp(-t) over the whole vocabulary, so P(correct answer) > exp(-t) once the backend
# renormalises over the answer labels too (the label mass is > exp(-t) > 0.5: judged).
# COLOR_SLACK covers what differs between the fixture's forward and the backend's (the
# merged adapter, batch composition): float noise, orders of magnitude below it.
COLOR_TARGET_CE = 0.05
COLOR_SLACK = 0.01
COLOR_P_CORRECT = math.exp(-COLOR_TARGET_CE) - COLOR_SLACK
"""Every held-out answer's probability is above this (~0.94): red P(Yes to "red?") and
blue P(Yes to "blue?") > it, the others < 1 - it, so red and blue are apart by > 2 * it - 1."""
COLOR_STEP_CAP = 2000
COLOR_CHUNK = 25
HELD_OUT_SEED = 10_000


def held_out_squares(color: str, n: int = 6) -> list[Image.Image]:
    """Squares the colour adapter never trains on; its stopping test is on these (32 px)."""
    return [square_image(color, seed=HELD_OUT_SEED + i) for i in range(n)]


class AdapterNotTrained(AssertionError):
    """The colour adapter reached its step cap before its target loss."""


def train_color_adapter(
    model_path: str | Path,
    adapter_path: str | Path,
    *,
    target_ce: float = COLOR_TARGET_CE,
    max_steps: int = COLOR_STEP_CAP,
    chunk: int = COLOR_CHUNK,
    batch_size: int = 8,
    pool: int = 48,
    held_out: int = 6,
    lr: float = 2e-3,
    seed: int | None = None,
) -> Path:
    """LoRA-train a tiny LLaVA to answer "Is the image red/blue?" and :data:`HUE_QUESTION`.

    Plain torch + peft on the tokens of the training collator (:class:`ChatCollator`, as
    ``icm train`` encodes examples). Each example is a red or blue square and one of the
    three questions, answered "Yes"/"No" or with the option label ("B" red, "C" blue) of
    the hue question, so the answer depends on both the image and the wording. The
    examples are the conversations training builds
    (:func:`icm.prompting.training_conversation`); the loss is on the collator's first
    trained token after its prompt tokens, so what is trained is what the backend scores
    (the whitespace before replies that is prompt included: :func:`icm.prompting.reply_lead`).
    Only that token is trained (left-padded prompts, last position, position ids that
    skip the padding as the backend's do): trained on the whole reply (end-of-turn tokens
    too, right-padded) the same run barely learned the yes/no questions. ``lm_head`` is in
    ``modules_to_save`` (on a random model LoRA alone barely moves the loss).

    Trains in chunks of ``chunk`` steps until the largest cross-entropy over every question
    about the ``held_out`` red and blue squares of :func:`held_out_squares` is below
    ``target_ce`` (see :data:`COLOR_P_CORRECT` for what that guarantees), and raises
    :class:`AdapterNotTrained`, naming the loss reached, if ``max_steps`` comes first: the
    float kernels differ between CPUs, so a fixed step count trains a different adapter on
    each. What the run took is written to ``ADAPTER/color_training.json``.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from icm.prompting import (
        moderation_choice_prompt,
        option_answer,
        training_conversation,
        yes_no_answer,
        yes_no_prompt,
    )
    from icm.training.collator import IGNORE_INDEX, ChatCollator

    seed = test_seed() if seed is None else seed
    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor = AutoProcessor.from_pretrained(model_path)
    collator = ChatCollator(processor)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "fc2", "linear_1", "linear_2"],
        modules_to_save=["lm_head"],
        lora_dropout=0.0,
    )
    with warnings.catch_warnings():  # peft calls a deprecated transformers alias
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lora)
    model.train()

    def examples_of(image: Image.Image, color: str) -> list[dict]:
        out = []
        for asked in ("red", "blue"):
            messages = training_conversation(yes_no_prompt(COLOR_QUESTIONS[asked]), yes_no_answer(color == asked))
            out.append({"messages": messages, "images": [image]})
        hue = option_answer(len(HUE_OPTIONS), 0 if color == "red" else 1)
        out.append({"messages": training_conversation(moderation_choice_prompt(HUE_QUESTION, HUE_OPTIONS), hue),
                    "images": [image]})
        return out

    def tensors(examples: list[dict]) -> tuple[dict, torch.Tensor]:
        # Each example's tokens come from the training collator: the prompt up to its first
        # trained token, and that token (the answer the backend reads there). Prompts are
        # left-padded so the answer is predicted at the last position, as the backend reads it.
        prompts, targets, pixels = [], [], []
        for example in examples:
            enc = collator.encode(example)
            first = next(k for k, label in enumerate(enc["labels"]) if label != IGNORE_INDEX)
            prompts.append(enc["input_ids"][:first])
            targets.append(enc["labels"][first])
            pixels.append(enc["visual"]["pixel_values"])
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), collator.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        data = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "pixel_values": torch.cat(pixels)}
        return data, torch.tensor(targets)

    # Collate a fixed pool of examples once (the processor dominates otherwise), then
    # train on random minibatches of it.
    size = processor.image_processor.crop_size["height"]
    examples = []
    for i in range(pool):
        color = ("red", "blue")[i % 2]
        examples += examples_of(square_image(color, size=size, seed=rng.randrange(10**9)), color)
    data, labels = tensors(examples)
    check, check_labels = tensors([ex for color in ("red", "blue") for image in held_out_squares(color, held_out)
                                   for ex in examples_of(image, color)])

    def held_out_ce() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            logits = model(**check).logits[:, -1, :]
        model.train()
        return torch.nn.functional.cross_entropy(logits, check_labels, reduction="none")

    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    steps, ce = 0, held_out_ce()
    while float(ce.max()) >= target_ce:
        if steps >= max_steps:
            raise AdapterNotTrained(
                f"colour adapter (seed {seed}): {steps} steps reached the cap before the target; held-out "
                f"cross-entropy max {float(ce.max()):.4f} (mean {float(ce.mean()):.4f}), target < {target_ce}")
        for _ in range(min(chunk, max_steps - steps)):
            idx = torch.randint(0, len(labels), (batch_size,), generator=generator)
            logits = model(**{k: v[idx] for k, v in data.items()}).logits[:, -1, :]
            loss = torch.nn.functional.cross_entropy(logits, labels[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
            steps += 1
        ce = held_out_ce()
    model.save_pretrained(adapter_path)
    p = (-ce).exp()
    n = len(p) // 2  # red examples first: [red?, blue?, hue] per image
    report = {"seed": seed, "steps": steps, "target_ce": target_ce, "held_out_ce_max": float(ce.max()),
              "held_out_ce_mean": float(ce.mean()), "min_p_correct": float(p.min()), "threads": torch.get_num_threads(),
              "deterministic": torch.are_deterministic_algorithms_enabled(),
              "red_p_yes_at_least": float(p[:n:3].min()), "blue_p_yes_at_most": float(1 - p[n::3].min())}
    (Path(adapter_path) / "color_training.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return Path(adapter_path)


@contextmanager
def scored_texts(backend: Any) -> Iterator[list[str]]:
    """The user texts an HFBackend scores while the block runs, captured at its forward-pass entry point."""
    seen: list[str] = []
    real = backend._last_logprobs

    def spy(images: Any, items: Any) -> Any:
        seen.extend(text for _, text in items)
        return real(images, items)

    backend._last_logprobs = spy
    try:
        yield seen
    finally:
        del backend._last_logprobs
