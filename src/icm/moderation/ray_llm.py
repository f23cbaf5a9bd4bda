"""The policy's questions through Ray Data LLM's vLLM engine stage (GPU clusters with ``vllm``).

**Untested here**: vLLM needs CUDA and pins its own torch, so it cannot be installed on the
machine this project is developed on. This module is written against the documented
interface of Ray 2.60 (``ray.data.llm.build_processor`` with ``vLLMEngineProcessorConfig``,
whose engine stage returns ``generated_text`` and, when the row's ``sampling_params`` ask
for ``logprobs``, a ``logprobs`` column: one ``{token_id: {"logprob", "rank",
"decoded_token"}}`` dict per generated token). What is tested is the part that decides:
:func:`chat_logprobs` turns that column into the OpenAI chat format and
:func:`read_row_answer` reads it through :func:`~icm.moderation.backends.openai_parsing.read_answer`,
the parsing the ``openai`` backend uses, so P(Yes) and option distributions come out the same.

The recipe that works today without vLLM in the Ray job is the ``openai`` backend inside the
actors of ``icm moderate --engine ray`` against a vLLM or SGLang deployment.

Pipeline (:func:`build_question_processor`): one row per (image, question) with the same
prompt and image encoding the ``openai`` backend sends, one generated token at temperature 0
with the top 20 logprobs; then :func:`records_from_answers` feeds the answers to the normal
:class:`~icm.moderation.engine.Moderator`, so the decision, the record and its checks are
those of every other backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from PIL import Image

from icm.moderation.backends.base import Backend, Choice, Failed, NotJudged, Query, YesNoScore
from icm.moderation.backends.openai_parsing import read_answer
from icm.policy.prompts_format import moderation_choice_prompt, option_labels, yes_no_prompt
from icm.prompting import openai_conversation, question_conversation

TOP_LOGPROBS = 20


def question_prompt(q: Query) -> tuple[str, list[str] | None]:
    """The text the ``openai`` backend asks for ``q`` and its option labels (None: yes/no)."""
    if q.kind == "yes_no":
        return yes_no_prompt(q.question), None
    return moderation_choice_prompt(q.question, q.options), option_labels(len(q.options))


def question_rows(image_id: str, image_url: str, queries: Sequence[Query], *, system: str | None = None) -> list[dict[str, Any]]:
    """The rows the vLLM stage answers for one image: messages and sampling params per question."""
    rows = []
    for q in queries:
        text, _ = question_prompt(q)
        rows.append({
            "image_id": image_id,
            "query": q.key,
            "messages": openai_conversation(question_conversation(text, system), image_url),
            "sampling_params": {"max_tokens": 1, "temperature": 0.0, "logprobs": TOP_LOGPROBS},
        })
    return rows


def chat_logprobs(logprobs: Any) -> dict[str, Any] | None:
    """Ray's vLLM ``logprobs`` column as the OpenAI chat ``logprobs`` object (first token only matters).

    Each position is ``{token_id: {"logprob": float, "rank": int, "decoded_token": str}}``
    (token ids may arrive as strings after Arrow). The sampled token is the one of rank 1
    at temperature 0; every listed token becomes a ``top_logprobs`` entry.
    """
    if not logprobs:
        return None
    content = []
    for position in logprobs:
        if not isinstance(position, dict) or not position:
            continue
        entries = []
        for info in position.values():
            if not isinstance(info, dict):
                continue
            tok, lp = info.get("decoded_token"), info.get("logprob")
            if isinstance(tok, str) and isinstance(lp, (int, float)):
                entries.append((info.get("rank") or 10**9, tok, float(lp)))
        if not entries:
            continue
        entries.sort(key=lambda e: (e[0], -e[2]))
        _, tok, lp = entries[0]
        content.append({"token": tok, "logprob": lp, "top_logprobs": [{"token": t, "logprob": p} for _, t, p in entries]})
    return {"content": content} if content else None


def read_row_answer(row: dict[str, Any], q: Query, *, min_label_mass: float) -> YesNoScore | Choice | NotJudged | Failed:
    """One answered row read as the ``openai`` backend reads a response."""
    if row.get("__error__") or row.get("error"):
        return Failed(f"vLLM stage: {row.get('__error__') or row.get('error')}")
    _, labels = question_prompt(q)
    answer, _ = read_answer(
        row.get("generated_text"), chat_logprobs(row.get("logprobs")), labels=labels, options=q.options,
        min_label_mass=min_label_mass, logprobs_asked=True,
    )
    return answer


class AnsweredBackend(Backend):
    """A backend whose answers were computed elsewhere (the vLLM stage), looked up by image.

    ``answers[image_id][query_key]``; images are matched by ``LoadedImage.source`` through
    ``image_ids`` set per call by :func:`records_from_answers`.
    """

    name = "vllm"
    capabilities = frozenset({"score_yes_no", "choose"})

    def __init__(self, model: str, answers: dict[str, dict[str, Any]]) -> None:
        self._model = model
        self.answers = answers
        self.order: list[str] = []

    @property
    def model_id(self) -> str:
        return self._model

    def ask(self, images: Sequence[Image.Image], queries: Sequence[Query]) -> list[dict[str, Any]]:
        return [{q.key: self.answers.get(i, {}).get(q.key, Failed("no answer from the vLLM stage")) for q in queries}
                for i in self.order[: len(images)]]


def records_from_answers(
    moderator: Any, loaded: Sequence[Any], rows: Iterable[dict[str, Any]], *, min_label_mass: float
) -> list[Any]:
    """Records for ``loaded`` images from the vLLM stage's answered rows, through ``moderator``'s engine.

    ``moderator.backend`` must be an :class:`AnsweredBackend`; rows carry ``image_id`` (the
    image's ``source``) and ``query`` (the query key).
    """
    backend: AnsweredBackend = moderator.backend
    by_key = {q.key: q for q in moderator.queries}
    for row in rows:
        q = by_key.get(row.get("query"))
        if q is not None:
            backend.answers.setdefault(row["image_id"], {})[q.key] = read_row_answer(row, q, min_label_mass=min_label_mass)
    out = []
    for im in loaded:  # one image (all its views) at a time, so the backend knows whose answers it gives
        backend.order = [im.source] * max(1, len(im.judged_views()))
        out.extend(moderator.moderate_loaded([im]))
    return out


def build_question_processor(model: str, *, concurrency: int = 1, batch_size: int = 64, engine_kwargs: dict[str, Any] | None = None) -> Any:
    """A Ray Data LLM processor answering :func:`question_rows` rows with vLLM (needs ``vllm`` and a GPU).

    Apply it to a dataset of question rows; each output row keeps ``image_id`` and ``query``
    and adds ``generated_text`` and ``logprobs``. Untested here (see the module docstring).
    """
    try:
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    except ImportError as exc:  # pragma: no cover - depends on the installed Ray
        raise ImportError("the vLLM stage needs Ray Data LLM: pip install 'ray[data,llm]' (and vllm, on a GPU machine)") from exc
    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs={"max_logprobs": TOP_LOGPROBS, **(engine_kwargs or {})},
        concurrency=concurrency,
        batch_size=batch_size,
        prepare_multimodal_stage=True,
    )
    return build_processor(
        config,
        preprocess=lambda row: {k: row[k] for k in ("image_id", "query", "messages", "sampling_params")},
        postprocess=lambda row: {
            "image_id": row["image_id"], "query": row["query"],
            "generated_text": row.get("generated_text"), "logprobs": row.get("logprobs"),
        },
    )
