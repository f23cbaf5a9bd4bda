"""The backend interface every model behind `icm moderate` implements.

A backend answers three kinds of question about images, always batched:

* ``score_yes_no(images, questions)``: P(Yes) for a yes/no question per image
  (the paper's protocol: softmax over the "Yes" and "No" next-token logits);
* ``choose(images, question, options)``: a probability distribution over lettered
  options per image (the same protocol over the option letters);
* ``generate(images, messages)``: free text, e.g. a moderation explanation.

A backend declares which of these it supports in ``capabilities``; the engine never
calls an operation a backend does not declare.

Every slot of an answer is one of:

* a :class:`YesNoScore` or :class:`Choice`: the model answered, with enough probability
  on the valid labels (see :data:`DEFAULT_MIN_LABEL_MASS`);
* :class:`NotJudged`: the backend gives no answer and nothing went wrong, with a reason:
  ``cannot-judge`` (a detector asked about an action it cannot see), ``refused`` (the
  model declined: "I'm sorry, but I can't help with that.") or ``off-format`` (it said
  something that is not one of the labels). ``None`` is still accepted and means
  ``cannot-judge``;
* :class:`Failed`: the request failed for good (after its retries); the engine makes the
  whole image an error record, never a verdict.

A failure that no retry or other image can fix (a rejected API key, an unknown model, a
missing package) raises :class:`BackendConfigError`, which stops a job at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from PIL import Image

if TYPE_CHECKING:
    from icm.moderation.backends.openai_requests import ItemError
    from icm.moderation.evidence.plan import Coverage
    from icm.moderation.record import ModerationRecord
    from icm.policy.model import Policy, RuleSet

Capability = Literal["score_yes_no", "choose", "generate"]


@dataclass
class Box:
    """A detection box in pixel coordinates of the (EXIF-corrected) image."""

    label: str
    score: float
    x: float
    y: float
    w: float
    h: float

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": self.score, "box": [self.x, self.y, self.w, self.h]}


@dataclass
class YesNoScore:
    """P(Yes) for one (image, question) pair and how it was obtained.

    ``source`` is ``"logits"`` for next-token logits, ``"logprobs"`` for a server's
    top logprobs, ``"text"`` when only the answer text could be read (one sampled answer:
    the probability is the backend's ``text_confidence``, not a measured one; records
    written before this was so say ``"parsed"``), ``"guided"`` for the text of a
    constrained (guided-choice) answer without logprobs, or a detector's name.
    """

    p_yes: float
    source: str = "logits"
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class Choice:
    """A distribution over lettered options for one image."""

    probs: list[float]
    source: str = "logits"
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Query:
    """One question asked of every image in a call to :meth:`Backend.ask`.

    ``key`` names the answer in the result (e.g. ``"term:sexy"``, ``"attr:exposure"``).
    ``term`` / ``attribute`` and ``option_ids`` carry the policy's identifiers so that a
    backend that does not read text (a detector) can still map its evidence onto the
    policy's vocabulary; language-model backends use ``question`` and ``options``.
    """

    key: str
    kind: Literal["yes_no", "choice"]
    question: str
    options: tuple[str, ...] = ()
    option_ids: tuple[str, ...] = ()
    term: str | None = None
    attribute: str | None = None


DEFAULT_MIN_LABEL_MASS = 0.5
"""An answer counts only when the model puts at least this probability on the valid labels
(Yes/No, or the option labels) for its first answer token; below it the query is not
judged. 0.5 means "the labels are more likely than everything else together"."""

DEFAULT_TEXT_CONFIDENCE = 0.75
"""The probability an answer read from text (no usable logprobs: one sampled answer) gives
the label it names; the other labels share the rest. A greedy answer says only that its
label was the most likely one (at least 0.5 for Yes/No) and not by how much: 0.75 is the
middle of what it can mean, [0.5, 1]. See docs/verdicts.md."""

TEXT_SOURCES = frozenset({"text", "guided", "parsed"})
"""Answer sources that were read from the answer text, not measured: ``text``, ``guided``
(constrained text) and ``parsed`` (``text`` in records of earlier versions)."""

NotJudgedReason = Literal["cannot-judge", "refused", "off-format"]

MAX_UNOFFERED_SHARE = 0.1
"""A multiple-choice answer is not read when letters the question did not offer (an "A",
an "I", letters past its last option) hold at least this share of the probability on
option letters, or the most likely letter is one of them: the model letters options its
own way (the paper's A, B, C, ...), and reading its letter would pick a neighbouring
option. The answer is ``off-format``, its detail ``label not offered: ...``. Not applied
with ``min_label_mass`` 0 (every distribution over the labels is then an answer)."""

UNOFFERED = "label not offered"
"""How the detail of an off-format answer that names a letter the question did not offer starts."""

REFUSAL_FIRST_WORDS = frozenset({"i", "i'm", "im", "sorry", "as", "unfortunately", "apologies", "unable"})
"""First words of refusals ("I'm sorry", "Sorry, ...", "As an AI", "Unfortunately"): when a
backend sees only the first token of an answer that is not a label, one of these makes
the answer ``refused`` rather than ``off-format``. Not for a multiple-choice question,
where a bare "I" is the option letter I (never offered: ``label not offered``)."""


@dataclass
class NotJudged:
    """No answer for one (image, question), and why; nothing failed.

    ``detail`` says what the model said instead (its text, its label mass), ``raw`` keeps
    what the backend saw (top tokens, logprobs).
    """

    reason: NotJudgedReason
    detail: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass
class Failed:
    """A request that still failed after its retries (HTTP 503, a timeout, a bad response).

    ``error`` names the cause ("HTTP 503 from ...: ... (gave up after 3 attempts)").
    """

    error: str
    status: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)


class BackendConfigError(RuntimeError):
    """The backend cannot work at all (authentication, an unknown model, a missing package,
    a server that cannot be reached): the job stops with this message instead of writing one
    error record per image."""


Answer = YesNoScore | Choice | NotJudged | Failed | None

Message = dict[str, Any]
"""An OpenAI-style chat message: ``{"role": "user", "content": "text"}``.

The image the call is about is attached by the backend to the first user turn; the
messages themselves carry text only.
"""


class Backend:
    """Base class of model backends. Subclasses set ``name`` and ``capabilities``."""

    name: str = "backend"
    capabilities: frozenset[Capability] = frozenset()
    merges_policies: bool = False
    """Whether one :meth:`ask` may carry several policies' queries (keys made unique by the caller).

    A bundle (:class:`icm.moderation.bundle.BundleModerator`) then asks once for all its
    policies (the detector does: each of its sources then runs once per image for them all)."""
    pixel_digests: ClassVar[bool] = False
    """Whether the backend keys what it computes by a hash of each image's pixels
    (:func:`icm.moderation.evidence.runtime.image_digest`, memoised on the image): the server
    then takes the hash in the decoding thread, not in its batch worker."""
    text_stream: ClassVar[Literal["transformers", "method"] | None] = None
    """How ``icm chat`` streams this backend's answers token by token: ``"transformers"``
    (chat drives the backend's transformers ``model`` with a streamer: it has ``model``,
    ``processor``, ``tokenizer`` and ``device``), ``"method"`` (its own :meth:`stream`),
    or None: the whole answer of :meth:`generate` at once."""

    @property
    def model_id(self) -> str:
        """An identifier of the model behind this backend, recorded in every result."""
        return self.name

    def supports(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def score_yes_no(
        self, images: Sequence[Image.Image], questions: Sequence[str]
    ) -> Sequence[YesNoScore | NotJudged | Failed | None]:
        """P(Yes) for ``questions[i]`` about ``images[i]``; :class:`NotJudged` / :class:`Failed` otherwise.

        A Sequence (covariant), so a backend that never fails or never refuses says so in its own return type.
        """
        raise NotImplementedError(f"backend {self.name!r} cannot score yes/no questions")

    def score_prompts_yes_no(
        self, images: Sequence[Image.Image], prompts: Sequence[str]
    ) -> Sequence[YesNoScore | NotJudged | Failed | None]:
        """P(Yes) for ``prompts[i]`` about ``images[i]``, each prompt used exactly as written: nothing
        added (:meth:`score_yes_no` of a language model adds "Answer with Yes or No."), for a
        guard model asked in its own format (:mod:`icm.moderation.presets`). The default is
        :meth:`score_yes_no`, right for a backend that does not rewrite the question; the hf and
        openai backends override it."""
        return self.score_yes_no(images, prompts)

    def choose(
        self, images: Sequence[Image.Image], question: str, options: Sequence[str]
    ) -> Sequence[Choice | NotJudged | Failed | None]:
        """A distribution over ``options`` (labelled as :func:`~icm.policy.prompts_format.option_labels`) per image."""
        raise NotImplementedError(f"backend {self.name!r} cannot answer multiple-choice questions")

    def ask(self, images: Sequence[Image.Image], queries: Sequence[Query]) -> list[dict[str, Answer]]:
        """Ask every query about every image; one ``{query.key: answer}`` dict per image.

        The default asks query by query through :meth:`score_yes_no` and :meth:`choose`,
        skipping kinds the backend does not support (their answer is :class:`NotJudged`). Backends
        that can share work across the questions about one image (encode the image once,
        reuse its key/value cache) override this: it is the engine's hot path.
        """
        out: list[dict[str, Answer]] = [{} for _ in images]
        for q in queries:
            answers: list[Answer]
            if q.kind == "yes_no" and self.supports("score_yes_no"):
                answers = list(self.score_yes_no(images, [q.question] * len(images)))
            elif q.kind == "choice" and self.supports("choose"):
                answers = list(self.choose(images, q.question, list(q.options)))
            else:
                answers = [NotJudged("cannot-judge", f"the {self.name} backend cannot answer {q.kind} questions")] * len(images)
            for slot, answer in zip(out, answers, strict=True):
                slot[q.key] = answer
        return out

    def generate(
        self,
        images: Sequence[Image.Image],
        messages: Sequence[Sequence[Message]],
        *,
        max_new_tokens: int = 256,
    ) -> list[str | None]:
        """Free text for each (image, conversation) pair."""
        raise NotImplementedError(f"backend {self.name!r} cannot generate text")

    def stream(self, image: Image.Image, messages: Sequence[Message], on_token: Callable[[str], None], *, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float | None = None, seed: int | None = None) -> str:
        """The next assistant message, ``on_token`` called with each piece (when ``text_stream == "method"``)."""
        raise NotImplementedError(f"backend {self.name!r} cannot stream text")

    def bind_policy(self, policy: Policy, rules: RuleSet) -> Backend:
        """The backend the engine's Moderator of ``policy`` under ``rules`` asks: this one
        (the default), or a view bound to the pair (a guard-model preset asks about one
        policy and rule set in its own prompt format)."""
        return self

    def set_threads(self, threads: int) -> None:
        """Run this backend's models on ``threads`` CPU threads (the detector: its onnxruntime
        sessions and their pool; hf: torch). The default does nothing: a backend that runs no
        model here (openai) has none to set."""

    def use_policy(self, policy: Policy) -> None:  # an optional hook: the engine calls it with its policy
        """Take note of ``policy`` before judging queries about it (the detector reads its evidence section)."""

    def coverage(self, policy: Policy) -> dict[str, Coverage] | None:
        """What this backend can judge of ``policy`` here (see :mod:`icm.moderation.evidence.plan`),
        or None: it judges every question (a backend that reads the question text)."""
        return None

    def model_id_for(self, policy: Policy) -> str:
        """The model that judges ``policy`` here, as its records name it: :attr:`model_id` (the
        default), or the part of it that runs for this policy (the detector: its sources)."""
        return self.model_id

    def finish_record(
        self, rec: ModerationRecord, answers: dict[str, Answer], policy: Policy, rules: RuleSet
    ) -> ModerationRecord:
        """The engine's record of one image, finished from this backend's ``answers``: ``rec``
        unchanged (the default), or with more in it (a guard-model preset: its categories and rationale)."""
        return rec

    @property
    def last_errors(self) -> Sequence[ItemError]:
        """Why items of this thread's most recent call got ``None`` (one per failed item, by index):
        none by default (a backend that raises instead); the openai backend keeps each request's error."""
        return []

    def close(self) -> None:  # an optional hook: does nothing unless a backend holds resources
        """Release resources (HTTP clients, sessions)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unoffered_detail(offered: dict[str, float], stray: dict[str, float], min_label_mass: float) -> str | None:
    """Why letters a choice question did not offer void its answer, or ``None`` when they do not.

    ``offered`` and ``stray`` are the next-token probabilities of the offered option labels
    and of the other letters A-Z (see :data:`MAX_UNOFFERED_SHARE`). The detail names the
    letters not offered, most likely first: ``label not offered: A (p=0.31)``.
    """
    stray = {k: v for k, v in stray.items() if v > 0}
    if min_label_mass <= 0 or not stray:
        return None
    total_stray, total = sum(stray.values()), sum(stray.values()) + sum(offered.values())
    top_stray = max(stray.values())
    if top_stray <= max(offered.values(), default=0.0) and total_stray < MAX_UNOFFERED_SHARE * total:
        return None
    named = sorted(stray.items(), key=lambda kv: -kv[1])[:3]
    shown = ", ".join(f"{k} (p={v:.3g})" for k, v in named)
    return f"{UNOFFERED}: {shown}; offered {', '.join(offered)} hold p={sum(offered.values()):.3g}"
