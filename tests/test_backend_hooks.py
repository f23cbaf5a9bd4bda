"""The engine's hooks are methods of Backend (bind_policy, set_threads), with no-op defaults."""

from __future__ import annotations

import os

import pytest

from icm.moderation.backends.base import Backend
from icm.moderation.engine import Moderator
from icm.moderation.evidence.runtime import thread_plan
from icm.moderation.presets.backend import PresetBackend
from icm.moderation.spec import BackendSpec
from icm.policy import load_policy
from icm.run.config import ModerateConfig
from icm.run.ray import ModerateActor


class Counting(Backend):
    name = "counting"

    def __init__(self) -> None:
        self.threads: list[int] = []

    def set_threads(self, threads: int) -> None:
        self.threads.append(threads)


def test_a_ray_actor_splits_its_threads_between_the_detectors_pool_and_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # the actor sets them; restored after the test
    actor = ModerateActor(ModerateConfig(backend=BackendSpec.build(backend="detector", threads=1)), threads=6)
    try:
        detector = actor.mod.backend
        assert (detector.workers, detector.intra_op_num_threads) == thread_plan(6)  # type: ignore[attr-defined]
        assert detector.threads == 6  # type: ignore[attr-defined]
    finally:
        actor.mod.backend.close()


def test_a_preset_passes_threads_to_its_model_and_the_default_does_nothing() -> None:
    inner = Counting()
    PresetBackend(inner, "llavaguard").set_threads(3)
    assert inner.threads == [3]
    Backend().set_threads(2)  # a backend that runs no model here: nothing to set, no error


def test_the_moderator_asks_the_backend_bind_policy_returns() -> None:
    plain = Counting()
    assert Moderator(plain, policy="icm-sexy").backend is plain  # the default binds to itself
    preset = PresetBackend(Counting(), "llavaguard")
    bound = Moderator(preset, policy="icm-sexy").backend
    assert bound is not preset and bound._bound is not None  # type: ignore[attr-defined]
    assert bound._bound[0].name == load_policy("icm-sexy").name  # type: ignore[attr-defined]
