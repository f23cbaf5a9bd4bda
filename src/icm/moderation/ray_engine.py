"""Where ``icm moderate --engine ray`` used to live: it is :mod:`icm.run.ray` now. Its names
(``run_ray_job``, ``RayOptions``, ``RayEngineError``, ``plan_resources``, ``resolve_inputs`` ...)
stay importable from here."""

from __future__ import annotations

from typing import Any

from icm.run import ray as _ray


def __getattr__(name: str) -> Any:
    return getattr(_ray, name)
