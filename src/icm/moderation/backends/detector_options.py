"""The detector backend's options (the batch size and its threads: it runs offline, from the policy's evidence)."""

from __future__ import annotations

from typing import ClassVar, Literal

from icm.moderation.spec import BackendSpec, Threads


class DetectorOptions(BackendSpec):
    """``--backend detector``: the offline detectors; the policy says which evidence to use."""

    note: ClassVar[str] = "offline"

    backend: Literal["detector"] = "detector"
    threads: Threads = None
