"""Checked paths to a figure inside a pydantic model (an evaluation summary).

A :class:`MetricPath` is a dotted path such as ``icm.metrics.accuracy``, checked once,
when it is made, against the model it starts from: every step must be a field of the
model it reaches (``icm`` of :class:`~icm.evaluation.summary.EvalSummary`, ``metrics`` of
:class:`~icm.evaluation.icm_metrics.ICMReport`) or, in a dict field, one of the keys that
field declares with :class:`Keys` (``Annotated[dict[str, float | None], Keys(...)]``);
the last step must hold a number (or, with ``leaf=Interval``, that model). A misspelled
path is a :class:`ValueError` where it is written (at import of the metric registry), not
an empty cell at report time.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel

__all__ = ["Keys", "MetricPath"]


@dataclass(frozen=True)
class Keys:
    """The keys a ``dict`` field of a report model may hold (metadata: ``Annotated[dict[...], Keys(...)]``)."""

    names: tuple[str, ...]

    def __init__(self, names: Iterable[str]) -> None:
        object.__setattr__(self, "names", tuple(names))


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_number(tp: Any) -> bool:
    return tp in (int, float)


def _known(names: Iterable[str], step: str) -> str:
    names = list(names)
    close = difflib.get_close_matches(step, names, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known: {', '.join(names)}"


@dataclass(frozen=True)
class MetricPath:
    """A dotted path from ``root`` (a pydantic model class) to a number, or to a ``leaf`` model."""

    root: type[BaseModel]
    steps: tuple[str, ...]

    @classmethod
    def parse(cls, root: type[BaseModel], path: str, leaf: type[BaseModel] | None = None) -> MetricPath:
        """The path ``path`` from ``root``, checked; a :class:`ValueError` that names the bad step otherwise."""
        steps = tuple(path.split("."))
        tp: Any = root
        keys: Keys | None = None
        for i, step in enumerate(steps):
            where = f"metric path {path!r}: {'.'.join(steps[:i]) or root.__name__}"
            tp = _strip_optional(tp)
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                field = tp.model_fields.get(step)
                if field is None:
                    raise ValueError(f"{where} ({tp.__name__}) has no field {step!r} ({_known(tp.model_fields, step)})")
                tp = field.annotation
                keys = next((m for m in field.metadata if isinstance(m, Keys)), None)
            elif get_origin(tp) is dict:
                if keys is None:
                    raise ValueError(f"{where} is a dict that declares no keys (Annotated[..., Keys(...)]): {step!r} cannot be checked")
                if step not in keys.names:
                    raise ValueError(f"{where} has no key {step!r} ({_known(keys.names, step)})")
                tp = get_args(tp)[1]
                keys = None
            else:
                raise ValueError(f"{where} is a {getattr(tp, '__name__', tp)}, not a model or a dict: no {step!r} in it")
        end = _strip_optional(tp)
        ok = end is leaf if leaf is not None else _is_number(end)
        if not ok:
            want = leaf.__name__ if leaf is not None else "a number"
            raise ValueError(f"metric path {path!r} ends at {getattr(end, '__name__', end)}, not {want}")
        return cls(root, steps)

    def __str__(self) -> str:
        return ".".join(self.steps)

    def walk(self, node: Any, start: int = 0) -> Any:
        """The value at the path in ``node`` (a model or its JSON dict), from step ``start``; None where absent."""
        for part in self.steps[start:]:
            if node is None:
                return None
            node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        return node
