"""icm: rule-based, explainable image content moderation with multimodal LLMs.

``icm.moderate(images, policy=..., rules=..., backend=...)`` is the library form of
``icm moderate``; it is imported on first use so that ``import icm`` stays light.
"""

from __future__ import annotations

from typing import Any


def _version() -> str:
    """The installed distribution's version (pyproject.toml is its one source).

    In a source tree that was never installed (``PYTHONPATH=src``), pyproject.toml's
    ``[project] version`` is read directly.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("icm-assistant")
    except PackageNotFoundError:
        pass
    import re
    from pathlib import Path

    try:
        text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return "0+unknown"
    project = text.partition("[project]")[2].split("\n[", 1)[0]
    match = re.search(r'^version\s*=\s*"([^"]+)"', project, re.MULTILINE)
    return match.group(1) if match else "0+unknown"


__version__ = _version()

__all__ = ["__version__", "decide", "load_policy", "moderate"]


def __getattr__(name: str) -> Any:
    if name == "moderate":
        from icm.moderation.engine import moderate

        return moderate
    if name in ("load_policy", "decide"):
        import icm.policy as policy

        return getattr(policy, name)
    raise AttributeError(f"module 'icm' has no attribute {name!r}")
