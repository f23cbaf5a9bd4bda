"""The red/blue square policy the loopback-server and tiny-model tests moderate with.

A term question ("Is the image red?") and one attribute (the square's hue: red or blue);
the red square violates under ``no-red``. Its questions carry the ``[k=term]`` / ``[k=hue]``
tags tests/fake_openai.py's server picks its scripted replies by; ``tags=False`` leaves
them off (the tiny LLaVA's adapter learned the untagged question).
"""

from __future__ import annotations

_SQUARE_POLICY = """
name: {name}
term: {{id: red, question: "Is the image red?{term_tag}"}}
attributes:
  - id: hue
    question: "Which colour is the square?{hue_tag}"
    values:
      - {{id: red, description: Red}}
      - {{id: blue, description: Blue}}
products:
  - {{id: red_square, assignment: {{hue: red}}, description: A red square.}}
  - {{id: blue_square, assignment: {{hue: blue}}, positive: false, description: A blue square.}}
rule_sets:
  - name: no-red
    audience: everyone
    rules: [{{products: [blue_square], label: allow}}]
    default: violate
"""


def square_policy(name: str, *, tags: bool = True, extra_rule_sets: str = "") -> str:
    """The policy's YAML under ``name``; ``extra_rule_sets`` (YAML list items) follow ``no-red``."""
    term_tag, hue_tag = (" [k=term]", " [k=hue]") if tags else ("", "")
    return _SQUARE_POLICY.format(name=name, term_tag=term_tag, hue_tag=hue_tag) + extra_rule_sets
