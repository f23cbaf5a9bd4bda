"""Pools of paraphrased instructions, per term and per answer format (ours).

Training on one fixed wording teaches a model the wording; the exports therefore ask
each task in one of several paraphrases, picked deterministically from the record id (so
an export is reproducible). Templates use ``{term}`` (the policy's term),
``{question}`` (the term's yes/no question) and, in the ``choice`` pool, ``{letters}``
(the question's option letters, "A, B, C or D"). Pools can be extended or replaced from a
YAML or JSON file mapping pool names to lists of templates (``--instructions FILE``);
a key ``terms: {<term>: {<pool>: [...]}}`` adds wording for one term only.

Pools:

* ``explain``: ask for the moderation explanation;
* ``term``: the term's yes/no question (the canonical question is always in the pool);
* ``explicit`` / ``implicit``: ask for the explicit / implicit content;
* ``yes_no`` / ``choice`` / ``short``: the answer-format line appended to a Q-A question
  (``short`` for what/how/open questions; an empty template adds nothing).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULT_POOLS", "InstructionPools"]

DEFAULT_POOLS: dict[str, list[str]] = {
    "explain": [
        "{question} Explain why.",
        "Is this image {term}? Explain your answer.",
        "Explain whether the image is {term} and why.",
        "Would this image be considered {term}? Give the reasons from what it shows.",
        "Decide whether the image is {term}, and justify the decision from its content and atmosphere.",
        "Describe what in the image makes it {term} or not {term}.",
        "Judge whether this picture is {term}. Explain what you see that leads to your judgement.",
        "Is the content of this image {term}? Walk through the visible evidence.",
    ],
    "term": [
        "{question}",
        "{question}",
        "Is this picture {term}?",
        "Would you describe this image as {term}?",
        "Does this image count as {term}?",
    ],
    "explicit": [
        "Describe the people in the image, their clothes, posture and movements.",
        "What is visibly shown in the image? Describe the people, clothing and actions.",
        "Describe the explicit content of this image: who is in it, what they wear and what they do.",
        "List what can be seen in the image: people, clothes, exposed body parts, poses and objects.",
    ],
    "implicit": [
        "What atmosphere does the image convey?",
        "Describe the mood and the implied intent of this image.",
        "Beyond what is shown, what does the image suggest? Describe its atmosphere.",
        "How do the framing, lighting and setting of the image shape its mood?",
    ],
    "yes_no": [
        "Answer with Yes or No.",
        "Answer yes or no.",
        "Reply with Yes or No only.",
        "Please answer Yes or No.",
    ],
    "choice": [
        "Answer with the option's letter from the given choices directly.",
        "Answer with the letter of the correct option.",
        "Choose one option and reply with its letter.",
        "Reply with {letters}.",
    ],
    "short": [
        "",
        "Answer briefly.",
        "Answer in a few words.",
        "Answer with a short phrase.",
    ],
}


def _pick(pool: list[str], key: str) -> str:
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return pool[h % len(pool)]


class InstructionPools:
    """Instruction templates by pool name, with per-term additions."""

    def __init__(self, pools: Mapping[str, list[str]] | None = None, terms: Mapping[str, Mapping[str, list[str]]] | None = None,
                 *, seed: int = 0) -> None:
        self.pools: dict[str, list[str]] = {k: list(v) for k, v in (pools or DEFAULT_POOLS).items()}
        for name, pool in DEFAULT_POOLS.items():
            self.pools.setdefault(name, list(pool))
        self.terms = {t: {k: list(v) for k, v in p.items()} for t, p in (terms or {}).items()}
        self.seed = seed
        for name, pool in self.pools.items():
            if not pool:
                raise ValueError(f"instruction pool {name!r} is empty")

    @classmethod
    def from_file(cls, path: str | Path, *, seed: int = 0, replace: bool = False) -> InstructionPools:
        """Pools from a YAML/JSON file; they extend the defaults unless ``replace``."""
        p = Path(path)
        text = p.read_text(encoding="utf-8")
        data: Any = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"{p}: an instructions file maps pool names to lists of templates")
        terms = data.pop("terms", {}) or {}
        pools: dict[str, list[str]] = {} if replace else {k: list(v) for k, v in DEFAULT_POOLS.items()}
        for name, items in data.items():
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError(f"{p}: pool {name!r} must be a list of strings")
            pools[name] = items if replace else pools.get(name, []) + [i for i in items if i not in pools.get(name, [])]
        return cls(pools, terms, seed=seed)

    def pool(self, name: str, term: str | None = None) -> list[str]:
        base = list(self.pools.get(name, []))
        if term and term in self.terms:
            base += [t for t in self.terms[term].get(name, []) if t not in base]
        if not base:
            raise KeyError(f"no instruction pool {name!r}")
        return base

    def pick(self, name: str, key: str, *, term: str, question: str, letters: str = "A, B, C or D") -> str:
        """A template of pool ``name`` chosen by ``key`` (e.g. record id and turn), filled in.

        Fields: ``{term}``, ``{question}`` and, for choice formats, ``{letters}``
        ("A, B, C or D" for the question's options).
        """
        template = _pick(self.pool(name, term), f"{self.seed}:{name}:{key}")
        return template.format(term=term, question=question, letters=letters).strip()
