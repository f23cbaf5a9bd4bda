"""Mix our instruction data with a general instruction dataset (``icm data mix``).

The paper's MSFT setting trains on ICM-Instruct mixed with general visual instruction
data (e.g. LLaVA's ``llava_v1_5_mix665k.json``) in one run, so the model keeps its
general abilities. This module keeps every sample of ours and draws general samples
without replacement to reach the asked ratio, then shuffles the two together with a
seed (the same seed, the same mix).

Both files are JSON lists (or JSONL) in LLaVA's ``conversations`` (``from``/``value``)
or LLaMA-Factory's ``messages`` (``role``/``content``) layout; the general data is
converted to ours' layout when they differ. ``ratio`` is ``"OURS:GENERAL"`` (``"1:3"``:
three general samples per sample of ours) or a number in (0, 1]: the share of ours in
the mix.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icm.fileio import atomic_write, read_jsonl

__all__ = ["MixResult", "detect_layout", "load_samples_file", "mix_datasets", "parse_ratio"]

_ROLE_TO_FROM = {"user": "human", "assistant": "gpt", "system": "system"}
_FROM_TO_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def parse_ratio(ratio: str | float) -> float:
    """General samples per sample of ours, from ``"1:3"`` or a share of ours (0.25 -> 3.0)."""
    if isinstance(ratio, str) and ":" in ratio:
        a, _, b = ratio.partition(":")
        try:
            ours, general = float(a), float(b)
        except ValueError:
            raise ValueError(f"ratio {ratio!r}: expected OURS:GENERAL, e.g. 1:3") from None
        if ours <= 0 or general < 0:
            raise ValueError(f"ratio {ratio!r}: OURS must be > 0 and GENERAL >= 0")
        return general / ours
    try:
        share = float(ratio)
    except ValueError:
        raise ValueError(f"ratio {ratio!r}: expected OURS:GENERAL (1:3) or the share of ours (0.25)") from None
    if not 0 < share <= 1:
        raise ValueError(f"ratio {ratio!r}: the share of ours must be in (0, 1]")
    return (1 - share) / share


def load_samples_file(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    text = p.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(text)
    else:
        data = list(read_jsonl(p, text=text))
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise ValueError(f"{p}: expected a JSON list (or JSONL) of samples")
    return data


def detect_layout(samples: list[dict[str, Any]]) -> str:
    """``"llava"`` (conversations with from/value) or ``"messages"`` (role/content)."""
    for s in samples[:50]:
        if isinstance(s.get("messages"), list):
            return "messages"
        if isinstance(s.get("conversations"), list):
            conv = s["conversations"]
            if conv and isinstance(conv[0], dict) and "role" in conv[0]:
                return "messages"
            return "llava"
    raise ValueError("cannot tell the layout: samples have neither 'conversations' nor 'messages'")


def _to_messages(s: dict[str, Any]) -> dict[str, Any]:
    if "messages" in s:
        return s
    msgs = [{"role": _FROM_TO_ROLE.get(t.get("from", ""), t.get("from", "")), "content": t.get("value", "")}
            for t in s.get("conversations", [])]
    out: dict[str, Any] = {"messages": msgs}
    if s.get("image"):
        out["images"] = s["image"] if isinstance(s["image"], list) else [s["image"]]
        for m in msgs:
            m["content"] = m["content"].replace("<image>\n", "<image>")
        if msgs and not any("<image>" in m["content"] for m in msgs):
            msgs[0]["content"] = "<image>" + msgs[0]["content"]
    if s.get("id") is not None:
        out["id"] = s["id"]
    return out


def _to_llava(s: dict[str, Any]) -> dict[str, Any]:
    if "conversations" in s and "messages" not in s:
        return s
    msgs = s.get("messages") or s.get("conversations") or []
    conv = [{"from": _ROLE_TO_FROM.get(m.get("role", ""), m.get("role", "")), "value": m.get("content", "")} for m in msgs]
    out: dict[str, Any] = {"conversations": conv}
    if s.get("id") is not None:
        out["id"] = s["id"]
    images = s.get("images") or []
    if len(images) == 1:
        out["image"] = images[0]
        for t in conv:
            if "<image>" in t["value"] and "<image>\n" not in t["value"]:
                t["value"] = t["value"].replace("<image>", "<image>\n", 1)
    elif images:
        out["image"] = images
    return out


@dataclass
class MixResult:
    out: str
    ours: int
    general: int
    general_available: int
    total: int
    layout: str
    general_per_ours: float
    asked_general_per_ours: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def mix_datasets(
    ours: str | Path,
    general: str | Path,
    out: str | Path,
    *,
    ratio: str | float = "1:1",
    seed: int = 0,
) -> MixResult:
    """Write ours and general samples, mixed at ``ratio``, to ``out`` (a JSON list)."""
    per_ours = parse_ratio(ratio)
    a = load_samples_file(ours)
    b = load_samples_file(general)
    if not a:
        raise ValueError(f"{ours}: no samples")
    layout = detect_layout(a)
    convert = _to_llava if layout == "llava" else _to_messages
    want = round(len(a) * per_ours)
    rng = random.Random(seed)
    take = rng.sample(range(len(b)), min(want, len(b))) if b else []
    ids = {s.get("id") for s in a if s.get("id") is not None}
    chosen = []
    for i in sorted(take):
        s = convert(dict(b[i]))
        if s.get("id") in ids:
            s["id"] = f"general-{s['id']}"
        chosen.append(s)
    mixed = list(a) + chosen
    rng.shuffle(mixed)
    out = Path(out)
    with atomic_write(out) as fh:
        if out.suffix.lower() in (".jsonl", ".ndjson"):
            for s in mixed:
                fh.write(json.dumps(s, ensure_ascii=False) + "\n")
        else:
            json.dump(mixed, fh, ensure_ascii=False, indent=1)
            fh.write("\n")
    return MixResult(
        out=str(out), ours=len(a), general=len(chosen), general_available=len(b), total=len(mixed), layout=layout,
        general_per_ours=len(chosen) / len(a), asked_general_per_ours=per_ours,
    )
