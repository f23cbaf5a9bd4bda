"""Hugging Face ``transformers`` backend: local multimodal checkpoints (and LoRA adapters).

Scoring follows the paper's protocol: the probability of an answer is the softmax over
the answers' next-token logits at the last prompt position ("Yes" vs "No", or the option
labels). Every answer may be spelled by several single tokens ("Yes", " Yes", "yes",
...); their probabilities are summed (logsumexp over the logits). The softmax is an
answer only when the labels hold at least ``min_label_mass`` of the next-token
probability (default 0.5): when the model would rather say something else ("I", "Sorry",
"The"), the question is :class:`~icm.moderation.backends.base.NotJudged`, ``refused``
when its most likely token starts a refusal, ``off-format`` otherwise.

The hot path is :meth:`HFBackend.ask`: every question about an image shares the prompt
up to and including the image tokens. That prefix is run once per image, its key/value
cache is expanded to one row per question, and all question suffixes are scored in one
batched forward. The token sequence scored is exactly the processor's tokenization of
the full prompt, so the cached path and a plain forward agree to float tolerance.

torch and transformers are imported lazily: ``import icm`` never needs them.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import inspect
import json
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image

from icm.moderation.backends.base import (
    DEFAULT_MIN_LABEL_MASS,
    REFUSAL_FIRST_WORDS,
    Answer,
    Backend,
    BackendConfigError,
    Choice,
    Message,
    NotJudged,
    Query,
    YesNoScore,
)
from icm.policy.prompts_format import moderation_choice_prompt, option_labels, yes_no_prompt

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'icm-assistant[hf]'"

YES_VARIANTS = ("Yes", " Yes", "yes", " yes")
NO_VARIANTS = ("No", " No", "no", " no")
# Vocabulary spellings of a word-initial token in SentencePiece / byte-level BPE vocabularies.
_PIECE_PREFIXES = ("", "\u2581", "\u0120")
_QUESTION_MARKER = "ICMQUESTIONMARKER"


def _require_hf() -> tuple[Any, Any]:
    """Import torch and transformers, or explain how to install them."""
    try:
        import torch
        import transformers
    except ImportError as err:  # pragma: no cover - exercised in a subprocess test
        raise _MissingPackage(
            f"the 'hf' backend needs torch and transformers ({err}); install them with: {INSTALL_HINT}"
        ) from err
    return torch, transformers


# --------------------------------------------------------------------------- answer tokens


def answer_variants(word: str) -> tuple[str, ...]:
    """Spellings of ``word`` a model may emit as its first answer token."""
    if word in ("Yes", "yes"):
        return YES_VARIANTS
    if word in ("No", "no"):
        return NO_VARIANTS
    if len(word) == 1:  # an option letter: "A" and " A"; never lower-case ("a" is a word)
        return (word, " " + word)
    return (word, " " + word, word.lower(), " " + word.lower())


def resolve_answer_token_ids(tokenizer: Any, word: str, variants: Sequence[str] | None = None) -> list[int]:
    """Token ids that spell ``word`` on their own, for next-token scoring.

    A variant counts when it encodes to exactly one token that decodes back to the word
    (ignoring case and surrounding space; an unknown token never counts). Vocabulary
    pieces spelled like the variants ("Yes", "\u2581Yes", "\u0120Yes") are added the same way,
    since e.g. a SentencePiece tokenizer can emit "Yes" after a newline although
    ``encode("Yes")`` gives "\u2581Yes". Raises ``ValueError`` when nothing qualifies.
    """
    variants = tuple(variants) if variants is not None else answer_variants(word)
    unk = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    wanted = {v.strip().lower() for v in variants}
    ids: list[int] = []

    def accept(token_id: int | None) -> None:
        if token_id is None or token_id == unk or token_id in special or token_id in ids:
            return
        if tokenizer.decode([token_id]).strip().lower() in wanted:
            ids.append(int(token_id))

    for variant in variants:
        encoded = tokenizer.encode(variant, add_special_tokens=False)
        if len(encoded) == 1:
            accept(encoded[0])
    vocab = tokenizer.get_vocab()
    for variant in variants:
        if variant.startswith(" "):
            continue
        for prefix in _PIECE_PREFIXES:
            accept(vocab.get(prefix + variant))
    if not ids:
        raise ValueError(
            f"no single-token spelling of {word!r} in this tokenizer (tried {list(variants)}): "
            "next-token scoring needs one; use a checkpoint whose tokenizer has it"
        )
    return ids


def grouped_probs(logprobs: "torch.Tensor", groups: Sequence[Sequence[int]]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Softmax over answers, each answer's logit being the logsumexp over its token ids.

    ``logprobs`` is ``(n, vocab)`` (log-softmax or raw logits: the result is the same);
    returns ``(probs, scores)``, both ``(n, len(groups))``.
    """
    import torch

    scores = torch.stack([torch.logsumexp(logprobs[:, list(g)], dim=-1) for g in groups], dim=-1)
    return torch.softmax(scores, dim=-1), scores


# --------------------------------------------------------------------------- processors


@functools.lru_cache(maxsize=None)
def image_only_processor_class(base: type) -> type:
    """``base`` restricted to its image processor and tokenizer.

    Qwen2-VL, Qwen2.5-VL, SmolVLM... processors also hold a video processor, which needs
    torchvision; without it they cannot even be loaded. The subclass keeps the stock name,
    so a processor it saves still names the real class.
    """
    attributes = [a for a in base.get_attributes() if a in ("image_processor", "tokenizer")]

    def get_attributes(cls: type) -> list[str]:
        return list(attributes)

    return type(base.__name__, (base,), {"get_attributes": classmethod(get_attributes), "__module__": base.__module__})


def _processor_class_name(model: str, **kwargs: Any) -> str | None:
    """The processor class a checkpoint names (processor/preprocessor/tokenizer config)."""
    from transformers.utils import cached_file

    for filename in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            resolved = cached_file(
                model,
                filename,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except Exception:  # noqa: BLE001 - a missing or unreadable file just means "look further"
            resolved = None
        if not resolved:
            continue
        with open(resolved, encoding="utf-8") as fh:
            name = json.load(fh).get("processor_class")
        if name:
            return str(name)
    try:
        from transformers import AutoConfig
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        config = AutoConfig.from_pretrained(model, **kwargs)
        name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
        return name if isinstance(name, str) else None
    except Exception:  # noqa: BLE001
        return None


def _import_class(spec: str | type) -> type:
    if isinstance(spec, type):
        return spec
    import transformers

    if "." not in spec:
        return getattr(transformers, spec)
    module, _, name = spec.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_processor(model: str, processor_class: str | type | None = None, **kwargs: Any) -> tuple[Any, bool]:
    """Load a checkpoint's processor; returns ``(processor, used_image_only_fallback)``.

    ``processor_class`` (a class, a transformers class name or a dotted path) bypasses
    ``AutoProcessor``. When loading fails, torchvision is missing and the checkpoint's
    processor has a video processor, its image-only subclass is loaded instead.
    """
    from transformers import AutoProcessor

    base: type | None = _import_class(processor_class) if processor_class is not None else None
    try:
        loader = base if base is not None else AutoProcessor
        return loader.from_pretrained(model, **kwargs), False
    except Exception as err:
        if importlib.util.find_spec("torchvision") is not None:
            raise
        name = base.__name__ if base is not None else _processor_class_name(model, **kwargs)
        if base is None and name:
            try:
                base = _import_class(name)
            except (AttributeError, ImportError):
                base = None
        if base is None or "video_processor" not in base.get_attributes():
            raise
        try:
            processor = image_only_processor_class(base).from_pretrained(model, **kwargs)
        except Exception as second:  # noqa: BLE001
            raise err from second
        logger.info("loaded %s without its video processor (torchvision is not installed)", name)
        return processor, True


# --------------------------------------------------------------------------- backend


@dataclass
class _PrefixPlan:
    """How prompts split into a shared (image) prefix and per-question suffixes."""

    prefix_text: str
    tail: list[int]  # prefix tokens after the last image token, as the processor must emit them
    cut: int  # tokens to drop from the end of the encoded prefix before caching it
    suffixes: dict[str, list[int]]  # rendered prompt -> suffix token ids


def hf_conversation(conversation: Sequence[Message]) -> list[dict[str, Any]]:
    """OpenAI-style text messages -> HF content parts, the image in the first user turn."""
    out: list[dict[str, Any]] = []
    image_placed = False
    for message in conversation:
        content = message.get("content", "")
        if isinstance(content, str):
            parts: list[dict[str, Any]] = [{"type": "text", "text": content}]
        else:
            parts = [p if p.get("type") != "input_text" else {"type": "text", "text": p["text"]} for p in content]
        if message.get("role") == "user" and not image_placed:
            parts = [{"type": "image"}, *parts]
            image_placed = True
        out.append({"role": message.get("role", "user"), "content": parts})
    if not image_placed:
        raise ValueError("a conversation about an image needs a user message")
    return out


class HFBackend(Backend):
    """A local ``transformers`` image-text-to-text model (LLaVA, Qwen2-VL, Idefics3, ...).

    ``batch_size`` is the number of images per forward pass; in :meth:`ask` every question
    about those images is scored in the same (suffix) pass. ``prefix_cache=False`` turns
    the shared-prefix cache off (one padded forward per batch of prompts instead).
    """

    name = "hf"
    capabilities = frozenset({"score_yes_no", "choose", "generate"})

    def __init__(
        self,
        *,
        model: str,
        adapter: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 8,
        processor_class: str | type | None = None,
        prefix_cache: bool = True,
        merge_adapter: bool = True,
        trust_remote_code: bool = False,
        min_label_mass: float = DEFAULT_MIN_LABEL_MASS,
    ) -> None:
        torch, transformers = _require_hf()
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not 0.0 <= min_label_mass <= 1.0:
            raise ValueError(f"min_label_mass must be between 0 and 1, got {min_label_mass}")
        self.min_label_mass = float(min_label_mass)
        self._model_path = str(model)
        self._adapter = str(adapter) if adapter else None
        self.batch_size = batch_size
        self.prefix_cache = prefix_cache
        self.device = _resolve_device(torch, device)
        self.dtype = _resolve_dtype(torch, dtype, self.device)
        load_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code} if trust_remote_code else {}

        self.processor, self.processor_fallback = load_processor(self._model_path, processor_class, **load_kwargs)
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError(f"the processor of {model!r} has no tokenizer")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

        if self.device != "cpu":  # load straight onto the accelerator (accelerate is in [hf])
            load_kwargs["device_map"] = self.device
        net = transformers.AutoModelForImageTextToText.from_pretrained(
            self._model_path, dtype=self.dtype, **load_kwargs
        )
        if self._adapter:
            try:
                from peft import PeftModel
            except ImportError as err:
                raise ImportError(
                    f"loading a LoRA adapter needs peft ({err}): pip install 'icm-assistant[train]' or pip install peft"
                ) from err
            with warnings.catch_warnings():  # peft calls a deprecated transformers alias
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                net = PeftModel.from_pretrained(net, self._adapter)
            if merge_adapter:
                net = net.merge_and_unload()
        self.model = net.to(self.device).eval()

        self._templater = self._find_templater()
        self._image_token_id = self._find_image_token_id()
        inner = getattr(self._base_model(), "model", None)
        self._mrope_module = inner if hasattr(inner, "get_rope_index") else None
        # the architecture's own forward (a peft wrapper's is just *args, **kwargs)
        forward_params = inspect.signature(self._base_model().forward).parameters
        self._logits_to_keep = "logits_to_keep" in forward_params
        self._accepts_positions = "position_ids" in forward_params
        self._yes_ids = resolve_answer_token_ids(self.tokenizer, "Yes")
        self._no_ids = resolve_answer_token_ids(self.tokenizer, "No")
        _check_disjoint([self._yes_ids, self._no_ids], ["Yes", "No"])
        self._letter_ids: dict[str, list[int]] = {}
        self._prefix_text: str | None | bool = False  # False: not computed yet
        self._render_cache: dict[str, str] = {}

    # ------------------------------------------------------------------ identity

    @property
    def model_id(self) -> str:
        return f"{self._model_path}+{self._adapter}" if self._adapter else self._model_path

    def _base_model(self) -> Any:
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    def _find_templater(self) -> Any:
        for owner in (self.processor, self.tokenizer):
            if getattr(owner, "chat_template", None):
                return owner
        raise ValueError(
            f"{self._model_path!r} has no chat template (neither its processor nor its tokenizer): "
            "the hf backend builds prompts with it"
        )

    def _find_image_token_id(self) -> int:
        token_id = getattr(self.processor, "image_token_id", None)
        if token_id is None:
            token = getattr(self.processor, "image_token", None) or getattr(self.tokenizer, "image_token", None)
            if token is not None:
                token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None:
            token_id = getattr(self.model.config, "image_token_id", None) or getattr(
                self.model.config, "image_token_index", None
            )
        if token_id is None:
            raise ValueError(f"cannot find the image token of {self._model_path!r}")
        return int(token_id)

    def _letters(self, n: int) -> list[list[int]]:
        """Token ids of each option label of an ``n``-option moderation question."""
        groups = []
        for label in option_labels(n):
            if label not in self._letter_ids:
                self._letter_ids[label] = resolve_answer_token_ids(self.tokenizer, label)
            groups.append(self._letter_ids[label])
        _check_disjoint(groups, option_labels(n))
        return groups

    # ------------------------------------------------------------------ prompts

    def _render(self, conversation: Sequence[Message]) -> str:
        return self._templater.apply_chat_template(
            hf_conversation(conversation), add_generation_prompt=True, tokenize=False
        )

    def _render_user(self, text: str) -> str:
        rendered = self._render_cache.get(text)
        if rendered is None:
            if len(self._render_cache) > 4096:
                self._render_cache.clear()
            rendered = self._render([{"role": "user", "content": text}])
            self._render_cache[text] = rendered
        return rendered

    def _add_special_tokens(self, text: str) -> bool:
        """Let the tokenizer add BOS only when the chat template did not (as transformers does)."""
        bos = self.tokenizer.bos_token
        return not (bos is not None and text.startswith(bos))

    def _encode(self, images: Sequence[Image.Image], texts: Sequence[str]) -> Any:
        enc = self.processor(
            images=[_rgb(im) for im in images],
            text=list(texts),
            padding=True,
            return_tensors="pt",
            add_special_tokens=self._add_special_tokens(texts[0]),
        )
        return enc.to(self.device)

    # ------------------------------------------------------------------ forward passes

    def _forward(self, inputs: dict[str, Any], *, cache: bool = False) -> Any:
        import torch

        kwargs = dict(inputs)
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if self._mrope_module is None and self._accepts_positions and "position_ids" not in kwargs:
            kwargs["position_ids"] = _positions(kwargs["attention_mask"])
        with torch.inference_mode():
            return self.model(**kwargs, use_cache=cache)

    def _last_logprobs(self, images: Sequence[Image.Image], items: Sequence[tuple[int, str]]) -> "torch.Tensor":
        """Log-probabilities of the next token for each ``(image index, user text)`` item."""
        import torch

        if not items:
            return torch.empty(0, 0)
        rendered = [self._render_user(text) for _, text in items]
        plan = self._plan(rendered) if self.prefix_cache else None
        if plan is not None:
            try:
                return self._cached_logprobs(images, items, rendered, plan)
            except _PrefixMismatch as why:
                logger.warning("shared-prefix cache disabled for %s: %s", self._model_path, why)
                self.prefix_cache = False
        out = []
        for start in range(0, len(items), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(items)))
            enc = self._encode([images[items[i][0]] for i in chunk], [rendered[i] for i in chunk])
            logits = self._forward(dict(enc)).logits[:, -1, :].float()
            out.append(torch.log_softmax(logits, dim=-1))
        return torch.cat(out)

    def _plan(self, rendered: Sequence[str]) -> _PrefixPlan | None:
        """Split prompts at the image; ``None`` when the chat template does not allow it."""
        if self._prefix_text is False:
            marked = self._render([{"role": "user", "content": _QUESTION_MARKER}])
            at = marked.find(_QUESTION_MARKER)
            self._prefix_text = marked[:at] if at > 0 else None
        prefix_text = self._prefix_text
        if not isinstance(prefix_text, str):
            return None
        tok = self.tokenizer
        prefix_ids = tok(prefix_text, add_special_tokens=False)["input_ids"]
        image_positions = [i for i, t in enumerate(prefix_ids) if t == self._image_token_id]
        if not image_positions:
            return None
        last_image = image_positions[-1]
        full: dict[str, list[int]] = {}
        cut = 0
        for text in set(rendered):
            if not text.startswith(prefix_text):
                return None
            ids = tok(text, add_special_tokens=False)["input_ids"]
            common = _common_prefix_len(prefix_ids, ids)
            cut = max(cut, len(prefix_ids) - common)
            full[text] = ids
        keep = len(prefix_ids) - cut
        if keep <= last_image or any(len(ids) <= keep for ids in full.values()):
            return None
        return _PrefixPlan(
            prefix_text=prefix_text,
            tail=prefix_ids[last_image + 1 :],
            cut=cut,
            suffixes={text: ids[keep:] for text, ids in full.items()},
        )

    def _cached_logprobs(
        self,
        images: Sequence[Image.Image],
        items: Sequence[tuple[int, str]],
        rendered: Sequence[str],
        plan: _PrefixPlan,
    ) -> "torch.Tensor":
        """Run each image's prefix once, then every question suffix against its cache."""
        import torch

        by_image: dict[int, list[int]] = {}
        for row, (image_index, _) in enumerate(items):
            by_image.setdefault(image_index, []).append(row)
        order = list(by_image)
        result: list[torch.Tensor | None] = [None] * len(items)
        pad_id = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            image_chunk = order[start : start + self.batch_size]
            enc = dict(self._encode([images[i] for i in image_chunk], [plan.prefix_text] * len(image_chunk)))
            ids = enc["input_ids"]
            if plan.tail and not torch.equal(
                ids[:, ids.shape[1] - len(plan.tail) :].cpu(), torch.tensor([plan.tail] * len(image_chunk))
            ):
                raise _PrefixMismatch("the processor's prefix does not end as the tokenizer's does")
            if plan.cut:
                seq_len = ids.shape[1]
                enc = {
                    k: (v[:, : seq_len - plan.cut] if _is_sequence_tensor(v, ids) else v) for k, v in enc.items()
                }
            mask = enc["attention_mask"]
            if self._mrope_module is not None:
                self._mrope_module.rope_deltas = None
            out = self._forward(enc, cache=True)
            cache = out.past_key_values
            prefix_len = mask.sum(dim=-1)
            deltas = getattr(self._mrope_module, "rope_deltas", None) if self._mrope_module is not None else None

            rows = [row for local, i in enumerate(image_chunk) for row in by_image[i]]
            owners = [local for local, i in enumerate(image_chunk) for _ in by_image[i]]
            suffixes = [plan.suffixes[rendered[row]] for row in rows]
            # Rows of similar length go together: a short yes/no suffix padded to a long
            # multiple-choice one would cost as much as the long one.
            for group in _length_groups([len(x) for x in suffixes]):
                owner = torch.tensor([owners[g] for g in group], device=mask.device)
                group_suffixes = [suffixes[g] for g in group]
                width = max(len(x) for x in group_suffixes)
                suffix_ids = torch.full((len(group), width), pad_id, dtype=ids.dtype)
                suffix_mask = torch.zeros((len(group), width), dtype=mask.dtype)
                for r, x in enumerate(group_suffixes):  # left padding: the last position is real
                    suffix_ids[r, width - len(x) :] = torch.tensor(x, dtype=ids.dtype)
                    suffix_mask[r, width - len(x) :] = 1
                suffix_ids, suffix_mask = suffix_ids.to(mask.device), suffix_mask.to(mask.device)
                positions = prefix_len[owner, None] + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
                step: dict[str, Any] = {
                    "input_ids": suffix_ids,
                    "attention_mask": torch.cat([mask[owner], suffix_mask], dim=1),
                    "past_key_values": _select_cache(cache, owner),
                }
                if self._mrope_module is not None:
                    if deltas is None:
                        raise _PrefixMismatch("the model did not expose its rope deltas")
                    positions = positions + deltas.to(positions.device)[owner].view(-1, 1)
                    step["position_ids"] = positions.unsqueeze(0).expand(3, -1, -1)
                elif self._accepts_positions:
                    step["position_ids"] = positions
                logits = self._forward(step, cache=True).logits[:, -1, :].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                for r, g in enumerate(group):
                    result[rows[g]] = logprobs[r]
        return torch.stack([t for t in result if t is not None])

    # ------------------------------------------------------------------ public API

    def score_yes_no(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[YesNoScore | NotJudged]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        unique, index = _dedupe(images)
        logprobs = self._last_logprobs(unique, [(index[i], yes_no_prompt(q)) for i, q in enumerate(questions)])
        return [self._yes_no(row) for row in logprobs] if len(questions) else []

    def choose(self, images: Sequence[Image.Image], question: str, options: Sequence[str]) -> list[Choice | NotJudged]:
        groups = self._letters(len(options))
        prompt = moderation_choice_prompt(question, options)
        unique, index = _dedupe(images)
        logprobs = self._last_logprobs(unique, [(index[i], prompt) for i in range(len(images))])
        return [self._choice(row, groups) for row in logprobs] if len(images) else []

    def ask(self, images: Sequence[Image.Image], queries: Sequence[Query]) -> list[dict[str, Answer]]:
        """Every query about every image, sharing each image's prefix cache (one pass per batch)."""
        unique, index = _dedupe(images)
        prompts: list[str | None] = []
        groups: list[list[list[int]] | None] = []
        for q in queries:
            if q.kind == "yes_no":
                prompts.append(yes_no_prompt(q.question))
                groups.append(None)
            elif q.kind == "choice":
                groups.append(self._letters(len(q.options)))
                prompts.append(moderation_choice_prompt(q.question, q.options))
            else:
                prompts.append(None)
                groups.append(None)
        items: list[tuple[int, str]] = []
        done: dict[tuple[int, str], int] = {}
        for u in range(len(unique)):
            for prompt in prompts:
                if prompt is not None and (u, prompt) not in done:
                    done[(u, prompt)] = len(items)
                    items.append((u, prompt))
        logprobs = self._last_logprobs(unique, items)
        out: list[dict[str, Answer]] = []
        for i in range(len(images)):
            answers: dict[str, Answer] = {}
            for q, prompt, g in zip(queries, prompts, groups):
                if prompt is None:
                    answers[q.key] = NotJudged("cannot-judge", f"unknown query kind {q.kind!r}")
                    continue
                row = logprobs[done[(index[i], prompt)]]
                answers[q.key] = self._yes_no(row) if q.kind == "yes_no" else self._choice(row, g or [])
            out.append(answers)
        return out

    def generate(
        self,
        images: Sequence[Image.Image],
        messages: Sequence[Sequence[Message]],
        *,
        max_new_tokens: int = 256,
    ) -> list[str | None]:
        """Greedy decoding (no sampling) of each conversation about its image."""
        import torch

        if len(images) != len(messages):
            raise ValueError(f"{len(images)} images but {len(messages)} conversations")
        texts = [self._render(conv) for conv in messages]
        out: list[str | None] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self._encode(images[start : start + self.batch_size], texts[start : start + self.batch_size])
            with torch.inference_mode():
                generated = self.model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            out += [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return out

    def close(self) -> None:
        self._render_cache.clear()

    # ------------------------------------------------------------------ answers

    def _yes_no(self, logprobs: "torch.Tensor") -> YesNoScore | NotJudged:
        probs, scores = grouped_probs(logprobs[None], [self._yes_ids, self._no_ids])
        raw = {
            "logprob_yes": float(scores[0, 0]),
            "logprob_no": float(scores[0, 1]),
            "yes_no_mass": float(scores[0].exp().sum()),
        }
        if raw["yes_no_mass"] < self.min_label_mass:
            return self._not_judged(logprobs, raw["yes_no_mass"], "Yes/No", raw)
        return YesNoScore(p_yes=float(probs[0, 0]), source="logits", raw=raw)

    def _choice(self, logprobs: "torch.Tensor", groups: Sequence[Sequence[int]]) -> Choice | NotJudged:
        probs, scores = grouped_probs(logprobs[None], groups)
        raw = {"logprobs": [float(s) for s in scores[0]], "letter_mass": float(scores[0].exp().sum())}
        if raw["letter_mass"] < self.min_label_mass:
            return self._not_judged(logprobs, raw["letter_mass"], "the option labels", raw)
        return Choice(probs=[float(p) for p in probs[0]], source="logits", raw=raw)

    def _not_judged(self, logprobs: "torch.Tensor", mass: float, what: str, raw: dict[str, Any]) -> NotJudged:
        """Not judged: the model's next token is not a label; ``refused`` when it starts a refusal."""
        top = int(logprobs.argmax())
        token = self.tokenizer.decode([top])
        word = token.strip().strip(".,!:;\"'").lower()
        reason = "refused" if word in REFUSAL_FIRST_WORDS else "off-format"
        detail = f"most likely next token {token!r} (p={float(logprobs[top].exp()):.3g}); P({what})={mass:.3g} < {self.min_label_mass:g}"
        return NotJudged(reason, detail, {**raw, "top_token": token})


# --------------------------------------------------------------------------- helpers


class _MissingPackage(ImportError, BackendConfigError):
    """torch or transformers is not installed: an ImportError (as before) that also stops a job."""


class _PrefixMismatch(RuntimeError):
    """The processor's encoding of the shared prefix is not what the split assumed."""


def _resolve_device(torch: Any, device: str) -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _resolve_dtype(torch: Any, dtype: str, device: str) -> Any:
    """``auto``: float32 on CPU (half precision is slow there), the checkpoint's dtype elsewhere."""
    if dtype == "auto":
        return torch.float32 if device == "cpu" else "auto"
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return table[dtype]


def _check_disjoint(groups: Sequence[Sequence[int]], names: Sequence[str]) -> None:
    seen: dict[int, str] = {}
    for ids, name in zip(groups, names):
        for token_id in ids:
            if token_id in seen and seen[token_id] != name:
                raise ValueError(f"answers {seen[token_id]!r} and {name!r} share token {token_id}")
            seen[token_id] = name


def _select_cache(cache: Any, rows: "torch.Tensor") -> Any:
    """A cache holding ``rows`` of ``cache`` (repeats allowed); ``cache`` itself is untouched.

    Layers are shallow-copied: ``batch_select_indices`` and the next forward's ``update``
    rebind the copies' tensors instead of modifying the shared prefix.
    """
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.batch_select_indices(rows)
    return selected


def _length_groups(lengths: Sequence[int], slack: float = 1.3) -> list[list[int]]:
    """Indices grouped by similar length (each at most ``slack`` x its group's shortest)."""
    groups: list[list[int]] = []
    shortest = 0
    for i in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        if not groups or lengths[i] > slack * shortest:
            groups.append([])
            shortest = lengths[i]
        groups[-1].append(i)
    return groups


def _positions(mask: "torch.Tensor") -> "torch.Tensor":
    """Position ids that ignore left padding, so a padded row scores as it would alone."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _is_sequence_tensor(value: Any, ids: "torch.Tensor") -> bool:
    """Per-token tensors (ids, masks, token types) that must be cut with ``input_ids``."""
    return (
        hasattr(value, "shape")
        and tuple(value.shape) == tuple(ids.shape)
        and not value.is_floating_point()
    )


def _dedupe(images: Sequence[Image.Image]) -> tuple[list[Image.Image], list[int]]:
    """The distinct image objects and, per input, its index among them."""
    unique: list[Image.Image] = []
    seen: dict[int, int] = {}
    index = []
    for im in images:
        key = id(im)
        if key not in seen:
            seen[key] = len(unique)
            unique.append(im)
        index.append(seen[key])
    return unique, index


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
