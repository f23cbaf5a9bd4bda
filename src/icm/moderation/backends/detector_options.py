"""The detector backend's options (none beyond the batch size: it runs offline, from the policy's evidence)."""

from __future__ import annotations

from typing import ClassVar, Literal

from icm.moderation.spec import BackendSpec


class DetectorOptions(BackendSpec):
    """``--backend detector``: the offline detectors; the policy says which evidence to use."""

    note: ClassVar[str] = "offline"

    backend: Literal["detector"] = "detector"
