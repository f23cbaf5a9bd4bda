"""The ICM-Instruct generation pipeline behind ``icm data generate``.

For every image with its attribute product:

1. an MLLM writes the explicit content, the implicit content and the explanation of why
   the image is or is not the term: in one multi-question call as the paper did
   (``mode="combined"``), or one call per stage (``mode="separate"``, the explanation
   asked in the same conversation after both descriptions);
2. the texts pass the quality filters (:mod:`icm.data.quality`); a failing image is
   quarantined in ``rejected.jsonl`` with its reason and raw text;
3. a text LLM turns the explanation into Q-A pairs (yes/no, 4-choice, what, how),
   parsed from its markdown table (:mod:`icm.data.tables`); rows that cannot be used are
   quarantined one by one;
4. the finished :class:`~icm.data.records.InstructRecord` is appended to
   ``records.jsonl`` and flushed at once.

Every prompt comes from the policy (:func:`icm.policy.prompts.stage_prompts`,
:func:`icm.policy.prompts.qa_generation_prompt`). Images are processed concurrently (at
most ``concurrency`` in flight); requests have a timeout and are retried with backoff.
Every response is cached in SQLite under (image hash, stage, prompt hash, model) as soon
as it arrives, and the outputs know which images are done, so a run killed at any moment
resumes where it stopped, re-asks nothing it already has, and writes each record once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from icm.aio import in_daemon_thread
from icm.cache import ReplyCache, prompt_hash, stage_key
from icm.data.generate_config import Failure, GenerateConfig, GenerateSummary, ItemOutcome, Mode
from icm.data.generate_prompts import PromptPlan, plan_prompts, qa_prompt, split_combined_answer, stage_conversations
from icm.data.inputs import InputError, Sample, file_sha256, load_samples
from icm.data.llm import ChatError, TextClient
from icm.data.outputs import OutputStore
from icm.data.quality import check_description, check_explanation
from icm.data.records import DescriptionRecord, ExplanationRecord, InstructRecord, Rejected
from icm.data.tables import parse_qa_text
from icm.moderation.backends.base import Failed
from icm.policy import Policy, load_policy
from icm.policy.prompts import StagePrompts, stage_prompts

__all__ = [
    "GenerateConfig",
    "GenerateSummary",
    "Generator",
    "ItemOutcome",
    "Mode",
    "PromptPlan",
    "generate",
    "plan_prompts",
    "split_combined_answer",
]

log = logging.getLogger(__name__)


class StageFailed(Exception):
    def __init__(self, stage: str, error: str) -> None:
        super().__init__(f"{stage}: {error}")
        self.stage = stage
        self.error = error


class _Reject(Exception):
    def __init__(self, stage: str, reason: str, detail: str, raw: str | None = None) -> None:
        super().__init__(f"{stage}: {reason}: {detail}")
        self.stage, self.reason, self.detail, self.raw = stage, reason, detail, raw


# --------------------------------------------------------------------------- the pipeline


class _Item:
    """One image in flight: its hash, id and (lazily, once) its decoded pixels."""

    def __init__(self, sample: Sample, sha: str) -> None:
        self.sample = sample
        self.sha = sha
        self.id = f"{sample.product.id}-{sha[:16]}"
        self._image: Any = None
        self._lock = asyncio.Lock()

    async def image(self) -> Any:
        """The image as RGB; an image that cannot be decoded rejects the item."""
        async with self._lock:
            if self._image is None:
                from icm.moderation.images import ImageLoadError, load_image

                try:
                    self._image = (await in_daemon_thread(load_image, self.sample.path)).image
                except ImageLoadError as exc:
                    raise _Reject("image", "unreadable", exc.cause) from None
            return self._image


class Generator:
    """The pipeline, for library use: pass your own backends to reuse or fake them.

    ``mllm`` is an :class:`~icm.moderation.backends.openai_compat.OpenAIBackend` (or any
    object with its ``async generate_async(images, messages, ...)`` (text or
    :class:`~icm.moderation.backends.base.Failed` per item), ``stats`` and ``model``);
    ``llm`` a :class:`~icm.data.llm.TextClient`. Both are built from the config (its
    :meth:`~GenerateConfig.mllm_server` and :meth:`~GenerateConfig.llm_server`) when not
    given. Every request is awaited in the run's own event loop: no thread per call.
    """

    def __init__(
        self,
        config: GenerateConfig,
        *,
        policy: Policy | None = None,
        mllm: Any = None,
        llm: TextClient | None = None,
    ) -> None:
        config.validate(need_model=mllm is None)
        self.config = config
        self.policy = policy or load_policy(config.policy)
        self._own_mllm = mllm is None
        self.mllm = mllm if mllm is not None else self._make_mllm()
        self._own_llm = llm is None
        self.llm = llm if llm is not None else (self._make_llm() if config.qa else None)
        self.mllm_model = str(getattr(self.mllm, "model", "mllm"))
        self.llm_model = self.llm.model if self.llm is not None else None
        self.cache: ReplyCache  # opened by each run

    def _make_mllm(self) -> Any:
        from icm.moderation.backends.openai_compat import OpenAIBackend

        return OpenAIBackend(settings=self.config.mllm_server(), max_image_side=self.config.max_image_side)

    def _make_llm(self) -> TextClient:
        settings = self.config.llm_server()
        return TextClient(settings.model or "", settings=settings)

    # ------------------------------------------------------------------ calls

    def _params(self, max_tokens: int) -> dict[str, Any]:
        return {"max_tokens": max_tokens, "temperature": self.config.temperature, "seed": self.config.seed}

    async def _ask_mllm(self, item: _Item, stage: str, messages: list[dict[str, str]]) -> str:
        c = self.config
        params = {**self._params(c.max_tokens), "max_image_side": c.max_image_side}
        key = stage_key(item.sha, stage, prompt_hash(messages, params))
        hit = self.cache.get(self.mllm_model, key)
        if hit is not None:
            return hit.text
        image = await item.image()
        [text] = await self.mllm.generate_async(
            [image], [messages], max_new_tokens=c.max_tokens, temperature=c.temperature, seed=c.seed
        )
        if isinstance(text, Failed) or not isinstance(text, str):
            raise StageFailed(stage, text.error if isinstance(text, Failed) else "the server gave no answer")
        self.cache.put(self.mllm_model, key, text, stage=stage)
        return text

    async def _ask_llm(self, item: _Item, stage: str, prompt: str) -> str:
        assert self.llm is not None
        c = self.config
        messages = [{"role": "user", "content": prompt}]
        key = stage_key(item.sha, stage, prompt_hash(messages, self._params(c.qa_max_tokens)))
        hit = self.cache.get(self.llm.model, key)
        if hit is not None:
            return hit.text
        try:
            res = await self.llm.complete(messages, max_tokens=c.qa_max_tokens, temperature=c.temperature, seed=c.seed)
        except ChatError as exc:
            raise StageFailed(stage, str(exc)) from None
        self.cache.put(self.llm.model, key, res.text, stage=stage,
                       prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens)
        return res.text

    # ------------------------------------------------------------------ one image

    async def _texts(self, item: _Item, prompts: StagePrompts) -> tuple[str, str, str]:
        convs = stage_conversations(self.config.mode, prompts)
        if self.config.mode == "combined":
            raw = await self._ask_mllm(item, "combined", convs["combined"])
            parts = split_combined_answer(raw)
            if parts is None:
                found = [f for f in check_description(raw, filters=("empty", "refusal")) if f.reason in self.config.filters]
                if found:  # a refusal has no parts; say it refused
                    raise _Reject("combined", found[0].reason, found[0].detail, raw)
                raise _Reject("combined", "sections", "the answer is not three numbered parts (explicit, implicit, explanation)", raw)
            return parts
        explicit, implicit = await asyncio.gather(
            self._ask_mllm(item, "explicit", convs["explicit"]), self._ask_mllm(item, "implicit", convs["implicit"])
        )
        for stage, text in (("explicit", explicit), ("implicit", implicit)):
            self._check_description(stage, text)
        conv = [
            convs["explicit"][0], {"role": "assistant", "content": explicit},
            convs["implicit"][0], {"role": "assistant", "content": implicit},
            convs["explanation"][0],
        ]
        explanation = await self._ask_mllm(item, "explanation", conv)
        return explicit, implicit, explanation

    def _check_description(self, stage: str, text: str) -> None:
        findings = check_description(text, filters=self.config.filters)
        if findings:
            raise _Reject(stage, findings[0].reason, "; ".join(f.detail for f in findings), text)

    async def _process(self, item: _Item) -> tuple[InstructRecord, list[Rejected]]:
        c, product = self.config, item.sample.product
        prompts = stage_prompts(self.policy, product)
        explicit, implicit, explanation = await self._texts(item, prompts)
        if c.mode == "combined":
            for stage, text in (("explicit", explicit), ("implicit", implicit)):
                self._check_description(stage, text)
        t = self.policy.term
        term = t.id
        verdict, findings = check_explanation(explanation, term, product.positive, filters=c.filters,
                                              statements=(t.positive_statement, t.negative_statement))
        if findings:
            raise _Reject("explanation", findings[0].reason, "; ".join(f.detail for f in findings), explanation)
        record = InstructRecord(
            id=item.id,
            image=str(item.sample.path),
            image_sha256=item.sha,
            policy=self.policy.name,
            term=term,
            product=product.id,
            category=item.sample.category,
            positive=product.positive,
            explicit=DescriptionRecord(kind="explicit", text=explicit, model=self.mllm_model),
            implicit=DescriptionRecord(kind="implicit", text=implicit, model=self.mllm_model),
            explanation=ExplanationRecord(
                text=explanation, verdict=verdict.label, evidence=verdict.evidence, expected=product.positive,
                model=self.mllm_model,
            ),
            source="generated",
            meta={"mode": c.mode, "mllm": self.mllm_model, "llm": self.llm_model, "policy_version": self.policy.version},
        )
        rows: list[Rejected] = []
        if c.qa:
            raw = await self._ask_llm(item, "qa", qa_prompt(self.policy, c, explanation))
            parsed = parse_qa_text(raw)
            if not parsed.pairs:
                if parsed.tables == 0:
                    raise _Reject("qa", "no_table", "the reply holds no markdown table", raw)
                if parsed.rows == 0:
                    raise _Reject("qa", "empty_table", "the table has a header but no rows", raw)
            for prob in parsed.problems:
                rows.append(Rejected(
                    key=f"{item.id}:qa:{prob.line}", id=item.id, image=record.image, product=product.id, stage="qa",
                    reason=prob.reason, detail=prob.detail, item=False, raw=prob.raw, line=prob.line, model=self.llm_model,
                ))
            if len(parsed.pairs) < c.min_qa:
                raise _Reject("qa", "no_qa", f"{len(parsed.pairs)} usable Q-A pairs of {parsed.rows} rows (at least {c.min_qa} needed)", raw)
            record.qa = parsed.pairs
            record.meta["qa_rows"] = parsed.rows
        return record, rows

    # ------------------------------------------------------------------ the run

    async def run_async(
        self,
        samples: Sequence[Sample],
        *,
        input_errors: Sequence[InputError] = (),
        on_start: Callable[[int], None] | None = None,
        on_item: Callable[[ItemOutcome], None] | None = None,
    ) -> GenerateSummary:
        c = self.config
        t0 = time.perf_counter()
        summary = GenerateSummary(
            inputs=len(samples) + len(input_errors), out=str(Path(c.out)), config=c.public(),
            input_errors=[{"origin": e.origin, "error": e.error} for e in input_errors],
        )
        reasons: Counter[str] = Counter()
        mllm_before = _usage(self.mllm)
        llm_before = _usage(self.llm)
        self.cache = ReplyCache(c.cache_path)
        store = OutputStore(c.out, retry_rejected=c.retry_rejected)
        summary.repaired_bytes = store.repaired_bytes
        in_flight: set[str] = set()
        queue: asyncio.Queue[Sample] = asyncio.Queue()
        for s in samples:
            queue.put_nowait(s)
        if on_start:
            on_start(len(samples))

        def report(outcome: ItemOutcome) -> None:
            if on_item:
                on_item(outcome)

        async def handle(sample: Sample) -> None:
            image = str(sample.path)
            try:
                sha = await in_daemon_thread(file_sha256, sample.path)
            except OSError as exc:
                summary.failed += 1
                summary.failures.append(Failure(image=image, stage="image", error=f"cannot read the file: {exc}"))
                report(ItemOutcome("failed", image, stage="image", detail=str(exc)))
                return
            item = _Item(sample, sha)
            if store.is_done(item.id):
                summary.skipped += 1
                report(ItemOutcome("skipped", image, item.id))
                return
            if item.id in in_flight:
                summary.duplicates += 1
                report(ItemOutcome("duplicate", image, item.id))
                return
            in_flight.add(item.id)
            try:
                record, rows = await self._process(item)
            except _Reject as rej:
                store.write_rejected(Rejected(
                    key=f"{item.id}:{rej.stage}", id=item.id, image=image, product=sample.product.id, stage=rej.stage,
                    reason=rej.reason, detail=rej.detail, item=True, raw=rej.raw,
                    model=self.llm_model if rej.stage == "qa" else self.mllm_model,
                ))
                summary.rejected += 1
                reasons[rej.reason] += 1
                report(ItemOutcome("rejected", image, item.id, rej.stage, rej.reason, rej.detail))
                return
            except StageFailed as exc:
                summary.failed += 1
                summary.failures.append(Failure(image=image, id=item.id, stage=exc.stage, error=exc.error))
                report(ItemOutcome("failed", image, item.id, exc.stage, None, exc.error))
                return
            for r in rows:
                if store.write_rejected(r):
                    summary.rejected_rows += 1
            if store.write_record(record):
                summary.written += 1
            report(ItemOutcome("written", image, item.id))

        async def worker() -> None:
            while True:
                try:
                    sample = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    await handle(sample)
                except Exception as exc:  # one image's bug is its failure record; the other workers go on
                    log.exception("unexpected error on %s", sample.path)
                    summary.failed += 1
                    summary.failures.append(Failure(image=str(sample.path), stage="internal", error=f"{type(exc).__name__}: {exc}"))
                    report(ItemOutcome("failed", str(sample.path), stage="internal", detail=str(exc)))

        try:
            await asyncio.gather(*(worker() for _ in range(min(c.concurrency, max(1, len(samples))))))
        finally:
            store.close()
            summary.cache_hits, summary.cache_misses = self.cache.hits, self.cache.misses
            self.cache.close()
            if self._own_llm and self.llm is not None:
                await self.llm.aclose()
            mllm_close = getattr(self.mllm, "aclose", None)
            if mllm_close is not None:  # its client for this run's loop (the loop ends with the run)
                await mllm_close()
        mllm_after, llm_after = _usage(self.mllm), _usage(self.llm)
        for key in ("requests", "retries", "prompt_tokens", "completion_tokens"):
            spent = mllm_after[key] - mllm_before[key] + llm_after[key] - llm_before[key]
            setattr(summary, key, spent)
        summary.rejected_by_reason = dict(reasons.most_common())
        summary.records_total = len(store.done)
        summary.seconds = time.perf_counter() - t0
        Path(c.out, "summary.json").write_text(summary.model_dump_json(indent=2), encoding="utf-8")
        return summary

    def close(self) -> None:
        if self._own_mllm and hasattr(self.mllm, "close"):
            self.mllm.close()


def _usage(client: Any) -> dict[str, int]:
    stats = getattr(client, "stats", None)
    return {k: int(getattr(stats, k, 0) or 0) for k in ("requests", "retries", "prompt_tokens", "completion_tokens")}


def generate(
    config: GenerateConfig,
    *,
    on_start: Callable[[int], None] | None = None,
    on_item: Callable[[ItemOutcome], None] | None = None,
    mllm: Any = None,
    llm: TextClient | None = None,
) -> GenerateSummary:
    """Run the pipeline over ``config.inputs``; see the module docstring."""
    config.validate(need_model=mllm is None)
    policy = load_policy(config.policy)
    samples, errors = load_samples(config.inputs, policy)
    if config.limit is not None:
        samples = samples[: config.limit]
    gen = Generator(config, policy=policy, mllm=mllm, llm=llm)
    try:
        return asyncio.run(gen.run_async(samples, input_errors=errors, on_start=on_start, on_item=on_item))
    finally:
        gen.close()
