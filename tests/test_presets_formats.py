"""The guard prompts, string for string against the formats their publishers document.

LlavaGuard: a policy whose products are the bullets of LlavaGuard's default O3 and O4
categories (``ml-research/LlavaGuard`` README, "Safety Taxonomy"; "Should not" ones violate,
"Can" ones are allowed) renders to exactly that README's prompt cut to those two categories.
Llama Guard 4 and ShieldGemma 2 prompts are checked token by token on tiny models in
tests/test_presets_hf.py; here their replies' reading.
"""

from __future__ import annotations

import pytest

from icm.moderation.presets.formats import llama_guard_4_prompt, llavaguard_prompt, shieldgemma2_policies
from icm.moderation.presets.replies import read_llama_guard, read_llavaguard
from icm.policy.loader import parse_policy

# ml-research/LlavaGuard README, the default policy prompt: the preamble, O3, O4, the steps.
README_PREAMBLE = (
    "\nProvide a safety assessment for the content provided by the user. Determine compliance or violation against our "
    "safety policy by reviewing the following policy categories:\n"
)
README_O3 = "\n".join([
    "O3: Sexual Content: ",  # the README's trailing space after each category title
    "Should not:",
    "- Contain sexually explicit (i.e., erotic) content.",
    "Can:",
    "- Contain content that is related to sexuality and sexual education.",
    "- Provide general information regarding sexual activities.",
    "- Provide guidance on topics related to sexual health.",
    "- Contain content of people in a loving and affectionate manner if it is not sexually explicit content.",
])
README_O4 = "\n".join([
    "O4: Nudity Content: ",
    "Should not:",
    "- Contain visible genitalia (e.g., exposed breast, nipple, vagina, vulva, or penis) or explicit nudity content. ",
    "Can:",
    "- Contain artistic nudity if the content does not include visible genitalia.",
    "- Contain educational content and general information on the human body.",
    "- Provide guidance on topics related to sexual health.",
])
README_STEPS = "\n".join([
    "Assessment Steps:",
    '1. Select a safety "rating". This should be "Unsafe" if the content violates the safety policy; otherwise, it '
    'should be "Safe".',
    '2. Assign a policy "category". If none of the policy categories are applicable, select "NA: None applying".',
    '3. Provide a "rationale". Describe the user content and justify why it is considered safe or unsafe, referring to '
    "the specific policy category and its associated guidelines to illustrate any violations or compliance.",
    "To provide your assessment use the following json template:",
    "{",
    '    "rating": str<"Unsafe"|"Safe">,',
    '    "category": str<"O3: Sexual Content"|"O4: Nudity Content"|"NA: None applying">,',
    '    "rationale": str,',
    "}",
    "",
])


def _bullets(block: str) -> tuple[list[str], list[str]]:
    lines = block.splitlines()
    can = lines.index("Can:")
    return [x[2:].strip() for x in lines[2:can]], [x[2:] for x in lines[can + 1 :]]


def readme_policy() -> str:
    values, products, maps, allow = [], [], {"O3": [], "O4": []}, []
    for code, block in (("O3", README_O3), ("O4", README_O4)):
        should_not, can = _bullets(block)
        for kind, texts in (("no", should_not), ("can", can)):
            for i, text in enumerate(texts):
                pid = f"{code.lower()}_{kind}{i}"
                values.append(f"      - {{id: {pid}, description: {pid}}}")
                products.append(f"  - {{id: {pid}, assignment: {{kind: {pid}}}, description: {text!r}}}")
                maps[code].append(pid)
                if kind == "can":
                    allow.append(pid)
    return "\n".join([
        "name: readme",
        'term: {id: unsafe, question: "Is the image unsafe?"}',
        "attributes:",
        "  - id: kind",
        '    question: "Which?"',
        "    values:",
        *values,
        "products:",
        *products,
        "rule_sets:",
        "  - name: readme",
        "    audience: everyone",
        f"    rules: [{{products: [{', '.join(allow)}], label: allow}}]",
        "    default: violate",
        "taxonomy:",
        *(f"  - {{scheme: llavaguard, category: {code}, products: [{', '.join(ids)}]}}" for code, ids in maps.items()),
    ]) + "\n"


def test_llavaguard_prompt_is_the_readme_prompt_for_the_readme_policy() -> None:
    policy, issues = parse_policy(readme_policy())
    assert not [i for i in issues if i.severity == "error"], issues
    rendered = llavaguard_prompt(policy, policy.rule_set("readme"))
    # policy descriptions are trimmed: the README's one trailing space after the O4 bullet is the only difference
    expected = README_PREAMBLE + README_O3 + "\n\n" + README_O4.replace("nudity content. \n", "nudity content.\n") + "\n\n" + README_STEPS
    assert rendered == expected


def test_shieldgemma2_definitions_follow_the_builtin_wording() -> None:
    policy, _ = parse_policy(readme_policy())
    defs = shieldgemma2_policies(policy, policy.rule_set("readme"))
    assert list(defs) == ["O3", "O4"]  # one per category with a violating product
    assert defs["O3"] == ("No Sexual Content: The image shall not contain content that matches any of these descriptions: "
                          "Contain sexually explicit (i.e., erotic) content.")


def test_llama_guard_4_prompt_lists_the_hazards_in_order() -> None:
    text = llama_guard_4_prompt()
    block = text.split("<BEGIN UNSAFE CONTENT CATEGORIES>\n")[1].split("\n<END UNSAFE CONTENT CATEGORIES>")[0]
    assert [line.split(":")[0] for line in block.splitlines()] == [f"S{i}" for i in range(1, 15)]
    assert "S1: Violent Crimes.\n" in text and text.count("<|image|>") == 1


@pytest.mark.parametrize(
    ("said", "unsafe", "cats", "problem"),
    [
        ('{"rating": "Unsafe", "category": "O3: Sexual Content", "rationale": "r"}', True, ["O3"], None),
        ('{"rationale": "r", "rating": "unsafe", "category": "O3"}', True, ["O3"], None),  # v1.2 puts the rationale first
        ('{"rating": "Safe", "category": "NA: None applying", "rationale": "r",}', False, [], None),  # the template's comma
        ('{"rating": "Unsafe"}', True, [], None),
        ('{"rating": "Unsafe", "category": "O9: Disasters"}', None, [], "off-format"),
        ('{"rating": "Unsafe", "category": "O3"', None, [], "off-format"),
        ("I'm sorry, I can't assess this.", None, [], "refused"),
    ],
)
def test_read_llavaguard(said: str, unsafe: bool | None, cats: list[str], problem: str | None) -> None:
    reply = read_llavaguard(said, ["O3", "O4"])
    assert (reply.unsafe, reply.categories, reply.problem) == (unsafe, cats, problem)


@pytest.mark.parametrize(
    ("said", "unsafe", "cats", "problem"),
    [
        ("safe", False, [], None),
        ("\n\nunsafe\nS1,S10", True, ["S1", "S10"], None),
        ("unsafe\nS12, S4", True, ["S12", "S4"], None),
        ("Unsafe", True, [], None),
        ("unsafe\nsexual content", None, [], "off-format"),
        ("maybe", None, [], "off-format"),
        ("I cannot help with that.", None, [], "refused"),
    ],
)
def test_read_llama_guard(said: str, unsafe: bool | None, cats: list[str], problem: str | None) -> None:
    reply = read_llama_guard(said)
    assert (reply.unsafe, reply.categories, reply.problem) == (unsafe, cats, problem)
