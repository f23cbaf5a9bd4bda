"""What one ``icm moderate`` run is: :class:`ModerateConfig`, the same for the local and the Ray engine.

The backend is one nested :class:`~icm.moderation.spec.BackendSpec` (``backend``), as in
every other entry point. The run's own settings (inputs, policy, output, batching, frames)
are the other fields; their defaults live here, the backend's in the spec (the CLI's flags
default to None and leave them out).

Older code and config files gave the backend settings flat, beside the run's
(``ModerateConfig(backend="hf", model="m", adapter="a")``, or those keys in a YAML file).
They still work: the flat keys (:func:`flat_backend_fields`, from the backend registry) are read into the nested spec,
with a :class:`DeprecationWarning` that says how to write them instead.
"""

from __future__ import annotations

import warnings
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from icm.moderation.spec import BackendSpec, all_flat_fields


def flat_backend_fields() -> tuple[str, ...]:
    """The backend settings a flat (pre-nesting) ModerateConfig holds beside the run's fields: every
    flat option of the registered backends (a backend registered later included), but ``batch_size``,
    which is the run's too (:func:`split_backend_options` gives it to both)."""
    return tuple(k for k in all_flat_fields() if k != "batch_size")


def __getattr__(name: str) -> Any:
    if name == "FLAT_BACKEND_FIELDS":  # the name of earlier versions: the same fields, as the registry has them now
        return flat_backend_fields()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


FLAT_NOTE = ("ModerateConfig: flat backend settings ({keys}) were read into the nested backend spec; "
             "give them as backend=BackendSpec.build(...) (in a file: a 'backend:' mapping) instead")


def split_backend_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run fields, flat backend fields) of ``options``; ``batch_size`` goes to both (hf batches by it too)."""
    fields = flat_backend_fields()
    run = {k: v for k, v in options.items() if k not in fields}
    flat = {k: v for k, v in options.items() if k in fields}
    if "batch_size" in options:
        flat["batch_size"] = options["batch_size"]
    return run, flat


def _flat_keys(data: Any) -> list[str]:
    """The flat backend settings of a config's input (``backend`` only when it is a name, not a spec)."""
    if not isinstance(data, dict):
        return []
    nested = "backend" in data and not isinstance(data["backend"], str)
    fields = flat_backend_fields()
    keys = [k for k in data if k in fields and not (k == "backend" and nested)]  # in the order given
    if keys and nested:
        raise ValueError(f"backend settings given both nested (backend) and flat ({', '.join(keys)}): give one")
    return keys


class ModerateConfig(BaseModel):
    """Everything ``icm moderate`` takes; the CLI maps one option to each field (the backend's to the spec)."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(default_factory=list)
    """Image files, folders, glob patterns, ``-`` (paths on stdin); the Ray engine also tables and listings."""
    policy: str = "icm-sexy"
    """A built-in policy name or policy YAML file, or a bundle (``icm-standard[:RULES]`` or a bundle YAML file)."""
    rules: str | None = None
    backend: BackendSpec = Field(default_factory=BackendSpec.build)
    """The model backend and its settings."""
    explain: bool = False
    batch_size: int = 8
    """Images per batch (the hf backend: per forward pass)."""
    out: str | None = None
    """JSONL file, or ``*.parquet`` (a folder of part files)."""
    resume: bool = False
    max_pixels: int | None = None
    max_frames: int = 16
    """Frames judged per multi-frame image or video (evenly spaced beyond that, first and last included)."""
    fps: float = 1.0
    """Video: frames sampled per second (thinned evenly to ``max_frames``)."""
    null: bool = False
    """``-`` reads NUL-separated paths (``find -print0``) instead of one per line."""

    @model_validator(mode="before")
    @classmethod
    def _read_flat(cls, data: Any) -> Any:
        flat_keys = _flat_keys(data)
        if flat_keys:  # an old flat config: its backend settings become the nested spec, with a note
            warnings.warn(FLAT_NOTE.format(keys=", ".join(flat_keys)), DeprecationWarning, stacklevel=3)
            run, flat = split_backend_options(data)
            data = {**run, "backend": BackendSpec.build(**flat)}
        return data

    @classmethod
    def from_options(cls, **options: Any) -> ModerateConfig:
        """A config from option values, run and backend mixed as the CLI's flags are (None: the default).

        Raises ``ValueError`` naming the option (``--batch-size: ...``, ``the hf backend needs --model``).
        """
        run, flat = split_backend_options({k: v for k, v in options.items() if v is not None})
        return cls(**run, backend=BackendSpec.build(**flat))

    def backend_spec(self) -> BackendSpec:
        """The backend this run uses (the nested spec)."""
        return self.backend
