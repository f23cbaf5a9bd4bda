"""The prompts of the guard-model presets, rendered from a policy and its rule set.

Each guard model was trained on one prompt format; a preset renders *our* policy in it:

* **LlavaGuard** (and QwenGuard, which shares its prompt): the default policy prompt of
  ``ml-research/LlavaGuard`` (README, "Safety Taxonomy"; the same text on the
  ``AIML-TUDA/LlavaGuard-*`` model cards, which send it as the user text after the image
  through the model's chat template). A preamble, one block per O-category
  (``O3: Sexual Content: `` then ``Should not:`` and ``Can:`` bullet lists), the
  "Assessment Steps" and a JSON template whose ``category`` lists the categories offered
  plus ``NA: None applying``. We render only the O-categories the policy maps: under
  ``Should not:`` the descriptions of the mapped products the rule set labels violate,
  under ``Can:`` those it allows.
* **ShieldGemma 2**: ``google/shieldgemma-2-4b-it`` takes one policy definition per
  prompt (``ShieldGemma2Processor(policies=..., custom_policies=...)`` in transformers);
  its chat template puts it between ``<BEGIN_SAFETY_POLICY>`` and ``</END_SAFETY_POLICY>``
  after the "You are a policy expert ..." preamble and ends with "Does the image violate
  the above policy? Your Answer must start with 'Yes' or 'No'." (the template text as the
  model's hosted demo logs it). The definitions follow the built-in ones
  (``DEFAULT_SHIELDGEMMA2_POLICIES``: ``"No Sexually Explicit content: The image shall not
  contain content that depicts ..."``): one per LlavaGuard category the policy maps, naming
  the products the rule set labels violate.
* **Llama Guard 4**: ``meta-llama/Llama-Guard-4-12B``'s chat template writes the task, the
  MLCommons hazard categories S1-S14 (``S1: Violent Crimes.``) between
  ``<BEGIN UNSAFE CONTENT CATEGORIES>`` and ``<END UNSAFE CONTENT CATEGORIES>``, the
  conversation, and asks for ``safe`` or ``unsafe`` with a comma-separated list of
  categories on a second line (llama.com, "Llama Guard 4" model card and prompt format,
  tokens ``<|begin_of_text|>``, ``<|header_start|>``/``<|header_end|>``, ``<|eot|>``, the
  image as ``<|image|>``; the task text is the one of the Llama Guard 3 prompt format
  page, which the Llama Guard 4 page says it keeps). The model judges the default
  categories; the preset sends the image alone and maps the S-codes of the reply onto the
  policy through its ``mlcommons`` mapping (:mod:`icm.policy.taxonomy`).
"""

from __future__ import annotations

from dataclasses import dataclass

from icm.policy.model import Policy, RuleSet
from icm.policy.taxonomy import SCHEMES

__all__ = [
    "LLAMA_GUARD_4_CATEGORIES",
    "LLAVAGUARD_PREAMBLE",
    "SHIELDGEMMA2_PREAMBLE",
    "CategoryRule",
    "category_rules",
    "llama_guard_4_prompt",
    "llavaguard_prompt",
    "shieldgemma2_policies",
    "shieldgemma2_prompt",
]

LLAVAGUARD_PREAMBLE = (
    "Provide a safety assessment for the content provided by the user. Determine compliance or violation against "
    "our safety policy by reviewing the following policy categories:"
)
LLAVAGUARD_STEPS = (
    "Assessment Steps:\n"
    '1. Select a safety "rating". This should be "Unsafe" if the content violates the safety policy; otherwise, '
    'it should be "Safe".\n'
    '2. Assign a policy "category". If none of the policy categories are applicable, select "NA: None applying".\n'
    '3. Provide a "rationale". Describe the user content and justify why it is considered safe or unsafe, referring '
    "to the specific policy category and its associated guidelines to illustrate any violations or compliance.\n"
    "To provide your assessment use the following json template:\n"
)
LLAVAGUARD_NA = "NA: None applying"

SHIELDGEMMA2_PREAMBLE = (
    "You are a policy expert trying to help determine whether a generated or real image is in violation of the "
    "safety policy below. Your decision must very clearly follow the specific language used in the safety policy "
    "and should not include any interpretation outside of the safety policy."
)
SHIELDGEMMA2_QUESTION = "Does the image violate the above policy? Your Answer must start with 'Yes' or 'No'."

LLAMA_GUARD_4_CATEGORIES: dict[str, str] = {
    **SCHEMES["mlcommons"], "S3": "Sex Crimes", "S4": "Child Exploitation", "S11": "Self-Harm",
}
"""The category names as Llama Guard's prompt spells them: the taxonomy's ``mlcommons`` titles
(the MLCommons hazard names) but for three the prompt format page spells shorter."""


@dataclass(frozen=True)
class CategoryRule:
    """One standard category of a policy under a rule set: what violates, what may be shown."""

    code: str
    title: str
    violating: tuple[str, ...]  # product ids the rule set labels violate
    allowed: tuple[str, ...]  # product ids it allows

    def should_not(self, policy: Policy) -> list[str]:
        return [_bullet(policy, pid) for pid in self.violating]

    def can(self, policy: Policy) -> list[str]:
        return [_bullet(policy, pid) for pid in self.allowed]


def _bullet(policy: Policy, pid: str) -> str:
    product = policy.product_map[pid]
    return (product.description or pid.replace("_", " ")).strip()


def category_rules(policy: Policy, rules: RuleSet, scheme: str) -> list[CategoryRule]:
    """The policy's categories of ``scheme`` in the scheme's order, each with its products
    split by the rule set's labels. Categories with no violating product are kept (their
    products are all allowed: the guard should find no violation there)."""
    labels = policy.labels(rules)
    mapped = policy.standard_categories.get(scheme, {})
    out = []
    for code, title in SCHEMES[scheme].items():
        ids = mapped.get(code)
        if not ids:
            continue
        out.append(
            CategoryRule(
                code=code,
                title=title,
                violating=tuple(p for p in ids if labels[p].violates),
                allowed=tuple(p for p in ids if not labels[p].violates),
            )
        )
    return out


def llavaguard_prompt(policy: Policy, rules: RuleSet) -> str:
    """The user text of a LlavaGuard / QwenGuard request for ``policy`` under ``rules``."""
    cats = category_rules(policy, rules, "llavaguard")
    if not cats:
        raise ValueError(f"policy {policy.name!r} maps no LlavaGuard category (O1-O9): the llavaguard preset cannot judge it")
    labels = policy.labels(rules)
    in_scheme = {p for c in cats for p in (*c.violating, *c.allowed)}
    # what the rule set allows and no category maps ("a normal outfit"): shown as "Can:" where a category allows nothing
    elsewhere = list(dict.fromkeys(
        _bullet(policy, p.id) for p in policy.products if p.id not in in_scheme and not labels[p.id].violates
    ))
    blocks = []
    for c in cats:
        lines = [f"{c.code}: {c.title}: ", "Should not:"]
        lines += [f"- {b}" for b in c.should_not(policy)] or ["- (nothing in this category violates under these rules)"]
        lines.append("Can:")
        lines += [f"- {b}" for b in (c.can(policy) or elsewhere)] or ["- (only what is not listed above)"]
        blocks.append("\n".join(lines))
    names = "|".join(f'"{c.code}: {c.title}"' for c in cats) + f'|"{LLAVAGUARD_NA}"'
    template = "{\n" + '    "rating": str<"Unsafe"|"Safe">,\n' + f"    \"category\": str<{names}>,\n" + '    "rationale": str,\n}\n'
    return f"\n{LLAVAGUARD_PREAMBLE}\n" + "\n\n".join(blocks) + "\n\n" + LLAVAGUARD_STEPS + template


def shieldgemma2_policies(policy: Policy, rules: RuleSet) -> dict[str, str]:
    """One ShieldGemma 2 policy definition per LlavaGuard category the policy maps with a
    product the rule set labels violate: ``{"O3": "No Sexual Content: The image shall not
    contain content that ..."}``."""
    out = {}
    for c in category_rules(policy, rules, "llavaguard"):
        if not c.violating:
            continue
        shown = "; ".join(b.rstrip(".") for b in c.should_not(policy))
        out[c.code] = f"No {c.title}: The image shall not contain content that matches any of these descriptions: {shown}."
    if not out:
        raise ValueError(
            f"policy {policy.name!r} under rule set {rules.name!r} has no violating product in a LlavaGuard category: "
            "the shieldgemma2 preset has nothing to ask"
        )
    return out


def shieldgemma2_prompt(definition: str) -> str:
    """The whole text ShieldGemma 2's chat template builds around one policy definition (the
    user turn after the image); for the tests and the manual, the definition is what is sent."""
    return f"{SHIELDGEMMA2_PREAMBLE}\n<BEGIN_SAFETY_POLICY>\n{definition}\n</END_SAFETY_POLICY>\n{SHIELDGEMMA2_QUESTION}"


def llama_guard_4_prompt(image_token: str = "<|image|>") -> str:
    """The generation prompt Llama Guard 4's chat template renders for one user turn holding
    only an image (default categories S1-S14), special tokens included."""
    cats = "\n".join(f"{code}: {name}." for code, name in LLAMA_GUARD_4_CATEGORIES.items())
    return (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\n"
        "Task: Check if there is unsafe content in 'User' messages in conversations according to our safety policy "
        "with the below categories.\n\n"
        f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{cats}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
        f"<BEGIN CONVERSATION>\n\nUser: {image_token}\n\n<END CONVERSATION>\n\n"
        "Provide your safety assessment for ONLY THE LAST User message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories."
        "<|eot|><|header_start|>assistant<|header_end|>\n\n"
    )
