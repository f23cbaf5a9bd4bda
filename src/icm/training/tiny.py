"""Tiny multimodal checkpoints built locally: no model hub, a tokenizer trained here.

For demos and benchmarks on a CPU (``icm demo e2e``) and for the test suite: every
builder writes a directory with ``save_pretrained`` (model + processor + tokenizer + chat
template), so code loads it by path exactly as it loads a real checkpoint. Randomly
initialised, seeded, and small enough to build in about a second on a 2-core CPU.

The tokenizer is a byte-level BPE trained in a second with ``tokenizers`` on a few hundred
moderation-flavoured sentences plus any ``tokenizer_texts`` (e.g. a task's prompts, so
they take about as many tokens as with a real tokenizer); "Yes", "No" and the letters
A-D are single tokens (checked), as next-token scoring needs.

Shapes follow /work/shared/NOTES-cpu-models.md: a 32 px CLIP with 8 px patches gives 16
image tokens for LLaVA; Qwen2-VL's ``mrope_section`` must sum to head_dim / 2.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Chat templates close to the real ones: the image sits in the first user turn.
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}\n"
    "{% else %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAVA_SPECIALS = ("<pad>", "<s>", "</s>", "<image>")
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_SUBJECTS = ["the image", "this photo", "the picture", "a person", "the square", "the background", "the text"]
_ADJECTIVES = ["red", "blue", "green", "dark", "bright", "sexy", "violent", "safe", "large", "small", "nude"]


def training_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """A few hundred moderation-flavoured sentences: enough for a BPE with whole words."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        s, a = rng.choice(_SUBJECTS), rng.choice(_ADJECTIVES)
        out.append(f"Is {s} {a}?\nAnswer with Yes or No.")
        out.append(f"{rng.choice(['Yes', 'No'])}. {rng.choice(['Yes', 'No'])}, {s} is {a}.")
        out.append(
            f"What is {s}?\nA. {a}\nB. {rng.choice(_ADJECTIVES)}\nC. {s}\nD. none of these\n"
            "Answer with the option's letter from the given choices directly."
        )
    return out


def build_tokenizer(
    style: str = "llava", vocab_size: int = 420, seed: int = 0, extra_texts: Sequence[str] = ()
) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the given model family's specials.

    The LLaVA-style one adds BOS on a plain call and its chat template writes BOS too.
    ``extra_texts`` (with a larger ``vocab_size``) give those texts' words whole tokens, so
    prompts take about as many tokens as with a real tokenizer.

    "Yes", " Yes", "No", " No" and the letters A-D come out as single tokens (checked).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = LLAVA_SPECIALS if style == "llava" else QWEN_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*training_corpus(seed=seed), *(list(extra_texts) * 20)], trainer)
    if style == "llava":
        # Like Llama tokenizers, a plain call adds BOS; the chat template also writes it,
        # so whoever encodes a rendered prompt must not add it twice.
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            extra_special_tokens={"image_token": "<image>"},
        )
        fast.chat_template = LLAVA_CHAT_TEMPLATE
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        )
        fast.chat_template = QWEN_CHAT_TEMPLATE
    for word in ("Yes", " Yes", "No", " No", "A", "B", "C", "D"):
        ids = fast.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"tiny tokenizer: {word!r} is not a single token: {ids} (raise vocab_size)")
    return fast


def build_tiny_llava(
    path: str | Path,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 1,
    vision_heads: int = 2,
    text_hidden: int = 32,
    text_layers: int = 2,
    text_heads: int = 2,
    intermediate: int | None = None,
    init_scale: float = 10.0,
    vocab_size: int = 420,
    tokenizer_texts: Sequence[str] = (),
    vision_feature_layer: int = -1,
    seed: int = 0,
) -> Path:
    """Save a tiny LLaVA (CLIP vision tower + Llama) with its processor under ``path``.

    ``vision_feature_layer=-2`` feeds the language model the patch embeddings, before the
    vision tower's (random) transformer layer: with a randomly initialised tower that
    layer only scrambles where things are, and a model that is to *learn* a visual task
    in minutes on a CPU (``icm demo e2e``) learns it several times faster without it.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = Path(path)
    tokenizer = build_tokenizer("llava", vocab_size=vocab_size, seed=seed, extra_texts=tokenizer_texts)
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        projection_dim=vision_hidden,
        initializer_factor=init_scale,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=intermediate or text_hidden * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=2048,
        initializer_range=0.02 * init_scale,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_qwen2vl(
    path: str | Path,
    *,
    text_hidden: int = 32,
    text_layers: int = 2,
    vision_dim: int = 32,
    init_scale: float = 10.0,
    vocab_size: int = 420,
    tokenizer_texts: Sequence[str] = (),
    seed: int = 0,
) -> Path:
    """Save a tiny Qwen2-VL with a processor that looks like a real checkpoint's.

    The processor config names ``Qwen2VLProcessor``, as real checkpoints do; without
    torchvision, ``AutoProcessor`` cannot load it (its video processor needs torchvision),
    which is exactly the case the backend must handle.
    """
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from icm.moderation.backends.hf import image_only_processor_class

    path = Path(path)
    tokenizer = build_tokenizer("qwen", vocab_size=vocab_size, seed=seed, extra_texts=tokenizer_texts)
    heads = 2
    head_dim = text_hidden // heads
    quarter = head_dim // 2  # mrope_section sums to head_dim / 2
    section = [quarter - 2 * (quarter // 3), quarter // 3, quarter // 3]
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": text_hidden,
            "intermediate_size": text_hidden * 2,
            "num_hidden_layers": text_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 2048,
            "initializer_range": 0.02 * init_scale,
            "rope_parameters": {"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "embed_dim": vision_dim,
            "hidden_size": text_hidden,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": 0.02 * init_scale,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    processor_cls = image_only_processor_class(Qwen2VLProcessor)
    processor = processor_cls(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tiny_idefics3(
    path: str | Path,
    *,
    init_scale: float = 10.0,
    vocab_size: int = 420,
    tokenizer_texts: Sequence[str] = (),
    seed: int = 0,
) -> Path:
    """Save a tiny Idefics3 (SmolVLM's architecture): images larger than 32 px are split
    into tiles plus a global view, so prompts of different images differ in length."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    path = Path(path)
    tokenizer = build_tokenizer("llava", vocab_size=vocab_size, seed=seed, extra_texts=tokenizer_texts)
    tiles = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<fake_token_around_image>", "<end_of_utterance>", "<global-img>", *tiles]}
    )
    tokenizer.chat_template = IDEFICS3_CHAT_TEMPLATE
    std = 0.02 * init_scale
    config = Idefics3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "initializer_range": std,
        },
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            initializer_range=std,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS3_CHAT_TEMPLATE
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
