"""Loading a checkpoint's processor, with an image-only fallback.

Qwen2-VL, Qwen2.5-VL, SmolVLM... processors hold a video processor, which needs
torchvision and which an image-only checkpoint (a tuned one, or one saved by the
fallback) has no config for. :func:`load_processor` then loads the processor's image-only
subclass (:func:`image_only_processor_class`), which keeps the stock class name.

transformers is imported lazily.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
from typing import Any

__all__ = ["image_only_processor_class", "load_processor"]

logger = logging.getLogger("icm.moderation.backends.hf")


@functools.cache
def image_only_processor_class(base: type[Any]) -> type[Any]:
    """``base`` restricted to its image processor and tokenizer.

    Qwen2-VL, Qwen2.5-VL, SmolVLM... processors also hold a video processor, which needs
    torchvision; without it they cannot even be loaded. The subclass keeps the stock name,
    so a processor it saves still names the real class.
    """
    attributes = [a for a in base.get_attributes() if a in ("image_processor", "tokenizer")]

    def get_attributes(cls: type) -> list[str]:
        return list(attributes)

    return type(base.__name__, (base,), {"get_attributes": classmethod(get_attributes), "__module__": base.__module__})


def _processor_class_name(model: str, **kwargs: Any) -> str | None:
    """The processor class a checkpoint names (processor/preprocessor/tokenizer config)."""
    from transformers.utils import cached_file

    for filename in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            resolved = cached_file(
                model,
                filename,
                local_files_only=bool(kwargs.get("local_files_only", False)),
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except Exception:  # noqa: BLE001 - a missing or unreadable file just means "look further"
            resolved = None
        if not resolved:
            continue
        with open(resolved, encoding="utf-8") as fh:
            name = json.load(fh).get("processor_class")
        if name:
            return str(name)
    try:
        from transformers import AutoConfig
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        config = AutoConfig.from_pretrained(model, **kwargs)
        name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
        return name if isinstance(name, str) else None
    except Exception:  # noqa: BLE001 - the class name is a hint only: without it the stock loader decides
        return None


def _import_class(spec: str | type[Any]) -> type[Any]:
    if isinstance(spec, type):
        return spec
    import transformers

    if "." not in spec:
        return getattr(transformers, spec)
    module, _, name = spec.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_processor(model: str, processor_class: str | type | None = None, **kwargs: Any) -> tuple[Any, bool]:
    """Load a checkpoint's processor; returns ``(processor, used_image_only_fallback)``.

    ``processor_class`` (a class, a transformers class name or a dotted path) bypasses
    ``AutoProcessor``. When loading fails and the checkpoint's processor has a video
    processor, its image-only subclass is loaded instead: the video processor needs
    torchvision, and an image-only checkpoint (a tuned one, or one saved by that subclass)
    has no video processor config, which fails with OSError even where torchvision is.
    """
    from transformers import AutoProcessor

    base: type[Any] | None = _import_class(processor_class) if processor_class is not None else None
    try:
        loader = base if base is not None else AutoProcessor
        return loader.from_pretrained(model, **kwargs), False
    except Exception as err:  # re-raised below unless the image-only processor loads
        name = base.__name__ if base is not None else _processor_class_name(model, **kwargs)
        if base is None and name:
            try:
                base = _import_class(name)
            except (AttributeError, ImportError):
                base = None
        if base is None or "video_processor" not in base.get_attributes():
            raise
        try:
            # classes are hashable; mypy does not see type[Any] as typeshed's Hashable (lru_cache's key)
            processor = image_only_processor_class(base).from_pretrained(model, **kwargs)  # type: ignore[arg-type]
        except Exception as second:  # the first error is the one to report
            raise err from second
        logger.info("loaded %s without its video processor (%s: %s)", name, type(err).__name__, err)
        return processor, True
