"""Public image-safety benchmarks, read from the publisher's own layout (``icm eval bench``).

* :mod:`~icm.evaluation.bench.records`: the pydantic records a loader yields (one per
  image, or one per problem found in the data) and what describes a benchmark;
* :mod:`~icm.evaluation.bench.tables`: reading Hugging Face parquet files and
  ``save_to_disk`` folders, CSV and JSON, with errors that name the file;
* :mod:`~icm.evaluation.bench.loaders`: the loaders of UnsafeBench, the LlavaGuard dataset,
  VLGuard and SMID, each with its category map onto the taxonomy schemes;
* :mod:`~icm.evaluation.bench.scoring`: operating points and metrics with intervals;
* :mod:`~icm.evaluation.bench.run`: moderation (the job of ``icm moderate``) and the report.

Loaders register themselves with :func:`register`; :func:`get_benchmark` imports the
module that holds a built-in loader only when it is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from icm.evaluation.bench.records import BenchIssue, BenchItem, Benchmark

LoaderFn = Callable[[Path], Iterator[BenchItem | BenchIssue]]
F = TypeVar("F", bound=LoaderFn)

_REGISTRY: dict[str, tuple[Benchmark, LoaderFn]] = {}

BUILTIN: dict[str, str] = {
    "unsafebench": "icm.evaluation.bench.loaders",
    "llavaguard": "icm.evaluation.bench.loaders",
    "vlguard": "icm.evaluation.bench.loaders",
    "smid": "icm.evaluation.bench.loaders",
    "safeeditbench": "icm.evaluation.bench.loaders",
}
"""Built-in benchmark names and the module that registers each (imported on first use)."""


def register(info: Benchmark) -> Callable[[F], F]:
    """Decorator: ``@register(Benchmark(name=...))`` over ``def load(root) -> Iterator[item or issue]``."""

    def wrap(fn: F) -> F:
        if info.name in _REGISTRY and _REGISTRY[info.name][1] is not fn:
            raise ValueError(f"benchmark {info.name!r} is already registered")
        _REGISTRY[info.name] = (info, fn)
        return fn

    return wrap


def benchmark_names() -> list[str]:
    """Every benchmark name: the built-in ones and any registered since."""
    return sorted(set(BUILTIN) | set(_REGISTRY))


def get_benchmark(name: str) -> tuple[Benchmark, LoaderFn]:
    """The description and loader of benchmark ``name`` (KeyError naming the known ones)."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r} (known: {', '.join(benchmark_names())})") from None


__all__ = ["BUILTIN", "BenchIssue", "BenchItem", "Benchmark", "benchmark_names", "get_benchmark", "register"]
