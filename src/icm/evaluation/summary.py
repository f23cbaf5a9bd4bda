"""The JSON summary of an evaluation run: what ``--out`` writes and ``compare`` reads."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from icm import __version__
from icm.evaluation.icm_metrics import ICMReport
from icm.evaluation.meq import MEQReport
from icm.evaluation.mqa import MQAReport
from icm.fileio import atomic_write, read_text

SCHEMA_VERSION = 1


class EvalSummary(BaseModel):
    """One run's figures: any of ICM accuracy, moderation Q-A and explanation quality."""

    schema_version: int = SCHEMA_VERSION
    name: str
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    icm_version: str = __version__
    meta: dict[str, Any] = Field(default_factory=dict, description="Dataset, backend, model, policy, rules ...")
    icm: ICMReport | None = None
    mqa: MQAReport | None = None
    meq: MEQReport | None = None

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        with atomic_write(p) as fh:
            fh.write(self.model_dump_json(indent=2) + "\n")
        return p


def load_summary(path: str | Path) -> EvalSummary:
    p = Path(path)
    try:
        data = json.loads(read_text(p))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise ValueError(f"{p}: not an evaluation summary (written by `icm eval ... --out`)")
    if data["schema_version"] > SCHEMA_VERSION:
        raise ValueError(f"{p}: summary schema {data['schema_version']} is newer than this icm understands ({SCHEMA_VERSION})")
    try:
        return EvalSummary.model_validate(data)
    except ValueError as exc:
        raise ValueError(f"{p}: not a valid evaluation summary: {exc}") from None
