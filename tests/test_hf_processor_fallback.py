"""The image-only processor fallback must not depend on whether torchvision is installed.

On an H100 (torch 2.11, transformers 5.17, torchvision installed), loading the tiny Qwen2-VL
by path errored with OSError: its processor was saved image-only, so it has no video
processor config, and transformers' video processor loader raises OSError for that with or
without torchvision. The fallback used to give up whenever torchvision was importable.
This machine has no torchvision: the test makes `find_spec` report it, as it did there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_image_only_checkpoint_loads_where_torchvision_is_installed(tiny_qwen2vl_path: Path, monkeypatch) -> None:
    from transformers import AutoProcessor

    from icm.moderation.backends.hf_processor import load_processor

    real = importlib.util.find_spec

    def torchvision_installed(name: str, *args: object, **kwargs: object) -> object:
        return real("json") if name == "torchvision" else real(name, *args, **kwargs)

    with pytest.raises(OSError, match="video processor"):  # what the H100 run met
        AutoProcessor.from_pretrained(tiny_qwen2vl_path)
    monkeypatch.setattr(importlib.util, "find_spec", torchvision_installed)
    processor, fallback = load_processor(str(tiny_qwen2vl_path))
    assert fallback
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert "video_processor" not in type(processor).get_attributes()
    assert processor.image_processor is not None and processor.tokenizer is not None
