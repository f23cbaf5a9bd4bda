"""The backend registry: one line per backend, the only place backend names are declared.

Each entry maps a name to two lazy ``"module:Class"`` references (as lm-evaluation-harness
registers its models): the backend's options model (a :class:`~icm.moderation.spec.BackendSpec`
subclass: its fields, defaults and checks, in a module light enough to import anywhere)
and its :class:`~icm.moderation.backends.base.Backend` class (imported only when a backend
is built, so torch / onnxruntime load only then). A composite (the cascade) has no class
of its own: its options model builds the backends it is made of.

Adding a backend: write its module (options model + class), then add one line to
:data:`_ENTRIES` (or call :func:`register` from your own code). Names, the ``--backend``
choices, their error messages and the flat option fields all derive from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    from icm.moderation.backends.base import Backend
    from icm.moderation.spec import BackendSpec

__all__ = [
    "BackendEntry",
    "BackendNames",
    "backend_class",
    "backend_names",
    "entry",
    "options_class",
    "register",
    "unregister",
]


@dataclass(frozen=True)
class BackendEntry:
    """One registered backend: ``options`` and ``backend`` are ``"module:Class"`` references;
    ``backend`` is None for a composite, whose options model builds its backends."""

    name: str
    options: str
    backend: str | None = None

    @property
    def composite(self) -> bool:
        return self.backend is None


_P = "icm.moderation.backends."
_ENTRIES: dict[str, BackendEntry] = {
    e.name: e
    for e in (
        BackendEntry("detector", _P + "detector_options:DetectorOptions", _P + "detector:DetectorBackend"),
        BackendEntry("hf", _P + "hf_options:HFOptions", _P + "hf:HFBackend"),
        BackendEntry("openai", _P + "openai_options:OpenAIOptions", _P + "openai_compat:OpenAIBackend"),
        BackendEntry("cascade", _P + "cascade:CascadeOptions"),
    )
}
DEFAULT_BACKEND = "detector"


def register(name: str, options: str | type[BackendSpec], backend: str | type[Backend] | None = None) -> BackendEntry:
    """Register (or replace) backend ``name``; classes may be given instead of ``"module:Class"``."""
    entry_ = BackendEntry(name, _ref(options), None if backend is None else _ref(backend))
    _ENTRIES[name] = entry_
    return entry_


def unregister(name: str) -> None:
    """Remove backend ``name`` (a test's own backend, once the test is done)."""
    _ENTRIES.pop(name, None)


def _ref(obj: str | type) -> str:
    if isinstance(obj, str):
        return obj
    _loaded[f"{obj.__module__}:{obj.__qualname__}"] = obj
    return f"{obj.__module__}:{obj.__qualname__}"


def backend_names(*, composite: bool = True) -> tuple[str, ...]:
    """The registered names, in registration order (``composite=False``: single backends only)."""
    return tuple(n for n, e in _ENTRIES.items() if composite or not e.composite)


def entry(name: str) -> BackendEntry:
    """The entry of ``name``; a ``ValueError`` listing the registered names otherwise."""
    try:
        return _ENTRIES[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r} (choose from {', '.join(backend_names())})") from None


_loaded: dict[str, Any] = {}


def _load(ref: str) -> Any:
    if ref not in _loaded:
        module, _, attr = ref.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        _loaded[ref] = obj
    return _loaded[ref]


def options_class(name: str) -> type[BackendSpec]:
    """The options model of backend ``name`` (imports its small options module)."""
    cls: type[BackendSpec] = _load(entry(name).options)
    return cls


def backend_class(name: str) -> type[Backend]:
    """The :class:`Backend` class of ``name`` (imports the backend module; not for a composite)."""
    e = entry(name)
    if e.backend is None:
        raise ValueError(f"the {name} backend is a composite: build it with create_backends(spec)")
    cls: type[Backend] = _load(e.backend)
    return cls


class BackendNames(Sequence[str]):
    """A live, read-only view of the registered names (a backend registered later shows up)."""

    def __init__(self, *, composite: bool = True) -> None:
        self._composite = composite

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...
    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        return backend_names(composite=self._composite)[i]

    def __len__(self) -> int:
        return len(backend_names(composite=self._composite))

    def __iter__(self) -> Iterator[str]:
        return iter(backend_names(composite=self._composite))

    def __contains__(self, name: object) -> bool:
        return name in backend_names(composite=self._composite)

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, BackendNames)) else other)

    __hash__ = None  # type: ignore[assignment]  # a live view is not a stable key

    def __repr__(self) -> str:
        return repr(backend_names(composite=self._composite))
