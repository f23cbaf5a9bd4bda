"""Guard models as presets behind icm's policy: ``--preset llavaguard`` (also QwenGuard),
``--preset shieldgemma2`` and ``--preset llama-guard-4`` on the hf and openai backends.

See docs/presets.md. :func:`with_preset` wraps a backend; :mod:`.formats` renders the
prompts, :mod:`.replies` reads the replies, :mod:`.backend` turns them into records.
"""

from __future__ import annotations

from icm.moderation.backends.base import Backend
from icm.moderation.presets.backend import NATIVE_SCHEME, PRESET_NAMES, PresetBackend, PresetName

__all__ = ["NATIVE_SCHEME", "PRESET_NAMES", "PresetBackend", "PresetName", "with_preset"]


def with_preset(backend: Backend, preset: str | None, *, text_confidence: float | None = None) -> Backend:
    """``backend`` serving guard model ``preset`` (unchanged when ``preset`` is None); a verdict
    the guard writes as text counts at ``text_confidence`` (default: the backend's, else 0.75)."""
    if not preset:
        return backend
    if backend.name not in ("hf", "openai"):
        backend.close()
        raise ValueError(f"--preset {preset} runs on the hf or openai backend, not {backend.name}")
    return PresetBackend(backend, preset, text_confidence=text_confidence)
