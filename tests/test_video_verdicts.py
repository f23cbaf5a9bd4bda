"""A video's verdict from corroborating frames (a rule set's ``video`` setting, issue 19).

Videos are the synthetic drawings of ``synth-shapes`` encoded with PyAV (as in
``test_frames``), judged by :class:`FigureBackend`, which reads each decoded frame; the
offending figure is blocked by the ``general`` rule set on any single frame.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_frames import FigureBackend, write_video

from icm.moderation.corroborate import aggregate_video
from icm.moderation.engine import Moderator
from icm.moderation.record import ModerationRecord
from icm.policy import Policy, load_policy
from icm.policy.loader import parse_policy
from icm.policy.model import CategoryMap, Thresholds, VideoAggregation
from icm.policy.validate import PolicyError


def corroborating(policy: Policy | None = None, **video: object) -> Policy:
    """synth-shapes whose ``general`` rule set corroborates video frames."""
    base = policy or load_policy("synth-shapes")
    cfg = VideoAggregation(aggregate="corroborate", **video)  # type: ignore[arg-type]
    rule_sets = [r.model_copy(update={"video": cfg}) if r.name == "general" else r for r in base.rule_sets]
    return base.model_copy(update={"rule_sets": rule_sets})


def judge(path: Path, policy: Policy | str = "synth-shapes") -> ModerationRecord:
    (r,) = Moderator(FigureBackend(), policy=policy, rules="general").moderate_paths([str(path)], fps=1.0)
    assert r.ok, r.error
    return r


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {
        # one offending second: one regular sample (4 s) blocks
        "flash": write_video(root / "flash.mp4", seconds=8, rate=5, bad_from=4.0, bad_until=4.2, size=64),
        # four offending seconds: samples at 3, 4, 5, 6 s block
        "scene": write_video(root / "scene.mp4", seconds=8, rate=5, bad_from=3.0, bad_until=6.2, size=64),
        "calm": write_video(root / "calm.mp4", seconds=8, rate=5, bad_from=None, size=64),
    }


def test_worst_frame_stays_the_default(clips: dict[str, Path]) -> None:
    r = judge(clips["flash"])
    assert r.verdict == "block" and r.aggregate == "worst" and r.timestamp == 4.0


def test_one_offending_frame_under_corroboration_is_review_never_allow(clips: dict[str, Path]) -> None:
    r = judge(clips["flash"], corroborating(min_run=3))
    assert r.verdict == "review" and r.aggregate == "uncorroborated"
    assert (r.frame, r.timestamp, r.product) == (20, 4.0, "whole_bare_still")  # the blocking frame is named
    assert [s.timestamp for s in r.frame_scores if s.verdict == "block"] == [4.0]
    assert any("not corroborated" in n for n in r.notes) and any("alone: block" in n for n in r.notes)
    assert judge(clips["calm"], corroborating(min_run=3)).verdict == "allow"


def test_corroborating_frames_block(clips: dict[str, Path]) -> None:
    r = judge(clips["scene"], corroborating(min_run=3))
    assert r.verdict == "block" and r.aggregate == "corroborated"
    assert any("corroborated: 3 of 3 consecutive sampled frames block" in n for n in r.notes)
    # k of n: three blocking frames among any five consecutive samples
    assert judge(clips["scene"], corroborating(min_run=3, window=5)).verdict == "block"
    assert judge(clips["scene"], corroborating(min_run=5, window=6)).verdict == "review"


def test_zero_tolerance_category_blocks_on_one_frame(clips: dict[str, Path]) -> None:
    """A product mapped to sexual/minors blocks the video on a single frame, corroboration or not."""
    policy = load_policy("synth-shapes")
    policy = policy.model_copy(update={"taxonomy": [
        CategoryMap(scheme="openai", category="sexual/minors", products=["whole_bare_still"]),
    ]})
    r = judge(clips["flash"], corroborating(policy, min_run=3))
    assert r.verdict == "block" and r.aggregate == "zero-tolerance" and r.timestamp == 4.0
    # the same mapped to plain "sexual" is corroborated like anything else
    plain = policy.model_copy(update={"taxonomy": [CategoryMap(scheme="openai", category="sexual", products=["whole_bare_still"])]})
    assert judge(clips["flash"], corroborating(plain, min_run=3)).verdict == "review"


def rec(p: float, verdict: str, label: str = "violate", product: str = "x") -> ModerationRecord:
    return ModerationRecord(path="v.mp4", policy="p", rules="r", backend="b", p_violation=p, verdict=verdict,  # type: ignore[arg-type]
                            label=label, product=product, basis="products")  # type: ignore[arg-type]


def test_windows_short_videos_and_frame_thresholds() -> None:
    b, a = rec(0.9, "block"), rec(0.05, "allow", "allow")
    spaced = [b, a, b, a, b]
    assert aggregate_video(spaced, VideoAggregation(aggregate="corroborate", min_run=3)).verdict == "review"
    got = aggregate_video(spaced, VideoAggregation(aggregate="corroborate", min_run=3, window=5))
    assert (got.verdict, got.how, got.best) == ("block", "corroborated", 3)
    # fewer sampled frames than min_run: all of them must block
    assert aggregate_video([b, b], VideoAggregation(aggregate="corroborate", min_run=3)).verdict == "block"
    assert aggregate_video([b, a], VideoAggregation(aggregate="corroborate", min_run=3)).verdict == "review"
    # the rule set's own thresholds (block at 0.7) make P = 0.5 a review frame; the video's own count it
    mid = [rec(0.5, "review")] * 3
    assert aggregate_video(mid, VideoAggregation(aggregate="corroborate", min_run=3)).verdict == "review"
    low = VideoAggregation(aggregate="corroborate", min_run=3, thresholds=Thresholds(review=0.2, block=0.4))
    assert aggregate_video(mid, low).verdict == "block"
    # an allowed product is never a blocking frame, whatever its P(violation) (reviewed, as decide does)
    assert aggregate_video([rec(0.9, "allow", "allow")] * 3, low).verdict == "review"


def test_video_setting_is_validated_with_its_line() -> None:
    text = load_policy("synth-shapes").model_dump_json()
    assert '"video":null' in text
    yaml_text = Path(__file__).parent.parent.joinpath("src/icm/policies/synth-shapes.yaml").read_text()
    good = yaml_text.replace("    default: allow\n", "    default: allow\n    video: {aggregate: corroborate, min_run: 3, window: 5}\n", 1)
    assert parse_policy(good)[0].rule_set("general").video == VideoAggregation(aggregate="corroborate", min_run=3, window=5)
    bad = yaml_text.replace("    default: allow\n", "    default: allow\n    video: {aggregate: corroborate, min_run: 4, window: 2}\n", 1)
    with pytest.raises(PolicyError, match=r"window 2 is shorter than min_run 4") as info:
        parse_policy(bad, source="mine.yaml")
    assert "mine.yaml:" in str(info.value)
    with pytest.raises(PolicyError, match="aggregate"):
        parse_policy(yaml_text.replace("    default: allow\n", "    default: allow\n    video: {aggregate: majority}\n", 1))
