"""RapidOCR's text detector (the OCR gate) quantised to 8-bit integers, made once and cached.

The gate's detector is most of OCR's cost on photos without text (issue 23). Quantised
statically (onnxruntime's QDQ format, per-channel int8 weights, uint8 activations whose
ranges are calibrated on the safe sample photos: china and flower from scikit-learn,
grace_hopper from matplotlib, also in the repository's ``examples/images``) it runs in
about 70% of the float model's CPU time and finds the same lines (docs/offline-evidence.md).
The recogniser stays in floating point: quantised it read spurious glyphs on photos.

At first use the quantised model is written to the cache directory (``$ICM_CACHE_DIR``,
else ``$XDG_CACHE_HOME/icm``, else ``~/.cache/icm``), named after the float model's
content, and from then on loaded from there. Making it needs the ``onnx`` package (the
``[objects]`` extra) and the sample photos; without them, or with ``ICM_OCR_INT8=0``, the
float detector runs. A deployment image can make it at build time with
``python -m icm.moderation.evidence.ocr_int8``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from icm.moderation.evidence.efficientnet import cache_dir

CALIBRATION_SIDE = 224
"""Longest side of the calibration inputs (the gate's default resolution)."""

RECIPE = 1
"""Version of the calibration and quantisation recipe, in the cached file's name: a new one is made when it changes."""

_STRIDE = 32
_MEAN = _STD = 0.5  # RapidOCR's detector normalisation: (x / 255 - 0.5) / 0.5
_REPO_PHOTOS = Path(__file__).resolve().parents[4] / "examples" / "images"
_lock = threading.Lock()


def int8_enabled() -> bool:
    """False when ``$ICM_OCR_INT8`` is ``0`` (the float detector is kept)."""
    return os.environ.get("ICM_OCR_INT8", "1").strip() != "0"


def calibration_photos() -> list[Path]:
    """The safe sample photos the activation ranges are measured on (empty if none is here)."""
    names = ("china.jpg", "flower.jpg", "grace_hopper.jpg")
    if all((_REPO_PHOTOS / n).is_file() for n in names):
        return [_REPO_PHOTOS / n for n in names]
    found: list[Path] = []
    for module, sub, wanted in (("sklearn", "datasets/images", names[:2]), ("matplotlib", "mpl-data/sample_data", names[2:])):
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            return []
        for n in wanted:
            p = Path(spec.origin).parent / sub / n
            if not p.is_file():
                return []
            found.append(p)
    return found


def gate_input(im: Image.Image, width: int, height: int) -> np.ndarray:
    """``im`` scaled to (width, height), normalised as the detector wants and zero-padded to
    multiples of 32: a ``(3, H, W)`` float32 array."""
    small = im.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0) if (width, height) != im.size else im
    canvas = np.zeros((max(_STRIDE, -(-height // _STRIDE) * _STRIDE), max(_STRIDE, -(-width // _STRIDE) * _STRIDE), 3),
                      dtype=np.float32)
    canvas[:height, :width] = (np.asarray(small.convert("RGB"), dtype=np.float32) / 255.0 - _MEAN) / _STD
    return canvas.transpose(2, 0, 1)


def _calibration_inputs(photos: list[Path]) -> Iterator[dict[str, np.ndarray]]:
    for p in photos:
        with Image.open(p) as raw:
            im = raw.convert("RGB")
        scale = min(1.0, CALIBRATION_SIDE / max(im.size))
        size = max(1, round(im.width * scale)), max(1, round(im.height * scale))
        for view in (im, ImageOps.mirror(im)):
            yield {"x": gate_input(view, *size)[None]}


def int8_path(float_model: Path) -> Path:
    """Where the quantised copy of ``float_model`` is cached (named after its content)."""
    digest = hashlib.sha256(float_model.read_bytes()).hexdigest()[:12]
    return cache_dir() / f"rapidocr-det-{digest}-int8-v{RECIPE}.onnx"


def can_quantise() -> bool:
    return importlib.util.find_spec("onnx") is not None and bool(calibration_photos())


def quantise(float_model: Path, path: Path) -> Path:
    """Write the statically quantised detector to ``path``; returns it."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.inputs = _calibration_inputs(calibration_photos())

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.inputs, None)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tempfile.TemporaryDirectory() as work:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(float_model), str(pre), skip_symbolic_shape=True)
        # per-channel scales need DequantizeLinear's axis: opset 13 (RapidOCR's model is opset 11)
        onnx.save(version_converter.convert_version(onnx.load(str(pre)), 13), str(pre))
        quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    os.replace(tmp, path)
    return path


def ensure_int8(float_model: Path) -> Path | None:
    """The quantised detector's path, made first if need be; None where it is turned off or
    cannot be made here (the float detector then runs)."""
    if not int8_enabled():
        return None
    with _lock:
        path = int8_path(float_model)
        if path.is_file():
            return path
        if not can_quantise():
            return None
        return quantise(float_model, path)


if __name__ == "__main__":  # pragma: no cover - a build step
    from icm.moderation.evidence.ocr import RapidOCRSource

    src = RapidOCRSource()
    src.model()
    print(src.det_model)
