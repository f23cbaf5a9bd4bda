"""What ``icm data generate`` asks and how it reads the answers, without sending anything:
the conversations of each stage, the Q-A prompt, the ``--dry-run`` plan
(:func:`plan_prompts`) and the split of the paper's multi-question answer into its three
parts (:func:`split_combined_answer`)."""

from __future__ import annotations

import re
from collections import Counter

from pydantic import BaseModel

from icm.data.generate_config import GenerateConfig, Mode
from icm.data.inputs import load_samples
from icm.policy import Policy, load_policy
from icm.policy.prompts import StagePrompts, qa_generation_prompt, stage_prompts

__all__ = ["PromptPlan", "plan_prompts", "qa_prompt", "split_combined_answer", "stage_conversations"]

# --------------------------------------------------------------------------- the combined answer

_SECTION_NAMES = (
    r"explicit(?:\s+content)?",
    r"implicit(?:\s+content)?",
    r"(?:explanation|verdict|moderation|conclusion|assessment|judg(?:e)?ment|reason(?:ing)?|why|is the image\b[^\n:]*)",
)


def _marker(n: int) -> re.Pattern[str]:
    return re.compile(
        rf"(?:^|\n)[ \t]*(?:#{{1,6}}[ \t]*)?(?:\*\*|__)?[ \t]*(?:(?:question|part|step|q)[ \t]*)?{n}[ \t]*[\.\):](?!\d)",
        re.IGNORECASE,
    )


def _named(i: int) -> re.Pattern[str]:
    return re.compile(
        rf"(?:^|\n)[ \t]*(?:#{{1,6}}[ \t]*)?(?:\*\*|__)?[ \t]*(?:{_SECTION_NAMES[i]})[^\n]{{0,40}}?(?::|\*\*|__|\n)",
        re.IGNORECASE,
    )


_LABEL = re.compile(
    r"^\s*(?:\*\*|__)?\s*(?:explicit|implicit|explanation|verdict|moderation|conclusion|assessment|reason(?:ing)?)"
    r"[^:\n]{0,30}:\s*(?:\*\*|__)?\s*",
    re.IGNORECASE,
)


def _clean_section(s: str) -> str:
    s = s.strip().lstrip("*_# \t")
    s = _LABEL.sub("", s, count=1)
    s = re.sub(r"^(?:\*\*|__)\s*", "", s)
    lines = s.split("\n")
    # an echoed question on its own line ("Explicit content: what is visibly ...?")
    if len(lines) > 1 and lines[0].strip().rstrip("*_: ").endswith("?"):
        s = "\n".join(lines[1:])
    return s.strip().strip("*_").strip()


def split_combined_answer(text: str) -> tuple[str, str, str] | None:
    """Explicit content, implicit content and explanation from the multi-question answer.

    Finds the parts by their numbers ("1.", "**2)**", "### 3:", "Question 3.") or by
    their names ("Explicit content:", "**Implicit content**"), else takes exactly three
    paragraphs. None when none of these splits it into three non-empty parts.
    """
    t = (text or "").replace("\r\n", "\n").strip()
    if not t:
        return None
    for finder in (_marker, _named):
        starts: list[tuple[int, int]] = []
        pos = 0
        for i in range(3):
            m = finder(i + 1 if finder is _marker else i).search(t, pos)
            if not m:
                break
            starts.append((m.start(), m.end()))
            pos = m.end()
        if len(starts) == 3:
            parts = []
            for i, (_, end) in enumerate(starts):
                stop = starts[i + 1][0] if i + 1 < 3 else len(t)
                parts.append(_clean_section(t[end:stop]))
            if all(parts):
                return parts[0], parts[1], parts[2]
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", t) if p.strip()]
    if len(paragraphs) == 3:
        parts = [_clean_section(p) for p in paragraphs]
        if all(parts):
            return parts[0], parts[1], parts[2]
    return None


# --------------------------------------------------------------------------- prompts


class PromptPlan(BaseModel):
    """What a dry run prints: the prompts of each product the inputs use."""

    inputs: int
    input_errors: list[dict[str, str]]
    products: dict[str, int]
    mode: Mode
    stages: list[StagePrompts]
    qa_prompt: str | None
    requests_per_image: int


def stage_conversations(mode: Mode, p: StagePrompts) -> dict[str, list[dict[str, str]]]:
    if mode == "combined":
        return {"combined": [{"role": "user", "content": p.combined}]}
    return {
        "explicit": [{"role": "user", "content": p.explicit}],
        "implicit": [{"role": "user", "content": p.implicit}],
        "explanation": [{"role": "user", "content": p.explanation}],
    }


def qa_prompt(policy: Policy, c: GenerateConfig, explanation: str) -> str:
    return qa_generation_prompt(policy, explanation, n_yes_no=c.n_yes_no, n_choice=c.n_choice, n_what=c.n_what, n_how=c.n_how)


def plan_prompts(config: GenerateConfig) -> PromptPlan:
    """The prompts a run would send, without sending anything (``--dry-run``)."""
    policy = load_policy(config.policy)
    samples, errors = load_samples(config.inputs, policy)
    if config.limit is not None:
        samples = samples[: config.limit]
    products = Counter(s.product.id for s in samples)
    stages = [stage_prompts(policy, pid) for pid in products]
    qa = qa_prompt(policy, config, "<the explanation written by the MLLM>") if config.qa else None
    per_image = (1 if config.mode == "combined" else 3) + (1 if config.qa else 0)
    return PromptPlan(
        inputs=len(samples),
        input_errors=[{"origin": e.origin, "error": e.error} for e in errors],
        products=dict(products),
        mode=config.mode,
        stages=stages,
        qa_prompt=qa,
        requests_per_image=per_image,
    )
