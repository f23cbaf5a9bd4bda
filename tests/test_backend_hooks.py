"""The engine's hooks are methods of Backend (bind_policy, set_threads), with no-op defaults."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from icm.moderation.backends.base import Backend, Failed
from icm.moderation.backends.openai_requests import ItemError
from icm.moderation.engine import Moderator
from icm.moderation.evidence.runtime import thread_plan
from icm.moderation.presets import calls
from icm.moderation.presets.backend import PresetBackend
from icm.moderation.record import ModerationRecord
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


class Flaky(Backend):
    """Generates text for every image but the first, whose request failed (kept in last_errors)."""

    name = "flaky"
    capabilities = frozenset({"generate"})

    def generate(self, images, conversations, max_new_tokens=256):  # type: ignore[no-untyped-def,override]
        return [None] + ["ok"] * (len(images) - 1)

    @property
    def last_errors(self) -> list[ItemError]:
        return [ItemError(index=0, error="HTTP 503 from the server (gave up after 3 attempts)", status=503)]


def test_the_optional_hooks_are_methods_of_backend_with_no_op_defaults() -> None:
    plain = Counting()
    policy = load_policy("icm-sexy")
    rules = policy.rule_set(None)
    assert plain.model_id_for(policy) == plain.model_id == "counting"  # the default: the whole model
    rec = ModerationRecord(path="a.jpg", policy=policy.name, rules=rules.name, backend="counting")
    assert plain.finish_record(rec, {}, policy, rules) is rec  # the default: the engine's record unchanged
    assert list(plain.last_errors) == []  # the default: no per-item errors


def test_a_presets_generate_reads_the_backends_last_errors() -> None:
    image = Image.new("RGB", (8, 8))
    first, second = calls.generate(Flaky(), [image, image], "the guard's prompt", 16)
    assert isinstance(first, Failed) and (first.error, first.status) == ("HTTP 503 from the server (gave up after 3 attempts)", 503)
    assert second == "ok"
    [only] = calls.generate(type("Silent", (Flaky,), {"last_errors": Backend.last_errors})(), [image], "p", 16)
    assert isinstance(only, Failed) and only.error == "the request failed"  # no error kept: still a failure, said
