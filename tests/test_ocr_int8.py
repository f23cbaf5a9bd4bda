"""The OCR gate's int8 text detector (issue 23): made once from the safe sample photos and
cached, used by default, turned off by ICM_OCR_INT8=0; it finds what the float one finds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import onnx
import pytest
from PIL import Image
from test_offline_evidence import GAMBLING_POSTERS, PHOTOS, _poster

from icm.moderation.evidence import ocr_int8
from icm.moderation.evidence.ocr import RapidOCRSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from ocr_text_size import PLACES, with_word  # the measurement docs/offline-evidence.md reports

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("rapidocr") is None or importlib.util.find_spec("onnx") is None,
    reason="needs the [ocr] extra and onnx ([objects])")


def _ops(path: str) -> set[str]:
    return {n.op_type for n in onnx.load(path).graph.node}


def test_the_gate_runs_an_int8_detector_made_once_and_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ICM_CACHE_DIR", str(tmp_path))
    src = RapidOCRSource(intra_op_num_threads=1)
    src.model()
    assert src.det_model is not None and Path(src.det_model).parent == tmp_path, src.det_model
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(src.det_model)  # int8, not RapidOCR's float graph
    assert src.model().text_det.session.session.get_session_options().intra_op_num_threads == 1  # threads kept

    def no_second_time(*args: object) -> Path:
        raise AssertionError("the int8 detector was made again instead of read from the cache")

    monkeypatch.setattr(ocr_int8, "quantise", no_second_time)
    again = RapidOCRSource(intra_op_num_threads=1)
    again.model()
    assert again.det_model == src.det_model


def test_icm_ocr_int8_0_keeps_rapidocrs_float_detector(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ICM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ICM_OCR_INT8", "0")
    src = RapidOCRSource(intra_op_num_threads=1)
    src.model()
    assert src.det_model is not None and "QuantizeLinear" not in _ops(src.det_model)
    assert "rapidocr" in Path(src.det_model).parts and not list(tmp_path.iterdir())


def test_the_int8_gate_reads_the_posters_and_print_of_4_percent_as_the_float_one_does(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    posters = [Image.open(_poster(GAMBLING_POSTERS[n], tmp_path / n)).convert("RGB") for n in sorted(GAMBLING_POSTERS)]
    photos = [Image.open(p).convert("RGB") for p in PHOTOS]
    read: dict[str, tuple[list[list[str]], int]] = {}
    for int8 in ("1", "0"):
        monkeypatch.setenv("ICM_OCR_INT8", int8)
        src = RapidOCRSource(intra_op_num_threads=1)
        lines = [[b.label for b in o.boxes] for o in src.run(posters)]
        found = 0
        for photo in photos:  # a word whose font is 4% of the photo's longest side, at three places
            for place, word in PLACES:
                got = src.run([with_word(photo, 4.0, place, word)])[0].boxes
                found += any(word.lower().replace(" ", "") in b.label.lower().replace(" ", "") for b in got)
        read[int8] = lines, found
    assert read["1"][0] == read["0"][0] and all(read["1"][0]), read  # every poster line, word for word
    # most of the nine 4% words, and no fewer than the float gate less one (here: int8 8, float 7;
    # another CPU's kernels may round a borderline word the other way)
    assert read["1"][1] >= 7 and read["1"][1] >= read["0"][1] - 1, read
