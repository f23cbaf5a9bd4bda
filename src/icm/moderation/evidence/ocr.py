"""RapidOCR gated by text detection: recognition only where the detector finds text.

RapidOCR (PP-OCRv6 small, ONNX models inside the wheel) is two networks: a text detector
(DB, a probability map of text pixels) and a recogniser run on each detected line. Most
images a moderation service sees hold no text, so :class:`RapidOCRSource` runs the
detector first, on every image of a batch at a reduced resolution (longest side
:data:`OCR_GATE_SIDE`), in one session call per padded shape; the recogniser then reads
only the lines found, cut from the image at up to :data:`OCR_MAX_SIDE` (so text stays
legible), all lines of the batch in one call. An image where the detector finds nothing
costs the detector alone: no recognition.

The gate's resolution is the trade-off: at 224 a line of print is found when its font is
about 4% of the image's longest side or more (28 px on a 640-pixel photo, 40 px on a
1080-pixel one), at 320 about 3%; smaller captions are missed. The rendered posters of the
tests and the headlines of adverts are found. The angle classifier is off (upside-down text is rare in what this looks for).

The detector is RapidOCR's, quantised to int8 once and cached
(:mod:`icm.moderation.evidence.ocr_int8`; ``ICM_OCR_INT8=0`` keeps the float model): about
70% of the float model's CPU time, the same lines found.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from icm.moderation.backends.base import Box
from icm.moderation.evidence.catalog import SourceKind
from icm.moderation.evidence.ocr_int8 import ensure_int8, gate_input
from icm.moderation.evidence.sources import EvidenceSource, SourceOutput, fit_size

OCR_MAX_SIDE = 1280
"""Longest side of the image text lines are cut from (larger images are scaled down first)."""

OCR_GATE_SIDE = 224
"""Longest side of the image the text detector sees (the gate); ``$ICM_OCR_GATE_SIDE`` changes it."""

GATE_BOX_THRESH = 0.6
"""Least mean text probability of a detected line (PaddleOCR's default; RapidOCR's is 0.5):
at the gate's resolution, textures of photos score 0.5-0.6, printed lines 0.7 and up."""

OCR_MIN_SIDE = 8
"""An image whose shorter side is below this many pixels cannot hold legible text: it is
reported as not read (never as "no text found", which would clear it)."""

TEXT_SCORE = 0.5
"""Recognised lines below this confidence are dropped (RapidOCR's default)."""

_STRIDE = 32  # the detector's input sides are multiples of this


def gate_size(width: int, height: int, side: int = OCR_GATE_SIDE) -> tuple[int, int]:
    """The (width, height) an image is scaled to for the text detector (never enlarged)."""
    scale = min(1.0, side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class RapidOCRSource(EvidenceSource):
    """RapidOCR with the text detector as a gate (module docstring): text lines with boxes.

    :attr:`recognised` counts the text lines read so far (the recogniser's work);
    :attr:`det_model` is the file of the text detector that runs (once loaded): the int8
    copy of :mod:`icm.moderation.evidence.ocr_int8` where it can be made, else RapidOCR's.
    """

    name = "rapidocr"
    kind: SourceKind = "ocr"

    def __init__(self, *, intra_op_num_threads: int | None = None, batch_size: int | None = None,
                 gate_side: int | None = None) -> None:
        super().__init__(intra_op_num_threads=intra_op_num_threads, batch_size=batch_size)
        env = os.environ.get("ICM_OCR_GATE_SIDE", "").strip()
        if gate_side is None and env:
            if not env.isdigit() or int(env) < _STRIDE:
                raise ValueError(f"$ICM_OCR_GATE_SIDE must be a whole number of pixels, at least {_STRIDE}; got {env!r}")
            gate_side = int(env)
        self.gate_side = gate_side or OCR_GATE_SIDE
        self.recognised = 0
        self.det_model: str | None = None

    def _load(self) -> Any:
        from rapidocr import RapidOCR

        params: dict[str, Any] = {
            "Global.log_level": "error",
            "Global.use_cls": False,
            "Global.max_side_len": OCR_MAX_SIDE,
            "Det.limit_type": "max",
            "Det.limit_side_len": self.gate_side,
            "Det.box_thresh": GATE_BOX_THRESH,
            "Rec.rec_batch_num": 8,  # lines sorted by width, padded to the widest of each call
            # and to at least 160 wide, not RapidOCR's 320: a short word costs half (the posters' lines read the same)
            "Rec.rec_img_shape": [3, 48, 160],
            "EngineConfig.onnxruntime.enable_cpu_mem_arena": True,  # RapidOCR turns it off; a batch reuses it
        }
        if self.intra_op_num_threads is not None:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = self.intra_op_num_threads
        engine = RapidOCR(params=params)
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)
        engine._load_det_model()
        engine._load_rec_model()
        text_det: Any = engine.text_det
        det: Any = text_det.session  # RapidOCR's wrapper: the gate calls it, as before
        float_model = Path(det.session._model_path)
        int8 = ensure_int8(float_model)
        if int8 is not None:  # the same session options (threads, arena), the quantised graph
            det.session = ort.InferenceSession(str(int8), sess_options=det.session.get_session_options(),
                                               providers=["CPUExecutionProvider"])
        self.det_model = str(int8 or float_model)
        return engine

    # -- the gate: text detection at a reduced resolution, batched --------------------------

    def detect(self, images: Sequence[Image.Image], sizes: Sequence[tuple[int, int]] | None = None) -> list[np.ndarray]:
        """Text-line quadrilaterals per image (``(k, 4, 2)``), in coordinates of an image of
        ``sizes[i]`` (width, height; default the image's own size)."""
        det = self.model().text_det
        groups: dict[tuple[int, int], list[int]] = {}
        inputs: list[np.ndarray] = []
        gated: list[tuple[int, int]] = []
        for i, im in enumerate(images):
            gw, gh = gate_size(im.width, im.height, self.gate_side)
            inputs.append(gate_input(im, gw, gh))
            gated.append((gw, gh))
            groups.setdefault(inputs[-1].shape[1:], []).append(i)
        out: list[np.ndarray] = [np.zeros((0, 4, 2), dtype=np.float32)] * len(images)
        for idx in groups.values():
            step = self.batch_size or len(idx)
            for start in range(0, len(idx), step):
                part = idx[start : start + step]
                preds = det.session(np.stack([inputs[i] for i in part]))
                for k, i in enumerate(part):
                    gw, gh = gated[i]
                    w, h = sizes[i] if sizes is not None else images[i].size
                    boxes, _ = det.postprocess_op(preds[k : k + 1, :, :gh, :gw], (h, w))  # without the padding
                    if len(boxes):
                        out[i] = det.sorted_boxes(np.asarray(boxes, dtype=np.float32))
        return out

    # -- recognition of the lines found ------------------------------------------------------

    def run(self, images: Sequence[Image.Image]) -> list[SourceOutput]:
        """Text lines per image; an image OCR fails on is an error output (not "no text"), the
        others are still read."""
        if not images:
            return []
        engine = self.model()  # a model that cannot load fails the call, as for every source
        try:
            return self._run_batch(engine, images)
        except Exception as exc:  # noqa: BLE001 - find the image it was, read the others
            if len(images) > 1:
                return [o for im in images for o in self.run([im])]
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return [SourceOutput(error=f"could not read the image ({detail})")]

    def _run_batch(self, engine: Any, images: Sequence[Image.Image]) -> list[SourceOutput]:
        from rapidocr.ch_ppocr_rec import TextRecInput
        from rapidocr.utils.process_img import get_rotate_crop_image

        out: list[SourceOutput | None] = [None] * len(images)
        todo: list[int] = []
        for i, im in enumerate(images):
            if min(im.size) >= OCR_MIN_SIDE:
                todo.append(i)
            else:
                out[i] = SourceOutput(error=f"could not read the image ({im.width}x{im.height}: too thin to hold legible text)")
        # the lines' boxes in the coordinates of the image they are cut from (at most OCR_MAX_SIDE a side)
        cut_sizes = [fit_size(images[i].width, images[i].height, OCR_MAX_SIDE) for i in todo]
        quads = self.detect([images[i] for i in todo], cut_sizes) if todo else []
        crops: list[np.ndarray] = []
        owner: list[tuple[int, np.ndarray]] = []
        for k, (i, boxes) in enumerate(zip(todo, quads, strict=True)):
            out[i] = SourceOutput(boxes=[])
            if not len(boxes):
                continue  # no text found: nothing to read
            im = images[i] if images[i].mode == "RGB" else images[i].convert("RGB")
            cut = np.asarray(im if im.size == cut_sizes[k] else im.resize(cut_sizes[k], Image.Resampling.BILINEAR, reducing_gap=2.0))
            for quad in boxes:
                crops.append(get_rotate_crop_image(cut, quad.copy()))
                owner.append((k, quad))
        if crops:
            rec = engine.text_rec(TextRecInput(img=crops))
            self.recognised += len(crops)
            for (k, quad), text, score in zip(owner, rec.txts or (), rec.scores or (), strict=True):
                if score < TEXT_SCORE or not str(text).strip():
                    continue
                sx, sy = images[todo[k]].width / cut_sizes[k][0], images[todo[k]].height / cut_sizes[k][1]
                x0, y0 = float(quad[:, 0].min()), float(quad[:, 1].min())
                result = out[todo[k]]
                assert result is not None
                result.boxes.append(Box(label=str(text), score=float(score), x=x0 * sx, y=y0 * sy,
                                        w=(float(quad[:, 0].max()) - x0) * sx, h=(float(quad[:, 1].max()) - y0) * sy))
        return [o if o is not None else SourceOutput() for o in out]
