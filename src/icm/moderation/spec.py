"""Which model backend to run, and how: one :class:`BackendSpec` for every entry point.

``icm moderate``, ``icm chat``, ``icm eval run``, the batch job
(:class:`~icm.moderation.job.ModerateConfig` maps its fields onto a spec) and the server
(:class:`~icm.serve.config.ServeConfig` likewise) all describe a backend with these
fields, and :func:`create_backend` / :func:`create_backends` build it from one. The CLI
maps one option to each field (``--backend``, ``--model``, ``--adapter``, ``--base-url``,
``--dtype``, ``--device``, ``--batch-size``, ``--min-label-mass``, ``--text-confidence``, ``--guided-choice``,
``--escalate-backend``, ``--api-key-env``, ``--timeout``, ``--max-retries``, ``--preset``).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from icm.moderation.backends import create_backend as _create_by_name
from icm.moderation.backends.base import DEFAULT_MIN_LABEL_MASS, DEFAULT_TEXT_CONFIDENCE, Backend

__all__ = ["BACKEND_NAMES", "GUIDED_CHOICE_STYLES", "BackendSpec", "create_backend", "create_backends"]

BACKEND_NAMES = ("detector", "hf", "openai", "cascade")
GUIDED_CHOICE_STYLES = ("off", "structured_outputs", "guided_choice", "regex")

BackendName = Literal["detector", "hf", "openai", "cascade"]
GuidedChoice = Literal["off", "structured_outputs", "guided_choice", "regex"]


class BackendSpec(BaseModel):
    """A model backend and its settings; fields a backend does not use are ignored by it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: BackendName = Field("detector", description="detector (offline), hf, openai or cascade.")
    model: str | None = Field(None, description="hf: hub id or local path; openai: the served model name.")
    adapter: str | None = Field(None, description="hf: LoRA adapter path.")
    base_url: str | None = Field(
        None, description="openai: the server's API root (default $ICM_OPENAI_BASE_URL or $OPENAI_BASE_URL)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="hf: weight dtype.")
    device: str = Field("auto", description="hf: auto, cpu, cuda, cuda:1, mps ...")
    batch_size: int = Field(8, ge=1, description="hf: images per forward pass.")
    min_label_mass: float = Field(
        DEFAULT_MIN_LABEL_MASS,
        ge=0.0,
        le=1.0,
        description="hf/openai: the least probability the valid labels must hold for an answer to count.",
    )
    text_confidence: float = Field(
        DEFAULT_TEXT_CONFIDENCE,
        ge=0.5,
        le=1.0,
        description="openai: the probability an answer read from text (no usable logprobs) gives the label it names; "
        "one sampled answer is never P = 0 or 1.",
    )
    guided_choice: GuidedChoice = Field("off", description="openai: constrain answers to the labels.")
    escalate_backend: Literal["hf", "openai"] = Field(
        "hf", description="cascade: the MLLM backend images go to when the detector cannot clear them."
    )
    api_key_env: str | None = Field(
        None,
        description="openai: the environment variable holding the API key "
        "(default $ICM_OPENAI_API_KEY or $OPENAI_API_KEY). Never the key itself.",
    )
    timeout: float = Field(60.0, gt=0, description="openai: seconds per HTTP request.")
    max_retries: int = Field(3, ge=0, description="openai: extra attempts of a transient failure.")
    preset: Literal["llavaguard", "shieldgemma2", "llama-guard-4"] | None = Field(
        None,
        description="hf/openai: the model is a guard model judged in its own prompt format, behind the same policy: "
        "llavaguard (also QwenGuard), shieldgemma2 or llama-guard-4 (docs/presets.md).",
    )

    @model_validator(mode="after")
    def _needs_model(self) -> BackendSpec:
        used = self.escalate_backend if self.backend == "cascade" else self.backend
        if used in ("hf", "openai") and not self.model:
            hint = "a hub id or a local path" if used == "hf" else "the model name the server serves"
            raise ValueError(f"the {used} backend needs --model ({hint})")
        if self.preset and used not in ("hf", "openai"):
            raise ValueError(f"--preset {self.preset} runs on the hf or openai backend (or a cascade escalating to one)")
        return self

    @classmethod
    def build(cls, **fields: Any) -> BackendSpec:
        """A spec from option values (``None`` means the default), or a ``ValueError``
        naming the option: ``--batch-size: Input should be greater than or equal to 1``."""
        try:
            return cls(**{k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                where = "--" + "-".join(str(x) for x in err["loc"]).replace("_", "-") if err["loc"] else ""
                msg = str(err["msg"]).removeprefix("Value error, ")
                problems.append(f"{where}: {msg}" if where else msg)
            raise ValueError("; ".join(problems)) from None

    def options(self, name: str | None = None) -> dict[str, Any]:
        """Constructor arguments of backend ``name`` (default: this spec's backend).

        Raises ``ValueError`` when ``api_key_env`` names a variable that is not set.
        """
        name = name or self.backend
        if name == "detector":
            return {}
        if name == "hf":
            return {
                "model": self.model, "adapter": self.adapter, "dtype": self.dtype, "device": self.device,
                "batch_size": self.batch_size, "min_label_mass": self.min_label_mass,
            }
        if name == "openai":
            opts: dict[str, Any] = {
                "model": self.model, "base_url": self.base_url, "min_label_mass": self.min_label_mass,
                "text_confidence": self.text_confidence, "guided_choice": self.guided_choice, "timeout": self.timeout, "max_retries": self.max_retries,
            }
            if self.api_key_env:
                key = os.environ.get(self.api_key_env)
                if not key:
                    raise ValueError(f"--api-key-env {self.api_key_env}: that environment variable is not set")
                opts["api_key"] = key
            return opts
        raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKEND_NAMES)})")


def create_backend(spec: BackendSpec, name: str | None = None) -> Backend:
    """The backend ``spec`` describes (or its backend ``name``: ``detector`` for a cascade's first)."""
    name = name or spec.backend
    if name == "cascade":
        raise ValueError("a cascade is two backends: use create_backends(spec)")
    backend = _create_by_name(name, **spec.options(name))
    if spec.preset and name in ("hf", "openai"):
        from icm.moderation.presets import with_preset

        return with_preset(backend, spec.preset, text_confidence=spec.text_confidence)
    return backend


def create_backends(spec: BackendSpec) -> tuple[Backend, Backend | None]:
    """The first backend and, for a cascade, the one it escalates to (else None)."""
    if spec.backend != "cascade":
        return create_backend(spec), None
    first = create_backend(spec, "detector")
    try:
        return first, create_backend(spec, spec.escalate_backend)
    except BaseException:
        first.close()
        raise
