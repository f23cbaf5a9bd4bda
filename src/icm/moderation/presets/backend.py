"""A guard model behind icm's policy, records and service: the preset backend.

:class:`PresetBackend` wraps an hf or openai backend serving LlavaGuard / QwenGuard,
ShieldGemma 2 or Llama Guard 4. The engine asks it the policy's questions as it asks any
backend; it answers the term question from the guard's verdict about the policy's own
categories and leaves the attribute questions unanswered (``cannot-judge``: a guard names
categories, not attribute values). The rule set then decides from P(term) alone, as for any
backend that answered only the term, and :meth:`PresetBackend.finish_record` writes the
guard's categories (in its own scheme and, through the policy's products, in the others),
its rationale as the record's explanation and its reply in the notes.

How much a verdict read from text weighs: a guard that writes its verdict (LlavaGuard's
JSON, Llama Guard's ``safe``/``unsafe``) is one sampled answer, counted at the backend's
text confidence (``--text-confidence``, default 0.75, on either backend), as
every answer read from text is (docs/verdicts.md). ShieldGemma 2's P(Yes) is measured:
the Yes/No next-token probabilities (hf: logits; openai: logprobs, else the text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image

from icm.moderation.backends.base import DEFAULT_TEXT_CONFIDENCE, Answer, Backend, Failed, NotJudged, Query, YesNoScore
from icm.moderation.presets import calls
from icm.moderation.presets.formats import category_rules, llavaguard_prompt, shieldgemma2_policies
from icm.moderation.presets.replies import GuardReply, read_llama_guard, read_llavaguard
from icm.policy.model import Policy, RuleSet
from icm.policy.taxonomy import SCHEMES, flagged_categories

if TYPE_CHECKING:
    from icm.moderation.record import ModerationRecord

__all__ = ["NATIVE_SCHEME", "PRESET_NAMES", "PresetBackend", "PresetName"]

PresetName = Literal["llavaguard", "shieldgemma2", "llama-guard-4"]
PRESET_NAMES: tuple[str, ...] = ("llavaguard", "shieldgemma2", "llama-guard-4")
NATIVE_SCHEME = {"llavaguard": "llavaguard", "shieldgemma2": "llavaguard", "llama-guard-4": "mlcommons"}
"""The category scheme each guard answers in (ShieldGemma 2 is asked one LlavaGuard category at a time)."""

MAX_NEW_TOKENS = {"llavaguard": 512, "llama-guard-4": 20}


@dataclass
class _Outcome:
    """What the guard said about one image under one policy."""

    answer: YesNoScore | NotJudged | Failed
    native: dict[str, float] = field(default_factory=dict)
    said: str = ""
    rationale: str | None = None
    note: str | None = None


class PresetBackend(Backend):
    """A guard model (``preset``) served by ``inner`` (an hf or openai backend)."""

    merges_policies = False  # one prompt per policy: the guard's prompt is the policy

    def __init__(self, inner: Backend, preset: str, *, text_confidence: float | None = None) -> None:
        if preset not in PRESET_NAMES:
            raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESET_NAMES)})")
        self.inner = inner
        self.preset = preset
        self.name = inner.name
        self.capabilities = frozenset()  # no free questions: the guard answers only in its own format (ask)
        if text_confidence is None:
            text_confidence = getattr(inner, "text_confidence", DEFAULT_TEXT_CONFIDENCE)
        self.text_confidence = float(text_confidence)
        self._bound: tuple[Policy, RuleSet] | None = None
        self._cannot: str | None = None

    @property
    def model_id(self) -> str:
        return f"{self.inner.model_id} (preset {self.preset})"

    def close(self) -> None:
        self.inner.close()

    def set_threads(self, threads: int) -> None:
        self.inner.set_threads(threads)

    # -- the engine's hooks ---------------------------------------------------------------

    def bind_policy(self, policy: Policy, rules: RuleSet) -> PresetBackend:
        """This guard (the same model) asked about ``policy`` under ``rules``: the engine's
        Moderator of that pair asks it. A policy the guard cannot judge (it maps none of the
        guard's categories: a bundle's gambling member) gets ``cannot-judge`` for every image,
        so its records go to review with the reason, and the bundle's other members run."""
        view = PresetBackend(self.inner, self.preset, text_confidence=self.text_confidence)
        view._bound = (policy, rules)
        try:
            if self.preset == "llavaguard":
                llavaguard_prompt(policy, rules)
            elif self.preset == "shieldgemma2":
                shieldgemma2_policies(policy, rules)
            elif not category_rules(policy, rules, "mlcommons"):
                raise ValueError(f"policy {policy.name!r} maps no MLCommons hazard (S1-S14): the llama-guard-4 preset cannot judge it")
        except ValueError as exc:
            view._cannot = str(exc)
        return view

    def ask(self, images: Sequence[Image.Image], queries: Sequence[Query]) -> list[dict[str, Answer]]:
        if self._bound is None:
            raise ValueError(f"the {self.preset} preset asks about one policy and rule set: bind_policy() first")
        policy, rules = self._bound
        term = next((q for q in queries if q.kind == "yes_no" and q.term == policy.term.id), None)
        outcomes = self._judge(policy, rules, images)
        out: list[dict[str, Answer]] = []
        for o in outcomes:
            slot: dict[str, Answer] = {}
            for q in queries:
                if q is term:
                    o.answer.raw["preset"] = {
                        "preset": self.preset, "scheme": NATIVE_SCHEME[self.preset], "native": o.native,
                        "said": o.said, "rationale": o.rationale, "note": o.note,
                    }
                    slot[q.key] = o.answer
                else:
                    slot[q.key] = NotJudged("cannot-judge", f"the {self.preset} preset names categories, not attribute values")
            out.append(slot)
        return out

    def finish_record(self, rec: ModerationRecord, answers: dict[str, Answer], policy: Policy, rules: RuleSet) -> ModerationRecord:
        """Put the guard's categories, rationale and reply into the engine's record."""
        ans = answers.get(f"term:{policy.term.id}")
        info = getattr(ans, "raw", {}).get("preset") if ans is not None else None
        if not info:
            return rec
        rec.notes.append(f"preset {self.preset}: the guard said {info['said'][:300]!r}")
        if info.get("note"):
            rec.notes.append(info["note"])
        if isinstance(ans, YesNoScore):
            scores = _all_schemes(policy, rules, info["scheme"], info["native"])
            rec.category_scores = scores
            rec.flagged_categories = flagged_categories(scores, rules.thresholds.review)
            rec.explanation = info.get("rationale") or rec.explanation
            short = " ".join(str(info["said"]).split())
            short = short if len(short) <= 100 else short[:97] + "..."
            rec.reason = f"The {self.preset} guard said {short!r}. " + (rec.reason or "")
        else:  # not read: never passed as clean in any category the policy maps
            rec.category_scores = {}
            rec.flagged_categories = {s: list(c) for s, c in policy.standard_categories.items()}
            if rec.verdict == "allow":
                rec.verdict = "review"
        return rec

    # -- the guards -------------------------------------------------------------------------

    def _judge(self, policy: Policy, rules: RuleSet, images: Sequence[Image.Image]) -> list[_Outcome]:
        if self._cannot is not None:
            return [_Outcome(NotJudged("cannot-judge", self._cannot), said="(not asked)") for _ in images]
        if self.preset == "shieldgemma2":
            return self._shieldgemma2(policy, rules, images)
        if self.preset == "llavaguard":
            cats = category_rules(policy, rules, "llavaguard")
            texts = calls.generate(self.inner, images, llavaguard_prompt(policy, rules), MAX_NEW_TOKENS["llavaguard"])
            offered = [c.code for c in cats]
            return [self._from_reply(t, lambda s: read_llavaguard(s, offered), cats) for t in texts]
        cats = category_rules(policy, rules, "mlcommons")
        texts = calls.generate(self.inner, images, "", MAX_NEW_TOKENS["llama-guard-4"])  # the template writes the task
        return [self._from_reply(t, read_llama_guard, cats) for t in texts]

    def _from_reply(self, text: str | Failed, read: Any, cats: list) -> _Outcome:
        if isinstance(text, Failed):
            return _Outcome(text)
        reply: GuardReply = read(text)
        if not reply.ok:
            return _Outcome(NotJudged(reply.problem or "off-format", reply.detail, raw={"text": text}), said=text)
        tc = self.text_confidence
        violating = [c.code for c in cats if c.violating]
        # a "Safe" rating may still name the category it considered (LlavaGuard does): only an unsafe one counts
        named = [c for c in reply.categories if c in violating] if reply.unsafe else []
        note = None
        if reply.unsafe and not reply.categories:
            named = violating
            note = f"preset {self.preset}: unsafe without a category: every category of the policy that can violate counts"
        elif reply.unsafe and not named:
            note = (f"preset {self.preset}: unsafe in {', '.join(reply.categories)}, which this policy does not map "
                    "to a product its rule set labels violate: not a violation of this policy")
        p = tc if named else 1.0 - tc
        native = {c.code: (tc if c.code in named else 1.0 - tc) if c.violating else 0.0 for c in cats}
        return _Outcome(YesNoScore(p, source="text", raw={"text": text}), native, text, reply.rationale, note)

    def _shieldgemma2(self, policy: Policy, rules: RuleSet, images: Sequence[Image.Image]) -> list[_Outcome]:
        defs = shieldgemma2_policies(policy, rules)
        per_cat = {code: calls.yes_no_as_is(self.inner, images, [text] * len(images)) for code, text in defs.items()}
        out = []
        for i in range(len(images)):
            answers = {code: a[i] for code, a in per_cat.items()}
            said = ", ".join(f"{c}: " + (f"P(Yes)={a.p_yes:.3g}" if isinstance(a, YesNoScore) else _why(a)) for c, a in answers.items())
            failed = next((a for a in answers.values() if isinstance(a, Failed)), None)
            if failed is not None:
                out.append(_Outcome(failed, said=said))
                continue
            unread = {c: a for c, a in answers.items() if not isinstance(a, YesNoScore)}
            if unread:
                c, a = next(iter(unread.items()))
                nj = a if isinstance(a, NotJudged) else NotJudged("cannot-judge")
                out.append(_Outcome(NotJudged(nj.reason, f"{c}: {nj.detail}", raw=dict(nj.raw)), said=said))
                continue
            scores = {c: float(a.p_yes) for c, a in answers.items() if isinstance(a, YesNoScore)}
            sources = {a.source for a in answers.values() if isinstance(a, YesNoScore)}
            best = max(scores, key=lambda c: scores[c])
            native = {c.code: scores.get(c.code, 0.0) for c in category_rules(policy, rules, "llavaguard")}
            answer = YesNoScore(scores[best], source=sources.pop() if len(sources) == 1 else "mixed", raw={"per_category": scores})
            out.append(_Outcome(answer, native, said))
        return out


def _why(a: object) -> str:
    if isinstance(a, NotJudged):
        return a.describe()
    if isinstance(a, Failed):
        return f"failed: {a.error}"
    return "no answer"


def _all_schemes(policy: Policy, rules: RuleSet, native_scheme: str, native: dict[str, float]) -> dict[str, dict[str, float]]:
    """The guard's category scores in every scheme the policy maps.

    A category of another scheme takes the highest score of the guard's categories that
    share a product the rule set labels violate with it (0 when none can violate).
    """
    labels = policy.labels(rules)
    mapped = policy.standard_categories
    native_products = {code: {p for p in mapped.get(native_scheme, {}).get(code, []) if labels[p].violates} for code in native}
    floor = min(native.values(), default=0.0)
    out: dict[str, dict[str, float]] = {}
    for scheme, cats in mapped.items():
        row: dict[str, float] = {}
        for cat in (c for c in SCHEMES[scheme] if c in cats):  # the scheme's own order
            viol = {p for p in cats[cat] if labels[p].violates}
            if scheme == native_scheme and cat in native:
                row[cat] = native[cat]
            elif not viol:
                row[cat] = 0.0
            else:
                shared = [native[c] for c, ps in native_products.items() if ps & viol]
                row[cat] = max(shared) if shared else floor
        out[scheme] = row
    return out
