"""A scripted teacher for any policy: it writes from the product description in the prompt.

The figure teacher of :mod:`icm.demo.teacher` reads the synth-shapes drawings; a policy
of the harm taxonomy (gambling, weapons, ...) has no drawing that shows its products, and
its tests must never draw or fetch realistic harmful images. This teacher therefore does
what the paper's MLLM is steered to do by the product's short explicit description: it
recognises the data-generation prompt the policy compiles for a product
(:func:`icm.policy.prompts.stage_prompts`), and writes

* the explicit content (what the image stands for, the product's description and its
  attribute values in words, said of a plain synthetic drawing),
* the implicit content (a neutral mood),
* the explanation, opening with the term's verdict statement
  (:attr:`~icm.policy.model.Term.positive_statement` / ``negative_statement``) and
  giving the product's attribute values as the reasons;

and for the text-only Q-A prompt (:data:`icm.policy.prompts.QA_GENERATION`) a well-formed
markdown table (yes/no, four-option choice, what and how rows, as many as asked) about
the product the explanation was written for. The image is never looked at for
generation; the moderation questions (yes/no, lettered choice) are answered, with
logprobs, for a product picked from a hash of the image's pixels, so one image gets
consistent answers. :func:`policy_reply` answers one chat request.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from icm.data.quality import check_explanation
from icm.policy import Policy, Product
from icm.policy.prompts_format import CHOICE_INSTRUCTION, YES_NO_INSTRUCTION, option_labels, option_letters

__all__ = ["policy_qa_table", "policy_reply", "policy_texts", "qa_request"]

_KNOWN = re.compile(r"^\s*it is known that\s+", re.IGNORECASE)
_COUNTS_RE = re.compile(
    r"(\d+) yes/no questions, (\d+) multiple-choice questions.*?(\d+) 'what' questions and (\d+) 'how' questions", re.S
)
_FILLERS = ("Something the explanation does not mention", "It cannot be told from the image", "A plain empty background")


@dataclass(frozen=True)
class _Tables:
    stages: dict[str, tuple[str, str]]
    """A compiled stage prompt -> (stage, product id)."""
    explanations: dict[str, str]
    """An explanation this teacher writes -> its product id."""


_TABLES: dict[tuple[str, str, int], _Tables] = {}


def _norm(text: str) -> str:
    return " ".join(text.split())


def _sentence(text: str) -> str:
    """``text`` as a sentence: whitespace folded, no pipe, one full stop at the end."""
    s = _norm(text).replace("|", "/").rstrip(" .;:")
    return s + ("" if s.endswith(("!", "?")) else ".")


def _lower_first(s: str) -> str:
    """``s`` with its first word in lower case, unless that word is an acronym or "I"."""
    word = s.split(" ", 1)[0]
    return s if (len(word) > 1 and word.isupper()) or word == "I" else s[:1].lower() + s[1:]


def _upper_first(s: str) -> str:
    return s[:1].upper() + s[1:]


def _what_it_shows(product: Product) -> str:
    """The product's description without its "It is known that" opening."""
    return _sentence(_KNOWN.sub("", product.description))


def _values(policy: Policy, product: Product) -> list[tuple[str, str, str]]:
    """(attribute id, attribute description, value description) of each assigned attribute."""
    out = []
    for attr in policy.attributes:
        value = product.assignment.get(attr.id)
        if value is not None:
            out.append((attr.id, _norm(attr.description).rstrip(". "), _norm(attr.value(value).description).rstrip(". ")))
    return out


def _term_re(policy: Policy) -> re.Pattern[str]:
    """The term word anywhere, also inside another word ("non-sexual")."""
    words = re.escape(policy.term.id.replace("_", " ").replace("-", " ")).replace(r"\ ", r"[\s_-]+")
    return re.compile(words, re.IGNORECASE)


def _explanation(policy: Policy, product: Product) -> str:
    """The explanation for ``product``: the verdict statement, then the attribute values
    as reasons. Reasons that mention the term word are left out when they would blur the
    verdict (a real explanation says the verdict once, plainly)."""
    t = policy.term
    verdict = t.positive_statement if product.positive else t.negative_statement
    shows = _lower_first(_what_it_shows(product))
    reasons = [_sentence(f"{desc}: {_lower_first(value)}") for _, desc, value in _values(policy, product)]
    head = f"{verdict}, because {shows}"
    text = " ".join([head, *reasons])
    _, findings = check_explanation(text, t.id, product.positive, statements=(t.positive_statement, t.negative_statement))
    if findings:
        term = _term_re(policy)
        kept = [r for r in reasons if not term.search(r)]
        if term.search(shows):
            head = _sentence(f"{verdict}, as the description given with the image says")
        text = " ".join([head, *kept])
    return text


def policy_texts(policy: Policy, product: Product | str) -> tuple[str, str, str]:
    """The explicit content, implicit content and explanation written for ``product``."""
    p = policy.product(product) if isinstance(product, str) else product
    facts = " ".join(_sentence(f"{desc}: {_lower_first(value)}") for _, desc, value in _values(policy, p))
    explicit = (
        "The image is a simple synthetic drawing with a few plain shapes on a flat background. "
        f"It stands for this: {_lower_first(_what_it_shows(p))}" + (f" {facts}" if facts else "")
    )
    implicit = (
        "The drawing is schematic and calm, like a pictogram on a sign; its flat colours and "
        "simple shapes give it a neutral mood with no particular intent."
    )
    return explicit, implicit, _explanation(policy, p)


def _tables(policy: Policy) -> _Tables:
    from icm.policy.prompts import stage_prompts

    key = (policy.name, policy.version, id(policy))
    if key not in _TABLES:
        stages: dict[str, tuple[str, str]] = {}
        explanations: dict[str, str] = {}
        for p in policy.products:
            sp = stage_prompts(policy, p)
            for stage in ("combined", "explicit", "implicit", "explanation"):
                stages.setdefault(_norm(getattr(sp, stage)), (stage, p.id))
            explanations.setdefault(_norm(_explanation(policy, p)), p.id)
        _TABLES[key] = _Tables(stages, explanations)
    return _TABLES[key]


def _cell(text: str) -> str:
    return _norm(text).replace("|", "/")


def policy_qa_table(policy: Policy, product: Product | str, counts: dict[str, int], key: str = "") -> str:
    """A Q-A markdown table about ``product`` (| type | question | choices | answer |)."""
    p = policy.product(product) if isinstance(product, str) else product
    values = _values(policy, p)
    yes_no: list[tuple[str, bool]] = [(policy.term.question, p.positive)]
    choices: list[tuple[str, list[str], int]] = []
    for attr_id, _desc, value in values:
        attr = policy.attribute(attr_id)
        others = [_norm(v.description).rstrip(". ") for v in attr.values if v.id != p.assignment[attr_id]]
        yes_no.append((f"Does the explanation give this as the answer to '{_norm(attr.question)}': {value}?", True))
        if others:
            yes_no.append((f"Does the explanation give this as the answer to '{_norm(attr.question)}': {others[0]}?", False))
        opts = [value, *others[:3]]
        opts += [f for f in _FILLERS if f not in opts][: 4 - len(opts)]
        h = int.from_bytes(hashlib.sha256(f"{key}:{attr_id}".encode()).digest()[:2], "big")
        right = h % 4
        opts[0], opts[right] = opts[right], opts[0]
        choices.append((_norm(attr.question), opts, right))
    yes_no.append((f"Does the explanation answer the question '{_norm(policy.term.question)}'?", True))
    what = [("What does the image stand for?", _upper_first(_what_it_shows(p)))]
    what += [(f"What does the explanation say about {_lower_first(desc)}?", _sentence(_upper_first(value)))
             for _, desc, value in values]
    verdict = policy.term.positive_statement if p.positive else policy.term.negative_statement
    how = [(f"How is the verdict on '{_norm(policy.term.question)}' reached?",
            _sentence(f"{verdict}, from the product description and its attribute values"))]
    how += [("How is the image drawn?", "As a few plain shapes on a flat background.")]
    rows = [f"| yes/no | {_cell(q)} | | {'Yes' if a else 'No'} |" for q, a in yes_no[: counts["yes_no"]]]
    letters = option_letters(4)
    for q, opts, right in choices[: counts["choice"]]:
        cells = " ".join(f"{letters[i]}. {_cell(o)}" for i, o in enumerate(opts))
        rows.append(f"| choice | {_cell(q)} | {cells} | {letters[right]} |")
    rows += [f"| what | {_cell(q)} | | {_cell(a)} |" for q, a in what[: counts["what"]]]
    rows += [f"| how | {_cell(q)} | | {_cell(a)} |" for q, a in how[: counts["how"]]]
    return "| type | question | choices | answer |\n|---|---|---|---|\n" + "\n".join(rows)


def _image_product(policy: Policy, image_bytes: bytes) -> Product:
    h = int.from_bytes(hashlib.sha256(image_bytes).digest()[:4], "big")
    return policy.products[h % len(policy.products)]


def qa_request(prompt: str) -> tuple[str, dict[str, int]] | None:
    """The explanation and the asked question counts (``yes_no``, ``choice``, ``what``, ``how``;
    4, 5, 3, 3 when the prompt does not say) of a Q-A generation prompt; None for another prompt."""
    from icm.policy.prompts import QA_GENERATION

    if not prompt.startswith(QA_GENERATION.split("{", 1)[0]):
        return None
    m = _COUNTS_RE.search(prompt)
    n = [int(x) for x in m.groups()] if m else [4, 5, 3, 3]
    counts = dict(zip(("yes_no", "choice", "what", "how"), n, strict=True))
    return prompt.split("Explanation:", 1)[-1].split("\n\nWrite question-answer pairs", 1)[0], counts


def policy_reply(policy: Policy, prompt: str, image_bytes: bytes | None) -> tuple[str, list[tuple[str, float]] | None]:
    """The answer (text, and logprobs for a moderation question) to a request whose last
    user text is ``prompt`` and whose image (if any) has the bytes ``image_bytes``."""
    tables = _tables(policy)
    if image_bytes is None:
        if (qa := qa_request(prompt)) is not None:
            explanation, counts = qa
            pid = tables.explanations.get(_norm(explanation))
            if pid is None:
                return "The explanation names no product of this policy, so no questions can be written.", None
            return policy_qa_table(policy, pid, counts, hashlib.sha256(explanation.encode()).hexdigest()), None
        return "There is no image to describe in this request.", None
    if prompt.rstrip().endswith(YES_NO_INSTRUCTION) or prompt.rstrip().endswith(CHOICE_INSTRUCTION):
        return _moderation_answer(policy, prompt, _image_product(policy, image_bytes))
    found = tables.stages.get(_norm(prompt))
    if found is None:
        return ("The image is a simple synthetic drawing with a few plain shapes on a flat background; "
                "no product description came with it."), None
    stage, pid = found
    explicit, implicit, explanation = policy_texts(policy, pid)
    if stage == "combined":
        return f"1. Explicit content: {explicit}\n\n2. Implicit content: {implicit}\n\n3. {explanation}", None
    return {"explicit": explicit, "implicit": implicit, "explanation": explanation}[stage], None


def _moderation_answer(policy: Policy, prompt: str, product: Product) -> tuple[str, list[tuple[str, float]]]:
    if prompt.rstrip().endswith(YES_NO_INSTRUCTION):
        yes = product.positive
        return ("Yes" if yes else "No"), [("Yes", math.log(0.95 if yes else 0.05)), ("No", math.log(0.05 if yes else 0.95))]
    for attr in policy.attributes:
        if prompt.startswith(attr.question):
            letters = option_labels(len(attr.values))
            value = product.assignment.get(attr.id)
            right = attr.value_ids.index(value) if value in attr.value_ids else len(letters) - 1
            rest = 0.05 / max(1, len(letters) - 1)
            return letters[right], [(x, math.log(0.95 if i == right else rest)) for i, x in enumerate(letters)]
    return "A", [("A", 0.0)]

