"""The hf backend's options (a small module: the backend itself loads torch and transformers)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from icm.moderation.spec import MLLMOptions, Threads


class HFOptions(MLLMOptions):
    """``--backend hf``: a multimodal model run here with transformers."""

    model_hint: ClassVar[str] = "a hub id or a local path"
    not_arguments: ClassVar[frozenset[str]] = frozenset({"text_confidence", "preset"})  # both for a preset

    backend: Literal["hf"] = "hf"
    adapter: str | None = Field(None, description="hf: LoRA adapter path.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="hf: weight dtype.")
    device: str = Field("auto", description="hf: auto, cpu, cuda, cuda:1, mps ...")
    threads: Threads = None
