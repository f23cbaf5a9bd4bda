"""Model backends behind the moderation engine, created by name.

Backends import their heavy dependencies (torch, transformers, onnxruntime) lazily, so
``import icm`` stays light and a missing extra is reported only when it is needed.
"""

from __future__ import annotations

from typing import Any

from icm.moderation.backends.base import (
    DEFAULT_MIN_LABEL_MASS,
    Backend,
    BackendConfigError,
    Box,
    Choice,
    Failed,
    NotJudged,
    Query,
    YesNoScore,
)

BACKENDS = ("detector", "hf", "openai")

__all__ = [
    "BACKENDS",
    "DEFAULT_MIN_LABEL_MASS",
    "Backend",
    "BackendConfigError",
    "Box",
    "Choice",
    "Failed",
    "NotJudged",
    "Query",
    "YesNoScore",
    "create_backend",
]


def create_backend(name: str, **options: Any) -> Backend:
    """A backend by name; ``options`` are its constructor's keyword arguments (None ones dropped)."""
    opts = {k: v for k, v in options.items() if v is not None}
    if name == "detector":
        from icm.moderation.backends.detector import DetectorBackend

        return DetectorBackend(**opts)
    if name == "hf":
        if not opts.get("model"):
            raise ValueError("the hf backend needs --model (a hub id or a local path)")
        from icm.moderation.backends.hf import HFBackend

        return HFBackend(**opts)
    if name == "openai":
        if not opts.get("model"):
            raise ValueError("the openai backend needs --model (the model name the server serves)")
        from icm.moderation.backends.openai_compat import OpenAIBackend

        return OpenAIBackend(**opts)
    raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)}, or cascade)")
