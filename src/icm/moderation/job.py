"""Where ``icm moderate``'s batch job used to live: it is :mod:`icm.run` now (config, preflight,
output, the local and Ray engines). These names stay importable from here."""

from __future__ import annotations

from icm.run.config import ModerateConfig
from icm.run.local import build_moderator, build_runner, members, run_job
from icm.run.output import JobSummary, read_records

__all__ = ["JobSummary", "ModerateConfig", "build_moderator", "build_runner", "members", "read_records", "run_job"]
