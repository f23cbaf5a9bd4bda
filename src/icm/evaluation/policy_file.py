"""Writing a calibrated policy: the whole policy with one rule set's setting changed, under a header.

``icm eval calibrate`` writes new thresholds (:mod:`icm.evaluation.calibrate`), ``--video`` a
new ``video`` block (:mod:`icm.evaluation.video_calibrate`): both edit the policy's YAML text
in place (comments and order kept), check it loads back as intended, and put a comment
header on top that says how the setting was chosen (:func:`write_calibrated`). Calibrating
a calibrated policy again replaces its header.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from icm.fileio import atomic_write
from icm.policy.model import RuleSet, Thresholds


class CalibrationError(ValueError):
    """The data cannot be calibrated (no labels, no violations ...)."""


def policy_source_text(name_or_path: str) -> tuple[str, str]:
    """The YAML text of a built-in policy or a policy file, and where it came from."""
    from importlib import resources

    from icm.policy.loader import BUILTIN_PACKAGE, builtin_policy_names

    if name_or_path in builtin_policy_names():
        return resources.files(BUILTIN_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8"), f"built-in policy {name_or_path!r}"
    p = Path(name_or_path)
    try:
        return p.read_text(encoding="utf-8"), str(p)
    except OSError as exc:
        raise CalibrationError(f"cannot read policy file {p}: {exc.strerror or exc}") from None


def thresholds_field(review: float, block: float) -> tuple[dict[str, object], str]:
    """A rule set's ``thresholds`` (checked) as a value and as flow-style YAML, for :func:`policy_with_field`."""
    return Thresholds(review=review, block=block).model_dump(mode="json"), f"{{review: {review!r}, block: {block!r}}}"


def _edit_text(text: str, rules: str, key: str, new: str) -> str | None:
    """``text`` with the rule set's ``key`` set to the flow-style ``new`` (comments and layout kept), or None."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return None
    if not isinstance(root, yaml.MappingNode):
        return None
    rule_sets = next((v for k, v in root.value if isinstance(k, yaml.ScalarNode) and k.value == "rule_sets"), None)
    if not isinstance(rule_sets, yaml.SequenceNode):
        return None
    for item in rule_sets.value:
        if not isinstance(item, yaml.MappingNode) or item.flow_style:
            continue
        keys = {k.value: (k, v) for k, v in item.value if isinstance(k, yaml.ScalarNode)}
        name = keys.get("name")
        if name is None or not isinstance(name[1], yaml.ScalarNode) or name[1].value != rules:
            continue
        if key in keys:
            v = keys[key][1]
            if isinstance(v, yaml.MappingNode) and not v.flow_style:
                # block style: replace the key's whole entry (from the key to the end of its last value line)
                k = keys[key][0]
                start = k.start_mark.index
                end = v.end_mark.index
                while end > start and text[end - 1] in " \n\r\t":
                    end -= 1
                return text[:start] + f"{key}: {new}" + text[end:]
            return text[: v.start_mark.index] + new + text[v.end_mark.index:]
        name_key, name_val = name
        eol = text.find("\n", name_val.end_mark.index)
        eol = len(text) if eol < 0 else eol
        return text[:eol] + "\n" + " " * name_key.start_mark.column + f"{key}: {new}" + text[eol:]
    return None


def policy_with_thresholds(text: str, source: str, rules: str, review: float, block: float) -> str:
    """The policy document with one rule set's thresholds changed, checked by loading it."""
    return policy_with_field(text, source, rules, "thresholds", *thresholds_field(review, block))


def policy_with_field(text: str, source: str, rules: str, key: str, value: dict[str, object], flow: str) -> str:
    """The policy document with one rule set's ``key`` set to ``value`` (written as ``flow``), checked by loading it.

    The original text is edited in place (comments and order kept); when that is not
    possible (a flow-style rule set) the policy is written out again from its model.
    """
    from icm.policy import parse_policy

    original, _ = parse_policy(text, source)
    rs = original.rule_set(rules)
    want = original.model_dump(mode="json")
    for r in want["rule_sets"]:
        if r["name"] == rs.name:
            r[key] = value

    def good(candidate: str | None) -> bool:
        if candidate is None:
            return False
        try:
            got, _ = parse_policy(candidate, source)
        except Exception:  # noqa: BLE001 - any failure means: use the other way
            return False
        return got.model_dump(mode="json") == want

    edited = _edit_text(text, rs.name, key, flow)
    if good(edited):
        return edited  # type: ignore[return-value]
    dumped = yaml.safe_dump(want, sort_keys=False, allow_unicode=True, width=120)
    if not good(dumped):
        raise CalibrationError(f"could not write the policy {original.name!r} with the new {key} (it did not load back the same)")
    return dumped


HEADER_START = "# Calibrated by `icm eval calibrate`"
HEADER_END = "-- end of the calibration header --"


def strip_header(text: str) -> str:
    """``text`` without an earlier calibration header (calibrating a calibrated policy again)."""
    if not text.startswith(HEADER_START):
        return text
    end = text.find(f"# {HEADER_END}\n")
    return text[end + len(HEADER_END) + 3:] if end >= 0 else text


def write_calibrated(
    policy_ref: str, out: str | Path, rules: str, key: str, value: dict[str, object], flow: str,
    header: Callable[[str, RuleSet], list[str]],
) -> Path:
    """Write the whole policy ``policy_ref`` with rule set ``rules``' ``key`` set to ``value`` (``flow``) to ``out``.

    ``header(source, previous)`` gives the lines of the comment on top, from where the policy
    came from and the rule set as it was (an earlier calibration header is dropped first).
    """
    from icm.policy import parse_policy

    text, source = policy_source_text(policy_ref)
    text = strip_header(text)
    previous = parse_policy(text, source)[0].rule_set(rules)
    body = policy_with_field(text, source, rules, key, value, flow)
    p = Path(out)
    with atomic_write(p) as fh:
        fh.write("".join(f"# {ln}\n" for ln in [*header(source, previous), HEADER_END]) + body)
    return p
