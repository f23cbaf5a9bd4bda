"""Every frame is judged: animations, multi-page TIFF, transparency and video.

The offending content is the synthetic policy's marker (``synth-shapes``: a figure whose
marked part is red is "bare", which the ``general`` rule set blocks); it appears only in
a late frame, after benign ones. In-process tests use :class:`FigureBackend`, which
reads the figure from the pixels with :func:`icm.demo.synth.read_figure` (what the
scripted teacher sees), so that the frame-selection logic is checked on real decoded
frames; the end-to-end tests run ``icm moderate --backend openai`` against the scripted
teacher server (:class:`icm.demo.teacher.TeacherServer`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features
from typer.testing import CliRunner

from icm.cli.main import app
from icm.demo.synth import Figure, draw_figure, read_figure
from icm.demo.teacher import TeacherServer
from icm.moderation.backends.base import Backend, Choice, Query, YesNoScore
from icm.moderation.engine import Moderator, _worst_view, moderate
from icm.moderation.images import ImageLoadError, load_image, sample_frames
from icm.moderation.job import read_records
from icm.moderation.record import ModerationRecord
from icm.moderation.video import load_video
from icm.policy import load_policy

BENIGN = Figure("upper", "covered", "still")  # general: allow
OFFENDING = Figure("whole", "bare", "still")  # general: block (bare, severity high)
POISON = Figure("lower", "covered", "touch")  # FigureBackend(poison=True) fails on it


class FigureBackend(Backend):
    """A deterministic stand-in for a model: it reads the synth figure from the pixels."""

    name = "figures"
    capabilities = frozenset({"score_yes_no", "choose", "generate"})

    def __init__(self, *, poison: bool = False, blind: bool = False) -> None:
        self.policy = load_policy("synth-shapes")
        self.poison = poison
        self.blind = blind  # unsure of everything (P(Yes) = 0.5, no attribute): never allows
        self.batches: list[int] = []
        self.explained = 0

    def ask(self, images: Sequence[Image.Image], queries: Sequence[Query]) -> list[dict]:
        self.batches.append(len(images))
        if self.poison and any(read_figure(im) == POISON for im in images):
            raise RuntimeError("the model crashed on this frame")
        return super().ask(images, queries)

    def score_yes_no(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list:
        out = []
        for im in images:
            f = read_figure(im)
            out.append(YesNoScore(0.5 if self.blind else 0.97 if f is not None and f.positive else 0.03, "logits"))
        return out

    def choose(self, images: Sequence[Image.Image], question: str, options: Sequence[str]) -> list:
        attr = next(a for a in self.policy.attributes if a.question == question)
        values = [v.id for v in attr.values]
        out = []
        for im in images:
            f = read_figure(im)
            if self.blind or f is None:
                out.append(None)
                continue
            seen = f.assignment[attr.id]
            out.append(Choice([0.94 if v == seen else 0.06 / (len(values) - 1) for v in values], "logits"))
        return out

    def generate(self, images: Sequence[Image.Image], messages: Sequence, *, max_new_tokens: int = 256) -> list:
        self.explained += len(images)
        return [f"I see {read_figure(im)}" for im in images]


def figures(n: int, late: int | Sequence[int], *, offending: Figure = OFFENDING, size: int = 64) -> list[Image.Image]:
    """``n`` frames of benign figures, the offending one at index(es) ``late``."""
    bad = {late} if isinstance(late, int) else set(late)
    return [draw_figure(offending if i in bad else BENIGN, size=size, seed=i) for i in range(n)]


def one_scene(n: int, late: int | Sequence[int], *, size: int = 64) -> list[Image.Image]:
    """``n`` frames of one still scene (the same drawing, a small dot moving in a corner so that
    no two frames are equal), the offending figure in the same scene at index(es) ``late``."""
    bad = {late} if isinstance(late, int) else set(late)
    out = []
    for i in range(n):
        im = draw_figure(OFFENDING if i in bad else BENIGN, size=size, seed=7)
        im.paste((250, 250, 250), (size - 3 - i % 8, size - 3, size - 1 - i % 8, size - 1))
        out.append(im)
    return out


def save_animation(path: Path, frames: list[Image.Image], fmt: str) -> Path:
    kwargs: dict[str, object] = {"save_all": True, "append_images": frames[1:]}
    if fmt in ("GIF", "PNG", "WEBP"):
        kwargs.update(duration=100, loop=0)
    if fmt == "WEBP":
        kwargs["lossless"] = True
    if fmt == "GIF":
        kwargs["disposal"] = 1
    if fmt == "MPO":
        kwargs["quality"] = 95
    frames[0].save(path, fmt, **kwargs)
    return path


def synth_moderator(backend: Backend | None = None, **kwargs: object) -> Moderator:
    return Moderator(backend or FigureBackend(), policy="synth-shapes", rules="general", **kwargs)  # type: ignore[arg-type]


FORMATS = [("GIF", "gif"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tiff")]


def _needs(fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow has no animated WebP support")


# --------------------------------------------------------------------------- sampling


def test_sample_frames_all_then_evenly_spaced_with_first_and_last() -> None:
    assert sample_frames(1, 16) == [0]
    assert sample_frames(5, 16) == [0, 1, 2, 3, 4]
    assert sample_frames(16, 16) == list(range(16))
    assert sample_frames(100, 5) == [0, 25, 50, 74, 99]  # rounded half way, first and last included
    assert sample_frames(17, 16)[0] == 0 and sample_frames(17, 16)[-1] == 16 and len(set(sample_frames(17, 16))) == 16
    assert sample_frames(1000, 1) == [0]
    for n in (2, 3, 7, 50, 999):
        for k in (2, 3, 8, 16):
            got = sample_frames(n, k)
            assert got == sorted(set(got)) and len(got) == min(n, k) and got[0] == 0 and got[-1] == n - 1
    with pytest.raises(ValueError):
        sample_frames(3, 0)


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(("fmt", "ext"), FORMATS)
def test_every_frame_is_decoded_as_its_own_view(tmp_path: Path, fmt: str, ext: str) -> None:
    _needs(fmt)
    path = save_animation(tmp_path / f"anim.{ext}", figures(6, 4), fmt)
    li = load_image(path)
    assert li.frames == 6 and li.frames_seen == 6
    assert [v.frame for v in li.views] == list(range(6))
    assert [read_figure(v.image) for v in li.views] == [BENIGN] * 4 + [OFFENDING] + [BENIGN]
    assert read_figure(li.image) == BENIGN  # ``image`` is still the first frame


@pytest.mark.parametrize(("fmt", "ext"), [("GIF", "gif"), ("TIFF", "tiff")])
def test_beyond_max_frames_sampled_evenly(tmp_path: Path, fmt: str, ext: str) -> None:
    path = save_animation(tmp_path / f"long.{ext}", one_scene(20, 19), fmt)
    li = load_image(path, max_frames=4)
    assert li.frames == 20 and li.frames_seen == 4
    assert [v.frame for v in li.views] == sample_frames(20, 4) == [0, 6, 13, 19]
    assert [v.timestamp for v in li.views] == ([0.0, 0.6, 1.3, 1.9] if fmt == "GIF" else [None] * 4)
    assert read_figure(li.views[-1].image) == OFFENDING  # the last frame is always seen
    assert any("4 evenly spaced judged" in n for n in li.notes)


def test_total_pixels_over_all_frames_are_bounded(tmp_path: Path) -> None:
    path = save_animation(tmp_path / "many.gif", one_scene(40, 39, size=64), "GIF")
    assert load_image(path, max_frames=4).frames_seen == 4
    # 40 frames of 64 x 64 must all be decoded to reach the last one: 164k pixels.
    with pytest.raises(ImageLoadError, match="megapixels decoded") as info:
        load_image(path, max_frames=4, max_pixels=64 * 64, max_total_pixels=100_000)
    assert "many.gif" in str(info.value)


def test_a_page_over_the_pixel_limit_is_refused(tmp_path: Path) -> None:
    pages = [draw_figure(BENIGN, size=32), draw_figure(OFFENDING, size=400)]
    path = tmp_path / "pages.tiff"
    pages[0].save(path, "TIFF", save_all=True, append_images=pages[1:])
    with pytest.raises(ImageLoadError, match=r"frame 1.*400x400"):
        load_image(path, max_pixels=100_000)
    assert load_image(path, max_pixels=320_000).views[1].image.size == (400, 400)
    # the views of one file share max_pixels: the page is decoded, then kept at its share
    loaded = load_image(path, max_pixels=200_000)
    assert loaded.views[1].image.size == (316, 316)
    assert any("reduced from 400x400 to 316x316" in n for n in loaded.notes), loaded.notes


def test_a_missing_late_frame_is_an_error(tmp_path: Path) -> None:
    path = save_animation(tmp_path / "cut.gif", figures(6, 5), "GIF")
    data = path.read_bytes()
    cut = tmp_path / "cut2.gif"
    cut.write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(ImageLoadError, match=r"cut2\.gif"):
        load_image(cut)


# --------------------------------------------------------------------------- the engine


@pytest.mark.parametrize(("fmt", "ext"), FORMATS)
def test_the_late_offending_frame_decides(tmp_path: Path, fmt: str, ext: str) -> None:
    _needs(fmt)
    path = save_animation(tmp_path / f"late.{ext}", figures(8, 6), fmt)
    benign = save_animation(tmp_path / f"benign.{ext}", figures(8, []), fmt)
    backend = FigureBackend()
    late, ok = synth_moderator(backend).moderate_paths([str(path), str(benign)])
    assert late.ok and late.verdict == "block" and late.product == "whole_bare_still"
    assert (late.frame, late.frames_seen, late.frame_count) == (6, 8, 8)
    # 100 ms per frame: frame 6 starts at 0.6 s (TIFF pages have no time)
    assert late.timestamp == (None if fmt == "TIFF" else 0.6)
    assert [s.frame for s in late.frame_scores] == list(range(8))
    assert [s.verdict for s in late.frame_scores] == ["allow"] * 6 + ["block", "allow"]
    assert late.p_violation == max(s.p_violation for s in late.frame_scores)
    assert any("frame 6" in n for n in late.notes)
    assert ok.ok and ok.verdict == "allow" and ok.frame == 0 and ok.frames_seen == 8
    # all 16 frames of both files went to the backend in one batch
    assert backend.batches == [16]


def test_multi_picture_jpeg_second_picture_is_judged(tmp_path: Path) -> None:
    """An MPO (a phone's stereo pair or main image plus a second picture) hides nothing either."""
    path = save_animation(tmp_path / "pair.jpg", figures(2, 1), "MPO")
    assert Image.open(path).format == "MPO"
    (r,) = synth_moderator().moderate_paths([str(path)])
    assert r.ok and r.verdict == "block" and (r.frame, r.frames_seen, r.frame_count) == (1, 2, 2)
    assert [s.verdict for s in r.frame_scores] == ["allow", "block"]


def test_still_image_record_has_frame_zero(tmp_path: Path) -> None:
    path = tmp_path / "still.png"
    draw_figure(OFFENDING).save(path)
    (r,) = synth_moderator().moderate_paths([str(path)])
    assert (r.frame, r.frames_seen, r.frame_count, r.background, r.timestamp) == (0, 1, 1, None, None)
    assert r.verdict == "block" and r.frame_scores == []


def test_a_failing_frame_makes_the_whole_file_an_error(tmp_path: Path) -> None:
    frames = figures(5, 4)
    frames[2] = draw_figure(POISON, seed=2)
    path = save_animation(tmp_path / "poison.gif", frames, "GIF")
    other = tmp_path / "other.png"
    draw_figure(BENIGN).save(other)
    bad, good = synth_moderator(FigureBackend(poison=True)).moderate_paths([str(path), str(other)])
    assert not bad.ok and bad.verdict is None
    assert "frame 2 at 0.2s (of 5 frames)" in (bad.error or "") and "crashed" in (bad.error or "")
    assert bad.frame == 2 and bad.frame_count == 5
    assert good.ok and good.verdict == "allow"  # the batch goes on


def test_cascade_aggregates_after_escalation(tmp_path: Path) -> None:
    path = save_animation(tmp_path / "late.gif", figures(5, 3), "GIF")
    first, second = FigureBackend(blind=True), FigureBackend()
    first.name, second.name = "blind", "sharp"
    mod = synth_moderator(first, escalate_to=second, explain=True)
    (r,) = mod.moderate_paths([str(path)])
    assert r.ok and r.stage == "sharp" and r.verdict == "block" and r.frame == 3
    assert any(n.startswith("escalated by blind") for n in r.notes)
    # the blind first stage could clear no frame; the second saw all five, and only the
    # frame kept was explained
    assert first.batches == [5] and second.batches == [5]
    assert second.explained == 1 and first.explained == 0 and r.explanation == f"I see {OFFENDING}"


def test_worst_view_is_the_most_severe_verdict_then_the_highest_p_then_the_earliest() -> None:
    def rec(p: float | None, verdict: str) -> ModerationRecord:
        return ModerationRecord(path="x", policy="p", rules="r", backend="b", p_violation=p, verdict=verdict)

    # a blocked frame blocks the file even where another frame has a higher P(violation)
    # (allowed product, P(violation) in the review band)
    assert _worst_view([rec(0.2, "allow"), rec(0.75, "review"), rec(0.72, "block")]) == 2
    assert _worst_view([rec(0.2, "allow"), rec(0.7, "review"), rec(0.5, "review")]) == 1
    assert _worst_view([rec(0.7, "review"), rec(0.7, "block"), rec(0.7, "block")]) == 1
    assert _worst_view([rec(0.1, "allow"), rec(0.1, "allow")]) == 0
    # a refused frame has no P(violation): it still keeps the file from being allowed
    assert _worst_view([rec(0.1, "allow"), rec(None, "review"), rec(0.2, "allow")]) == 1


# --------------------------------------------------------------------------- transparency


ALPHA_POLICY = """
name: white-shapes
term: {id: shape, question: "Is a white shape visible?"}
attributes:
  - id: shape
    question: "Is there a white shape?"
    values:
      - {id: visible, description: A white shape is visible}
      - {id: absent, description: No white shape}
products:
  - {id: shape_visible, assignment: {shape: visible}, description: A white shape.}
  - {id: shape_absent, assignment: {shape: absent}, positive: false, description: Nothing.}
rule_sets:
  - name: no-shapes
    audience: everyone
    rules: [{products: [shape_absent], label: allow}]
    default: violate
"""


class ShapeBackend(Backend):
    """Sees a white shape when a tenth of the picture is near white and a tenth near black."""

    name = "shapes"
    capabilities = frozenset({"score_yes_no", "choose"})

    @staticmethod
    def visible(im: Image.Image) -> bool:
        grey = np.asarray(im.convert("L"))
        return bool((grey > 220).mean() > 0.1 and (grey < 35).mean() > 0.1)

    def score_yes_no(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list:
        return [YesNoScore(0.97 if self.visible(im) else 0.03) for im in images]

    def choose(self, images: Sequence[Image.Image], question: str, options: Sequence[str]) -> list:
        return [Choice([0.97, 0.03] if self.visible(im) else [0.03, 0.97]) for im in images]


def white_shape_on_transparent(tmp_path: Path) -> Path:
    im = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
    for x in range(16, 48):
        for y in range(16, 48):
            im.putpixel((x, y), (255, 255, 255, 255))
    path = tmp_path / "ghost.png"
    im.save(path)
    return path


def test_alpha_content_visible_only_on_dark_is_judged_on_both(tmp_path: Path) -> None:
    path = white_shape_on_transparent(tmp_path)
    li = load_image(path)
    assert [v.background for v in li.views] == ["white", "black"]
    assert not ShapeBackend.visible(li.views[0].image) and ShapeBackend.visible(li.views[1].image)
    policy = tmp_path / "shapes.yaml"
    policy.write_text(ALPHA_POLICY)
    (r,) = Moderator(ShapeBackend(), policy=str(policy)).moderate_paths([str(path)])
    assert r.ok and r.verdict == "block" and r.background == "black" and r.product == "shape_visible"
    assert [(s.background, s.verdict) for s in r.frame_scores] == [("white", "allow"), ("black", "block")]
    # the same picture without alpha: one view, no background recorded
    flat = tmp_path / "flat.png"
    Image.open(path).convert("RGB").save(flat)
    (r2,) = Moderator(ShapeBackend(), policy=str(policy)).moderate_paths([str(flat)])
    assert r2.background is None and r2.frame_scores == []


def test_negligible_alpha_is_one_view(tmp_path: Path) -> None:
    im = draw_figure(BENIGN).convert("RGBA")
    im.putpixel((0, 0), (0, 0, 0, 0))  # 1 of 4096 pixels: below the tiny-fraction threshold
    li = load_image(_save(tmp_path / "edge.png", im))
    assert len(li.views) == 1 and li.views[0].background is None
    assert any("too few to matter" in n for n in li.notes)


def _save(path: Path, im: Image.Image) -> Path:
    im.save(path)
    return path


# --------------------------------------------------------------------------- video


def write_video(
    path: Path, seconds: float, rate: int, bad_from: float | None, *, size: int = 96, bad_until: float | None = None
) -> Path:
    """An H.264/VP9 video of benign figures, the offending one from ``bad_from`` seconds on (until ``bad_until``)."""
    av = pytest.importorskip("av")
    codec = "libvpx-vp9" if path.suffix == ".webm" else "libx264"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "4"} if codec == "libx264" else {"crf": "4", "b": "0"}
        for i in range(int(seconds * rate)):
            t = i / rate
            fig = OFFENDING if bad_from is not None and t >= bad_from and (bad_until is None or t < bad_until) else BENIGN
            image = draw_figure(fig, size=size, seed=7)
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("ext", ["mp4", "webm", "mkv", "mov"])
def test_video_late_offending_frame_decides(tmp_path: Path, ext: str) -> None:
    path = write_video(tmp_path / f"clip.{ext}", seconds=6, rate=10, bad_from=4.0)
    benign = write_video(tmp_path / f"calm.{ext}", seconds=6, rate=10, bad_from=None)
    backend = FigureBackend()
    r, ok = synth_moderator(backend).moderate_paths([str(path), str(benign)], fps=1.0)
    assert r.ok and r.verdict == "block" and r.product == "whole_bare_still"
    assert (r.frame, r.timestamp) == (40, 4.0)
    # every second and the last frame (5.9 s); the cut at 4 s is a regular sample already
    assert r.frames_seen == 7 and r.frame_count == 60
    assert [s.timestamp for s in r.frame_scores] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 5.9]
    assert [s.verdict for s in r.frame_scores] == ["allow"] * 4 + ["block"] * 3
    assert (r.unsampled_gap_frames, r.unsampled_gap_s, r.aggregate) == (9, 0.9, "worst")
    assert ok.ok and ok.verdict == "allow"
    assert backend.batches == [14]


def test_long_video_is_thinned_evenly_and_its_end_is_seen(tmp_path: Path) -> None:
    path = write_video(tmp_path / "long.mp4", seconds=60, rate=5, bad_from=58.0, size=64)
    (r,) = synth_moderator().moderate_paths([str(path)], fps=1.0, max_frames=5)
    assert r.ok and r.verdict == "block"
    # five evenly spaced over 0 .. 59.8 s (the last frame), and the cut at 58 s, met while
    # decoding from the key frame before the last sample
    assert r.frames_seen == 6 and r.frame_count == 300
    assert [s.timestamp for s in r.frame_scores] == [0.0, 15.0, 30.0, 45.0, 58.0, 59.8]
    assert [s.scene_change for s in r.frame_scores] == [False] * 4 + [True, False]
    assert (r.frame, r.timestamp) == (290, 58.0)
    assert (r.unsampled_gap_frames, r.unsampled_gap_s) == (74, 14.8)


def test_video_last_frame_is_always_judged(tmp_path: Path) -> None:
    """A 5 s video whose last half second offends: sampling every second stopped at 4 s."""
    path = write_video(tmp_path / "end.mp4", seconds=5, rate=10, bad_from=4.5)
    (r,) = synth_moderator().moderate_paths([str(path)], fps=1.0)
    assert r.ok and r.verdict == "block" and r.product == "whole_bare_still"
    li = load_video(path, fps=1.0)
    last = li.views[-1]
    assert (last.frame, last.timestamp, last.scene) == (49, 4.9, False)  # a regular sample, not a scene change
    assert [v.timestamp for v in li.views if not v.scene] == [0.0, 1.0, 2.0, 3.0, 4.0, 4.9]
    # the last frame is kept even when a long video is thinned to two frames
    li2 = load_video(write_video(tmp_path / "long.mp4", seconds=30, rate=5, bad_from=None, size=32), max_frames=2)
    assert [v.timestamp for v in li2.views if not v.scene] == [0.0, 29.8]


def test_a_short_scene_between_samples_is_judged(tmp_path: Path) -> None:
    """Three offending frames (2.3-2.5 s) between the samples at 2 s and 3 s: the cut is judged."""
    path = write_video(tmp_path / "flash.mp4", seconds=10, rate=10, bad_from=2.3, bad_until=2.6)
    (r,) = synth_moderator().moderate_paths([str(path)], fps=1.0)
    assert r.ok and r.verdict == "block" and (r.frame, r.timestamp) == (23, 2.3)
    flagged = [(s.timestamp, s.scene_change) for s in r.frame_scores if s.verdict == "block"]
    assert flagged == [(2.3, True)]
    # the cut back to the benign scene (2.6 s) is a scene change too
    assert [s.timestamp for s in r.frame_scores if s.scene_change] == [2.3, 2.6]
    assert any("2 more at scene changes" in n for n in r.notes)
    # the longest stretch left unjudged: 9 frames between two regular samples
    assert (r.unsampled_gap_frames, r.unsampled_gap_s) == (9, 0.9)
    calm = write_video(tmp_path / "calm.mp4", seconds=10, rate=10, bad_from=None)
    assert not any(v.scene for v in load_video(calm).views)  # a still scene adds nothing


def test_gif_frame_37_of_40_is_judged_at_16_frames(tmp_path: Path) -> None:
    """Evenly spaced sampling of 40 frames at --max-frames 16 steps over frame 37; its scene change is judged."""
    path = save_animation(tmp_path / "flash.gif", one_scene(40, 37), "GIF")
    (r,) = synth_moderator().moderate_paths([str(path)], max_frames=16)
    assert r.ok and r.verdict == "block" and r.frame == 37 and r.timestamp == 3.7
    li = load_image(path, max_frames=16)
    regular = [v.frame for v in li.views if not v.scene]
    assert regular == sample_frames(40, 16) and 37 not in regular
    assert [v.frame for v in li.views if v.scene] == [37, 38]  # the cut in and the cut back
    assert r.frames_seen == 18 and r.unsampled_gap_frames == 2 and r.unsampled_gap_s == 0.2
    assert [s.frame for s in r.frame_scores if s.scene_change] == [37, 38]
    # every frame judged: nothing left out
    (whole,) = synth_moderator().moderate_paths([str(path)], max_frames=40)
    assert (whole.unsampled_gap_frames, whole.unsampled_gap_s) == (0, 0.0)


def test_video_display_rotation_is_applied(tmp_path: Path) -> None:
    """A phone's portrait video is stored sideways with a display matrix; frames are judged upright."""
    av = pytest.importorskip("av")
    path = tmp_path / "portrait.mp4"
    stored = Image.new("RGB", (64, 32), (220, 20, 20))
    stored.paste((20, 20, 220), (0, 16, 64, 32))  # red top half, blue bottom half as stored
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)  # shown turned 90 degrees counter-clockwise
        for _ in range(5):
            for packet in stream.encode(av.VideoFrame.from_image(stored)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    li = load_video(path)
    im = li.views[0].image
    assert im.size == (32, 64) and (li.width, li.height) == (32, 64)
    # counter-clockwise: the stored top (red) is now on the left
    left, right = im.getpixel((4, 32)), im.getpixel((27, 32))
    assert left[0] > 150 and left[2] < 90 and right[2] > 150 and right[0] < 90, (left, right)
    assert any("display matrix" in n for n in li.notes)


def test_video_without_pyav_is_a_per_file_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_video(tmp_path / "clip.mp4", seconds=1, rate=5, bad_from=None, size=32)
    still = tmp_path / "still.png"
    draw_figure(BENIGN).save(still)
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    bad, good = synth_moderator().moderate_paths([str(path), str(still)])
    assert not bad.ok and "icm-assistant[video]" in (bad.error or "") and "clip.mp4" in (bad.error or "")
    assert good.ok


def test_corrupt_video_is_a_per_file_error(tmp_path: Path) -> None:
    pytest.importorskip("av")
    path = tmp_path / "junk.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)
    (r,) = synth_moderator().moderate_paths([str(path)])
    assert not r.ok and "junk.mp4" in (r.error or "")


# --------------------------------------------------------------------------- end to end


def test_cli_with_the_scripted_teacher_names_the_late_frame(tmp_path: Path) -> None:
    """`icm moderate --backend openai` against the scripted teacher: GIF, APNG and video.

    Each file's record must be the one its offending frame gets when moderated alone
    (same product, P(violation) and verdict), and name that frame.
    """
    media = tmp_path / "media"
    media.mkdir()
    frames = figures(7, 5)
    save_animation(media / "anim.gif", frames, "GIF")
    save_animation(media / "anim.png", frames, "PNG")
    frames[5].save(media / "still_bad.png")
    frames[0].save(media / "still_ok.png")
    write_video(media / "clip.mp4", seconds=5, rate=10, bad_from=3.0)
    out = tmp_path / "out.jsonl"
    with TeacherServer() as teacher:
        result = CliRunner().invoke(app, [
            "moderate", str(media), "--policy", "synth-shapes", "--rules", "general", "--backend", "openai",
            "--model", teacher.model, "--base-url", teacher.base_url, "--out", str(out), "--max-frames", "8",
            "--fps", "2",
        ])
    assert result.exit_code == 0, result.output
    records = {Path(r.path).name: r for r in read_records(out)[0]}
    assert set(records) == {"anim.gif", "anim.png", "clip.mp4", "still_bad.png", "still_ok.png"}
    bad, ok = records["still_bad.png"], records["still_ok.png"]
    assert bad.verdict != "allow" and ok.verdict != "block"
    assert bad.p_violation is not None and ok.p_violation is not None and bad.p_violation > ok.p_violation
    for name in ("anim.gif", "anim.png"):
        r = records[name]
        assert (r.frame, r.frames_seen, r.frame_count) == (5, 7, 7), name
        assert (r.verdict, r.product, r.p_violation) == (bad.verdict, bad.product, bad.p_violation), name
        assert [s.p_violation for s in r.frame_scores] == [ok.p_violation] * 5 + [bad.p_violation, ok.p_violation]
    v = records["clip.mp4"]
    assert (v.frame, v.timestamp) == (30, 3.0)
    assert (v.verdict, v.product, v.p_violation) == (bad.verdict, bad.product, bad.p_violation)
    # 10 sample times at 2 fps over 5 s and the last frame (4.9 s), thinned evenly to 8 (first and last kept)
    assert v.frames_seen == 8 and v.frame_count == 50
    assert [s.timestamp for s in v.frame_scores] == [0.0, 0.5, 1.5, 2.0, 3.0, 3.5, 4.5, 4.9]
    raw = json.loads(out.read_text().splitlines()[0])
    assert {"frame", "frames_seen", "frame_count", "timestamp", "background", "frame_scores"} <= set(raw)


def test_library_moderate_takes_max_frames(tmp_path: Path) -> None:
    path = save_animation(tmp_path / "late.gif", one_scene(10, 9), "GIF")
    (r,) = moderate([str(path)], policy="synth-shapes", rules="general", backend=FigureBackend(), max_frames=3)
    assert r.frames_seen == 3 and r.frame == 9 and r.verdict == "block"


def test_cli_rejects_bad_frame_options(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    draw_figure(BENIGN).save(path)
    for args in (["--max-frames", "0"], ["--fps", "0"]):
        result = CliRunner().invoke(app, ["moderate", str(path), *args])
        assert result.exit_code == 2, (args, result.output)
