"""The cascade: a composite backend. The offline detector judges first; the images it cannot
clear go to a multimodal model (``--escalate-backend``, hf or openai).

Its options nest the escalation backend's spec (``{"backend": "cascade", "escalate":
{"backend": "hf", "model": ...}}``); the flat form of the command line
(``--backend cascade --escalate-backend hf --model ...``) is mapped onto it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from icm.moderation.backends.registry import backend_names, options_class
from icm.moderation.spec import BackendSpec, Threads, either

if TYPE_CHECKING:
    from icm.moderation.backends.base import Backend

ESCALATE_DEFAULT = "hf"


def escalation_targets() -> tuple[str, ...]:
    """The registered backends a cascade may escalate to (those that read the question text)."""
    return tuple(n for n in backend_names(composite=False) if options_class(n).escalation_target)


def _escalate_field() -> FieldInfo:
    return _escalate_field_for(escalation_targets())


@functools.cache
def _escalate_field_for(targets: tuple[str, ...]) -> FieldInfo:
    """The flat ``escalate_backend`` option: one of ``targets`` (one object per set of targets)."""
    choices: Any = Literal[targets]  # the registered targets, as the flag's choices
    return FieldInfo(
        annotation=choices,
        default=ESCALATE_DEFAULT,
        description="cascade: the MLLM backend images go to when the detector cannot clear them.",
    )


class CascadeOptions(BackendSpec):
    """``--backend cascade``: the detector first, then ``escalate`` for the images it cannot clear."""

    backend: Literal["cascade"] = "cascade"
    escalate: BackendSpec = Field(description="The backend images go to when the detector cannot clear them.")
    threads: Threads = None  # the detector's (an hf escalation takes the same flag in its own spec)

    @property
    def escalate_backend(self) -> str:
        return self.escalate.backend

    @model_validator(mode="before")
    @classmethod
    def _from_flat(cls, data: Any) -> Any:
        """``{"backend": "cascade", "escalate_backend": "hf", "model": ...}`` -> the nested form."""
        if not isinstance(data, dict) or "escalate" in data:
            return data
        name = data.get("escalate_backend", ESCALATE_DEFAULT)
        if name not in escalation_targets():
            raise ValidationError.from_exception_data(cls.__name__, [{
                "type": "literal_error", "loc": ("escalate_backend",), "input": name,
                "ctx": {"expected": either(escalation_targets())},
            }])
        target = options_class(name).flat_fields()
        rest = {k: v for k, v in data.items() if k not in ("backend", "escalate_backend")}
        escalate = {k: v for k, v in rest.items() if k in target and k != "backend"}
        return {**{k: v for k, v in rest.items() if k in cls.model_fields}, "escalate": {"backend": name, **escalate}}

    @field_validator("escalate")
    @classmethod
    def _escalates_to_an_mllm(cls, v: BackendSpec) -> BackendSpec:
        if v.backend not in escalation_targets():
            raise ValueError(f"the cascade escalates to an MLLM backend: {either(escalation_targets())}")
        return v

    @classmethod
    def flat_fields(cls) -> dict[str, FieldInfo]:
        fields = {k: v for k, v in cls.model_fields.items() if k != "escalate"}
        return {**fields, "escalate_backend": _escalate_field()}

    @classmethod
    def from_flat(cls, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        name = given.get("escalate_backend", ESCALATE_DEFAULT)
        own = {**cls.flat_fields(), **(options_class(name).flat_fields() if name in escalation_targets() else {})}
        return {k: v for k, v in given.items() if k in own}, {k: v for k, v in given.items() if k not in own}

    def flat(self) -> dict[str, Any]:
        return {**self.escalate.flat(), **self.model_dump(exclude={"escalate"}), "escalate_backend": self.escalate.backend}

    def options(self, name: str | None = None) -> dict[str, Any]:
        if name in (None, self.backend):
            raise ValueError("a cascade is two backends: use create_backends(spec)")
        if name == self.escalate.backend:
            return self.escalate.options()
        return super().options(name)

    def create_backends(self) -> tuple[Backend, Backend | None]:
        first, _ = BackendSpec.build(backend="detector", threads=self.threads).create_backends()  # the detector's defaults
        try:
            escalate, _ = self.escalate.create_backends()
        except BaseException:
            first.close()
            raise
        return first, escalate
