"""Which model backend to run, and how: one :class:`BackendSpec` for every entry point.

``BackendSpec`` is the discriminated union (discriminator ``backend``) of the options
models in the backend registry (:mod:`icm.moderation.backends.registry`): validating
``{"backend": "hf", "model": ...}`` gives an :class:`~icm.moderation.backends.hf_options.HFOptions`,
and a backend registered later is accepted too. Use it as a pydantic field type (it
round-trips through JSON), or build one from the command line's flat option values with
:meth:`BackendSpec.build` (``--backend``, ``--model``, ``--adapter``, ``--base-url``,
``--dtype``, ``--device``, ``--batch-size``, ``--min-label-mass``, ``--text-confidence``,
``--guided-choice``, ``--escalate-backend``, ``--api-key-env``, ``--timeout``,
``--max-retries``, ``--preset``, ``--threads``: each the field of a registered options model). :func:`create_backend`
and :func:`create_backends` build the backends a spec describes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import CoreSchema, core_schema
from typing_extensions import Self

from icm.moderation.backends.base import DEFAULT_MIN_LABEL_MASS, DEFAULT_TEXT_CONFIDENCE
from icm.moderation.backends.registry import (
    DEFAULT_BACKEND,
    BackendNames,
    backend_class,
    backend_names,
    entry,
    options_class,
)

if TYPE_CHECKING:
    from icm.moderation.backends.base import Backend

__all__ = [
    "BACKEND_NAMES",
    "GUIDED_CHOICE_STYLES",
    "BackendSpec",
    "MLLMOptions",
    "Threads",
    "create_backend",
    "create_backends",
    "either",
    "fold_flat_settings",
]

BACKEND_NAMES: BackendNames = BackendNames()
"""The registered backend names (a live view of the registry), composites included."""
GUIDED_CHOICE_STYLES = ("off", "structured_outputs", "guided_choice", "regex")
GuidedChoice = Literal["off", "structured_outputs", "guided_choice", "regex"]
Threads = Annotated[
    int | None,
    Field(
        ge=1,
        description="detector/hf: CPU threads for onnxruntime (the detector's sources and their pool) and torch "
        "(default: $ICM_THREADS, else every core).",
    ),
]
"""The ``threads`` option of the backends that run models here (detector, hf); same as ``$ICM_THREADS``."""


def either(names: tuple[str, ...] | list[str]) -> str:
    """``'a', 'b' or 'c'``: the choices as pydantic's literal errors spell them."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _literal_error(field: str, value: Any, names: tuple[str, ...]) -> ValidationError:
    return ValidationError.from_exception_data(
        "BackendSpec", [{"type": "literal_error", "loc": (field,), "input": value, "ctx": {"expected": either(names)}}]
    )


def _dispatch(value: Any) -> BackendSpec:
    """A mapping (or a spec) validated as the options model its ``backend`` names."""
    if isinstance(value, BackendSpec):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"a backend spec is a mapping with a 'backend' name, not {type(value).__name__}")
    name = value.get("backend", DEFAULT_BACKEND)
    if name not in backend_names():
        raise _literal_error("backend", name, backend_names())
    return options_class(name).model_validate(dict(value))


class BackendSpec(BaseModel):
    """A model backend and its settings: the options model of one registered backend.

    ``BackendSpec(**fields)`` and ``BackendSpec.model_validate(data)`` give the options
    model ``fields["backend"]`` names (default ``detector``); so does a field typed
    ``BackendSpec`` in another model. Subclasses (the options models) declare
    ``backend: Literal["name"]`` and their own fields, defaults and checks.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    _union_root: ClassVar[bool] = True  # only this class dispatches; subclasses validate as themselves
    note: ClassVar[str] = ""
    """Shown after the name in ``--backend``'s help, e.g. ``offline``."""
    escalation_target: ClassVar[bool] = False
    """Whether a cascade may escalate to this backend (a backend that reads the question text)."""
    not_arguments: ClassVar[frozenset[str]] = frozenset({"batch_size"})
    """Fields that are not arguments of the backend's constructor."""
    only_here: ClassVar[dict[str, str]] = {}
    """Flags that are an error with a backend that does not take them (``--preset`` with the
    detector), and what the error says after ``--flag VALUE``; other flags are ignored there."""

    backend: str = Field(DEFAULT_BACKEND, description="The model backend.")
    batch_size: int = Field(8, ge=1, description="Images per batch (hf: per forward pass).")

    def __new__(cls, **data: Any) -> Self:  # BackendSpec(backend="hf", ...) is an HFOptions
        if cls.__dict__.get("_union_root"):
            cls = options_class(data.get("backend", DEFAULT_BACKEND))  # type: ignore[assignment]  # a subclass of cls
        return super().__new__(cls)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        if "_union_root" not in cls.__dict__:
            return handler(source)
        return core_schema.no_info_plain_validator_function(
            _dispatch,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda v, info: v.model_dump(mode=info.mode, by_alias=info.by_alias), info_arg=True
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        if "_union_root" not in cls.__dict__:
            return dict(handler(schema))
        return {
            "type": "object",
            "title": "BackendSpec",
            "description": "A backend and its settings; 'backend' names a registered backend.",
            "properties": {"backend": {"enum": list(backend_names()), "default": DEFAULT_BACKEND}},
            "additionalProperties": True,
        }

    @model_validator(mode="before")
    @classmethod
    def _drop_unused_settings(cls, data: Any) -> Any:
        """Settings another backend takes (``model`` for the detector) are checked, then dropped,
        as on the command line; a key no backend takes stays, to be refused."""
        if not isinstance(data, dict) or "_union_root" in cls.__dict__:
            return data
        _, unused = cls.from_flat(data)
        known = {k: v for k, v in unused.items() if k in all_flat_fields()}
        problems = _check_unused(known, str)
        if problems:
            raise ValueError("; ".join(problems))
        return {k: v for k, v in data.items() if k not in known} if known else data

    # -- the flat form of the command line ------------------------------------------------

    @classmethod
    def flat_fields(cls) -> dict[str, FieldInfo]:
        """The command-line options this model takes (``--name`` per field)."""
        return dict(cls.model_fields)

    @classmethod
    def from_flat(cls, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``given`` split into this model's data and the flat values it does not use."""
        own = cls.flat_fields()
        return {k: v for k, v in given.items() if k in own}, {k: v for k, v in given.items() if k not in own}

    def flat(self) -> dict[str, Any]:
        """This spec as flat option values (the inverse of :meth:`build`)."""
        return self.model_dump()

    @classmethod
    def build(cls, **fields: Any) -> BackendSpec:
        """A spec from option values (``None`` means the default), or a ``ValueError``
        naming the option: ``--batch-size: Input should be greater than or equal to 1``.

        Values of options the chosen backend does not use are checked and ignored
        (``--model`` with the detector), as on the command line.
        """
        return _build(fields, _option)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> BackendSpec:
        """As :meth:`build`, from a config file's flat settings: errors name the setting
        (``min_label_mass: Input should be less than or equal to 1``)."""
        return _build(dict(settings), str)

    def for_backend(self, name: str) -> BackendSpec:
        """This spec's settings applied to backend ``name`` (``icm chat --verdict-backend``)."""
        return self if name == self.backend else BackendSpec.build(**{**self.flat(), "backend": name})

    # -- building the backend -------------------------------------------------------------

    def options(self, name: str | None = None) -> dict[str, Any]:
        """Constructor arguments of backend ``name`` (default: this spec's backend).

        Raises ``ValueError`` when a setting cannot be resolved (an API key variable that is not set).
        """
        if name and name != self.backend:
            return self.for_backend(name).options()
        return {k: getattr(self, k) for k in type(self).model_fields if k != "backend" and k not in self.not_arguments}

    def create_backends(self) -> tuple[Backend, Backend | None]:
        """The backend this spec describes and, for a composite, the one it escalates to."""
        return backend_class(self.backend)(**self.options()), None


def fold_flat_settings(data: dict[str, Any], keys: Iterable[str], *, field: str = "backend", old: str | None = None) -> dict[str, Any] | None:
    """``data`` (a config's settings) with its flat backend settings folded into ``data[field]``,
    or None when it has none. Flat: ``keys`` at the top level, ``field`` a backend name, or
    the spec under its ``old`` name; given beside a nested spec, they win over it."""
    keys = set(keys)
    flat = {k: data[k] for k in keys if k in data}
    nested = data.get(old) if old and data.get(old) is not None else data.get(field)
    if not flat and not isinstance(nested, str) and not (old and old in data):
        return None
    rest = {k: v for k, v in data.items() if k not in keys and k not in (field, old)}
    if isinstance(nested, str):
        flat["backend"] = nested
    elif nested is not None:
        flat = {**BackendSpec.model_validate(nested).flat(), **flat}
    return {**rest, field: BackendSpec.from_settings(flat)}


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def _build(fields: dict[str, Any], spell: Callable[[str], str]) -> BackendSpec:
    """:meth:`BackendSpec.build`, its errors naming each value as ``spell`` writes its key."""
    given = {k: v for k, v in fields.items() if v is not None}
    name = given.get("backend", DEFAULT_BACKEND)
    if name not in backend_names():
        raise ValueError(_describe(_literal_error("backend", name, backend_names()), spell))
    model = options_class(name)
    own, unused = model.from_flat(given)
    problems: list[str] = []
    spec: BackendSpec | None = None
    try:
        spec = model.model_validate(own)
    except ValidationError as exc:
        problems.append(_describe(exc, spell))
    problems += _check_unused(unused, spell)
    if problems or spec is None:
        raise ValueError("; ".join(problems))
    return spec


def _check_unused(unused: Mapping[str, Any], spell: Callable[[str], str], *, unknown: bool = True) -> list[str]:
    """What is wrong with settings another backend takes (each checked as its model declares
    it); ``unknown``: a key no registered backend takes is a problem too."""
    problems = []
    flat = all_flat_fields()
    strict = {k: why for n in backend_names() for k, why in options_class(n).only_here.items()}
    for key, value in unused.items():
        if key not in flat:
            if unknown:
                problems.append(f"{spell(key)}: Extra inputs are not permitted")
            continue
        if key in strict and value is not None:
            problems.append(f"{spell(key)} {value} {strict[key]}")
            continue
        try:
            _adapter(key).validate_python(value)
        except ValidationError as exc:
            problems.append(_describe(exc, spell, where=key))
    return problems


def _describe(exc: ValidationError, spell: Callable[[str], str], where: str | None = None) -> str:
    problems = []
    flat = all_flat_fields()
    for err in exc.errors():
        names = [p for p in err["loc"] if isinstance(p, str) and p in flat]
        at = where or (names[-1] if names else None)
        msg = str(err["msg"]).removeprefix("Value error, ")
        problems.append(f"{spell(at)}: {msg}" if at else msg)
    return "; ".join(problems)


def all_flat_fields() -> dict[str, FieldInfo]:
    """Every flat option of the registered backends (the first model to declare one wins)."""
    out: dict[str, FieldInfo] = {}
    for name in backend_names():
        for key, info in options_class(name).flat_fields().items():
            out.setdefault(key, info)
    return out


_adapters: dict[str, tuple[FieldInfo, TypeAdapter[Any]]] = {}


def _adapter(key: str) -> TypeAdapter[Any]:
    """A validator of flat option ``key`` alone (its type and bounds, as its model declares them)."""
    info = all_flat_fields()[key]
    cached = _adapters.get(key)
    if cached is None or cached[0] is not info:  # a backend registered since may declare it anew
        annotated: Any = Annotated[info.annotation, info]
        cached = _adapters[key] = (info, TypeAdapter(annotated))
    return cached[1]


class MLLMOptions(BackendSpec):
    """Options every multimodal-LLM backend shares: the model, when an answer counts, and a
    guard model's prompt format (``preset``, :mod:`icm.moderation.presets`)."""

    model_hint: ClassVar[str] = "the model to run"
    escalation_target: ClassVar[bool] = True
    not_arguments: ClassVar[frozenset[str]] = frozenset({"batch_size", "preset"})
    only_here: ClassVar[dict[str, str]] = {"preset": "runs on the hf or openai backend (or a cascade escalating to one)"}

    model: str | None = Field(None, description="hf: hub id or local path; openai: the served model name.")
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
    preset: Literal["llavaguard", "shieldgemma2", "llama-guard-4"] | None = Field(
        None,
        description="hf/openai: the model is a guard model judged in its own prompt format, behind the same policy: "
        "llavaguard (also QwenGuard), shieldgemma2 or llama-guard-4 (docs/presets.md).",
    )

    def create_backends(self) -> tuple[Backend, Backend | None]:
        backend, _ = super().create_backends()
        if self.preset:
            from icm.moderation.presets import with_preset

            return with_preset(backend, self.preset, text_confidence=self.text_confidence), None
        return backend, None

    @model_validator(mode="after")
    def _needs_model(self) -> Self:
        if not self.model:
            raise ValueError(f"the {self.backend} backend needs --model ({self.model_hint}); it needs a model to run")
        return self


def create_backend(spec: BackendSpec, name: str | None = None) -> Backend:
    """The backend ``spec`` describes (or its backend ``name``: ``detector`` for a cascade's first)."""
    spec = spec.for_backend(name) if name else spec
    if entry(spec.backend).composite:
        raise ValueError(f"a {spec.backend} is two backends: use create_backends(spec)")
    first, _ = spec.create_backends()
    return first


def create_backends(spec: BackendSpec) -> tuple[Backend, Backend | None]:
    """The first backend and, for a composite (the cascade), the one it escalates to (else None)."""
    return spec.create_backends()
