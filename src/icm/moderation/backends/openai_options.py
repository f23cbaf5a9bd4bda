"""The openai backend's options: an OpenAI-compatible server (vLLM, SGLang, llama.cpp, a hosted API)."""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import Field

from icm.moderation.spec import GuidedChoice, MLLMOptions


class OpenAIOptions(MLLMOptions):
    """``--backend openai``: a multimodal model behind an OpenAI-compatible chat API."""

    model_hint: ClassVar[str] = "the model name the server serves"

    backend: Literal["openai"] = "openai"
    base_url: str | None = Field(
        None, description="openai: the server's API root (default $ICM_OPENAI_BASE_URL or $OPENAI_BASE_URL)."
    )
    guided_choice: GuidedChoice = Field("off", description="openai: constrain answers to the labels.")
    api_key_env: str | None = Field(
        None,
        description="openai: the environment variable holding the API key "
        "(default $ICM_OPENAI_API_KEY or $OPENAI_API_KEY). Never the key itself.",
    )
    timeout: float = Field(60.0, gt=0, description="openai: seconds per HTTP request.")
    max_retries: int = Field(3, ge=0, description="openai: extra attempts of a transient failure.")

    def options(self, name: str | None = None) -> dict[str, Any]:
        if name and name != self.backend:
            return super().options(name)
        opts = super().options()
        env = opts.pop("api_key_env")
        if env:
            key = os.environ.get(env)
            if not key:
                raise ValueError(f"--api-key-env {env}: that environment variable is not set")
            opts["api_key"] = key
        return opts
