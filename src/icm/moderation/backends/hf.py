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

The module is the backend class; its parts live beside it: the processor fallback
(:mod:`~icm.moderation.backends.hf_processor`), the answer tokens and label mass
(:mod:`~icm.moderation.backends.hf_answers`) and the prefix-cache planner
(:mod:`~icm.moderation.backends.hf_prefix_cache`). What the model is shown (conversation,
chat template, image placement, BOS rule) is decided in :mod:`icm.prompting`, which the
training collator and chat use too.

torch and transformers are imported lazily: ``import icm`` never needs them.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from icm.moderation.backends.base import (
    DEFAULT_MIN_LABEL_MASS,
    Answer,
    Backend,
    BackendConfigError,
    Choice,
    Message,
    NotJudged,
    Query,
    YesNoScore,
)
from icm.moderation.backends.hf_answers import (
    NO_VARIANTS,
    YES_VARIANTS,
    AnswerTokens,
    answer_variants,
    grouped_probs,
    read_choice,
    read_yes_no,
    resolve_answer_token_ids,
)
from icm.moderation.backends.hf_prefix_cache import (
    PrefixMismatch,
    PrefixPlan,
    cache_argument,
    is_sequence_tensor,
    length_groups,
    plan_prefix,
    question_prefix,
    select_cache,
)
from icm.moderation.backends.hf_processor import image_only_processor_class, load_processor
from icm.moderation.evidence.runtime import THREADS_ENV, resolve_threads
from icm.prompting import (
    encode_prompt,
    find_templater,
    hf_conversation,
    moderation_choice_prompt,
    question_conversation,
    render_prompt,
    yes_no_prompt,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "INSTALL_HINT",
    "NO_VARIANTS",
    "YES_VARIANTS",
    "HFBackend",
    "answer_variants",
    "grouped_probs",
    "hf_conversation",
    "image_only_processor_class",
    "load_processor",
    "resolve_answer_token_ids",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'icm-assistant[hf]'"


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


# --------------------------------------------------------------------------- backend


class HFBackend(Backend):
    """A local ``transformers`` image-text-to-text model (LLaVA, Qwen2-VL, Idefics3, ...).

    ``batch_size`` is the number of images per forward pass; in :meth:`ask` every question
    about those images is scored in the same (suffix) pass. ``prefix_cache=False`` turns
    the shared-prefix cache off (one padded forward per batch of prompts instead).
    ``threads``: torch's CPU threads (``None``: ``$ICM_THREADS`` when set, else torch's choice).
    """

    name = "hf"
    text_stream = "transformers"  # icm chat streams with a TextStreamer on self.model
    merges_policies = True  # ask() takes any queries: a bundle asks once for all its policies
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
        threads: int | None = None,
    ) -> None:
        torch, transformers = _require_hf()
        if threads is not None or os.environ.get(THREADS_ENV):  # torch's count: the option, else $ICM_THREADS
            self.set_threads(resolve_threads(threads))
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
        if Path(self._model_path).is_dir():  # a local checkpoint: never ask the hub
            load_kwargs["local_files_only"] = True

        self.processor, self.processor_fallback = load_processor(self._model_path, processor_class, **load_kwargs)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"the processor of {model!r} has no tokenizer")
        self.tokenizer: Any = tokenizer
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
                adapter_kwargs: dict[str, Any] = {"local_files_only": True} if Path(self._adapter).is_dir() else {}
                net = PeftModel.from_pretrained(net, self._adapter, **adapter_kwargs)
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
        self._cache_arg = cache_argument(forward_params)
        self._answers = AnswerTokens(self.tokenizer)
        self._yes_ids, self._no_ids = self._answers.yes_ids, self._answers.no_ids
        self._prefix_text: str | bool | None = False  # False: not computed yet
        self._render_cache: dict[str, str] = {}

    # ------------------------------------------------------------------ identity

    @property
    def model_id(self) -> str:
        return f"{self._model_path}+{self._adapter}" if self._adapter else self._model_path

    def _base_model(self) -> Any:
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    def _find_templater(self) -> Any:
        try:
            return find_templater(self.processor)
        except ValueError:
            raise ValueError(
                f"{self._model_path!r} has no chat template (neither its processor nor its tokenizer): "
                "the hf backend builds prompts with it"
            ) from None

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
        return self._answers.labels(n)

    # ------------------------------------------------------------------ prompts

    def _render(self, conversation: Sequence[Message]) -> str:
        return render_prompt(self._templater, conversation)

    def _render_user(self, text: str) -> str:
        rendered = self._render_cache.get(text)
        if rendered is None:
            if len(self._render_cache) > 4096:
                self._render_cache.clear()
            rendered = self._render(question_conversation(text))
            self._render_cache[text] = rendered
        return rendered

    def _encode(self, images: Sequence[Image.Image], texts: Sequence[str]) -> Any:
        return encode_prompt(self.processor, images, texts, padding=True).to(self.device)

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

    def _last_logprobs(self, images: Sequence[Image.Image], items: Sequence[tuple[int, str]]) -> torch.Tensor:
        """Log-probabilities of the next token for each ``(image index, user text)`` item."""
        import torch

        if not items:
            return torch.empty(0, 0)
        rendered = [self._render_user(text) for _, text in items]
        plan = self._plan(rendered) if self.prefix_cache else None
        if plan is not None:
            try:
                return self._cached_logprobs(images, items, rendered, plan)
            except PrefixMismatch as why:
                logger.warning("shared-prefix cache disabled for %s: %s", self._model_path, why)
                self.prefix_cache = False
        out = []
        for start in range(0, len(items), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(items)))
            enc = self._encode([images[items[i][0]] for i in chunk], [rendered[i] for i in chunk])
            logits = self._forward(dict(enc)).logits[:, -1, :].float()
            out.append(torch.log_softmax(logits, dim=-1))
        return torch.cat(out)

    def _plan(self, rendered: Sequence[str]) -> PrefixPlan | None:
        """Split prompts at the image; ``None`` when the chat template does not allow it."""
        if self._prefix_text is False:
            self._prefix_text = question_prefix(self._templater)
        if not isinstance(self._prefix_text, str):
            return None
        return plan_prefix(rendered, self._prefix_text, self.tokenizer, self._image_token_id)

    def _cached_logprobs(
        self,
        images: Sequence[Image.Image],
        items: Sequence[tuple[int, str]],
        rendered: Sequence[str],
        plan: PrefixPlan,
    ) -> torch.Tensor:
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
                raise PrefixMismatch("the processor's prefix does not end as the tokenizer's does")
            if plan.cut:
                seq_len = ids.shape[1]
                enc = {
                    k: (v[:, : seq_len - plan.cut] if is_sequence_tensor(v, ids) else v) for k, v in enc.items()
                }
            mask = enc["attention_mask"]
            if self._mrope_module is not None:
                self._mrope_module.rope_deltas = None
            out = self._forward(enc, cache=True)
            cache = out.get(self._cache_arg)  # the output field has the argument's name
            if cache is None:
                raise PrefixMismatch(f"the model returned no {self._cache_arg!r}")
            prefix_len = mask.sum(dim=-1)
            deltas = getattr(self._mrope_module, "rope_deltas", None) if self._mrope_module is not None else None

            rows = [row for local, i in enumerate(image_chunk) for row in by_image[i]]
            owners = [local for local, i in enumerate(image_chunk) for _ in by_image[i]]
            suffixes = [plan.suffixes[rendered[row]] for row in rows]
            # Rows of similar length go together: a short yes/no suffix padded to a long
            # multiple-choice one would cost as much as the long one.
            for group in length_groups([len(x) for x in suffixes]):
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
                    self._cache_arg: select_cache(cache, owner),
                }
                if self._mrope_module is not None:
                    if deltas is None:
                        raise PrefixMismatch("the model did not expose its rope deltas")
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
        return self.score_prompts_yes_no(images, [yes_no_prompt(q) for q in questions])

    def score_prompts_yes_no(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[YesNoScore | NotJudged]:
        """P(Yes) for ``prompts[i]`` about ``images[i]``, each prompt used as written (through the chat template)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        unique, index = _dedupe(images)
        logprobs = self._last_logprobs(unique, [(index[i], p) for i, p in enumerate(prompts)])
        return [self._yes_no(row) for row in logprobs] if len(prompts) else []

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
            for q, prompt, g in zip(queries, prompts, groups, strict=True):
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

    def set_threads(self, threads: int) -> None:
        """torch's CPU threads (process-wide)."""
        torch, _ = _require_hf()
        torch.set_num_threads(threads)

    def close(self) -> None:
        self._render_cache.clear()

    # ------------------------------------------------------------------ answers

    def _yes_no(self, logprobs: torch.Tensor) -> YesNoScore | NotJudged:
        return read_yes_no(logprobs, self._answers, self.min_label_mass)

    def _choice(self, logprobs: torch.Tensor, groups: Sequence[Sequence[int]]) -> Choice | NotJudged:
        unoffered = self._answers.unoffered(len(groups)) if self.min_label_mass > 0 else None
        return read_choice(logprobs, groups, self.tokenizer, self.min_label_mass, unoffered)


# --------------------------------------------------------------------------- helpers


class _MissingPackage(ImportError, BackendConfigError):
    """torch or transformers is not installed: an ImportError (as before) that also stops a job."""


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


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding, so a padded row scores as it would alone."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


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
