"""One ``icm moderate`` run: :mod:`~icm.run.config` (what it is), :mod:`~icm.run.preflight`
(checked before a model loads), :mod:`~icm.run.output` (the one output sink, resume index and
record identity), and the engines that feed it: :mod:`~icm.run.local` (this process) and
:mod:`~icm.run.ray` (a Ray Data actor pool)."""

from __future__ import annotations

from icm.run.config import ModerateConfig
from icm.run.local import run_job
from icm.run.output import JobSummary
from icm.run.preflight import preflight

__all__ = ["JobSummary", "ModerateConfig", "preflight", "run_job"]
