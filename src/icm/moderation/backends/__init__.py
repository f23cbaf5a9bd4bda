"""Model backends behind the moderation engine, created by name from the registry
(:mod:`icm.moderation.backends.registry`).

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
from icm.moderation.backends.registry import BackendNames, register

BACKENDS: BackendNames = BackendNames(composite=False)
"""The registered single backends (a live view of :mod:`~icm.moderation.backends.registry`)."""

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
    "register",
]


def create_backend(name: str, **options: Any) -> Backend:
    """A backend by name; ``options`` are its constructor's keyword arguments (None ones dropped)."""
    from icm.moderation.backends.registry import backend_class, options_class

    opts = {k: v for k, v in options.items() if v is not None}
    cls = backend_class(name)  # a ValueError naming the registered backends for an unknown name
    model = options_class(name)
    hint = getattr(model, "model_hint", None)
    if hint and not opts.get("model"):  # an MLLM backend (see icm.moderation.spec.MLLMOptions)
        raise ValueError(f"the {name} backend needs --model ({hint}); it needs a model to run")
    return cls(**opts)
