"""The backend options of ``icm moderate``, ``icm chat``, ``icm eval run``, ``icm eval bench`` and ``icm serve``:
one typer option per flat field of the registered backends' options models, defined once.

A command declares ``backend: BackendOpt = None`` (``icm chat`` defaults to ``hf``) and
builds the spec with ``BackendSpec.build(backend=backend, ...)``: every option defaults to
None, so the defaults live in the options models only. A command that takes every backend
option (``icm moderate``, ``icm eval run``, ``icm eval bench``) declares one parameter
``backend_options: dict[str, Any] = ALL`` and is decorated with :func:`with_backend_options`
(``icm serve`` has no ``--batch-size`` and ``icm chat`` a subset with its own ``--backend``:
they list their options). The help texts are the fields'
descriptions; ``--backend`` lists the registered names.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from icm.moderation.backends.cascade import escalation_targets
from icm.moderation.backends.registry import DEFAULT_BACKEND, backend_names, options_class
from icm.moderation.spec import all_flat_fields


def _default(field: str) -> str:
    """`` (default: X)``: the options default to None, the options models fill them in."""
    info = all_flat_fields()[field]
    return "" if info.default is None else f" (default: {info.default})"


def _help(field: str, more: str = "") -> str:
    """The field's description (``more`` added to it) and its default."""
    text = all_flat_fields()[field].description or ""
    text = text if text.endswith("...") else text.removesuffix(".")
    return text + more + _default(field) + "."


def _backend_help() -> str:
    names = [f"{n} ({options_class(n).note})" if options_class(n).note else n for n in backend_names()]
    return f"{', '.join(names[:-1])} or {names[-1]} (default: {DEFAULT_BACKEND})."


BackendOpt = Annotated[str | None, typer.Option("--backend", "-b", help=_backend_help())]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help=_help("model"))]
AdapterOpt = Annotated[str | None, typer.Option("--adapter", help=_help("adapter"))]
BaseUrlOpt = Annotated[str | None, typer.Option("--base-url", help=_help("base_url"))]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help=_help("dtype", ": auto, float32, bfloat16 or float16"))]
DeviceOpt = Annotated[str | None, typer.Option("--device", help=_help("device"))]
BatchSizeOpt = Annotated[int | None, typer.Option("--batch-size", help=_help("batch_size"))]
MinLabelMassOpt = Annotated[
    float | None,
    typer.Option(
        "--min-label-mass",
        help="hf/openai: an answer counts only when the model puts at least this probability on the valid labels "
        "(Yes/No or the option labels); below it the question is not judged (refused or off-format) and the image "
        "is never allowed" + _default("min_label_mass") + ".",
    ),
]
TextConfidenceOpt = Annotated[
    float | None,
    typer.Option(
        "--text-confidence",
        help="openai: the probability an answer read from the text (the server gave no usable logprobs: one sampled "
        "answer) gives the label it names, between 0.5 and 1; the other labels share the rest (default 0.75, "
        "never 0 or 1).",
    ),
]
GuidedChoiceOpt = Annotated[
    str | None,
    typer.Option(
        "--guided-choice",
        help="openai: ask the server to constrain answers to the labels: off, structured_outputs (vLLM >= 0.10), "
        "guided_choice (older vLLM) or regex (SGLang). A server that rejects it is asked without it" + _default("guided_choice") + ".",
    ),
]
EscalateBackendOpt = Annotated[
    str | None,
    typer.Option("--escalate-backend", help=_help("escalate_backend", ": " + " or ".join(escalation_targets()))),
]
ApiKeyEnvOpt = Annotated[str | None, typer.Option("--api-key-env", help=_help("api_key_env"))]
TimeoutOpt = Annotated[float | None, typer.Option("--timeout", help=_help("timeout"))]
MaxRetriesOpt = Annotated[int | None, typer.Option("--max-retries", help=_help("max_retries"))]
PresetOpt = Annotated[str | None, typer.Option("--preset", help=_help("preset"))]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help=_help("threads", "; the same as $ICM_THREADS"))]

BACKEND_OPTIONS: dict[str, Any] = {
    "backend": BackendOpt, "model": ModelOpt, "adapter": AdapterOpt, "base_url": BaseUrlOpt, "dtype": DtypeOpt,
    "device": DeviceOpt, "batch_size": BatchSizeOpt, "min_label_mass": MinLabelMassOpt,
    "text_confidence": TextConfidenceOpt, "guided_choice": GuidedChoiceOpt, "escalate_backend": EscalateBackendOpt,
    "api_key_env": ApiKeyEnvOpt, "timeout": TimeoutOpt, "max_retries": MaxRetriesOpt, "preset": PresetOpt,
    "threads": ThreadsOpt,
}
"""Every backend option, in the order ``--help`` lists them: the parameter name and its typer annotation."""

ALL: dict[str, Any] = {}
"""The placeholder default of a command's ``backend_options`` parameter (:func:`with_backend_options`)."""

R = TypeVar("R")


def with_backend_options(command: Callable[..., R]) -> Callable[..., R]:
    """Decorator of a typer command: its parameter ``backend_options`` becomes every backend
    option (:data:`BACKEND_OPTIONS`, at that place in ``--help``), and the command receives the
    options given as that one dict (those not given left out), ready for
    ``BackendSpec.build(**backend_options)`` or ``ModerateConfig.from_options``."""
    sig = inspect.signature(command, eval_str=True)
    if "backend_options" not in sig.parameters or set(BACKEND_OPTIONS) & set(sig.parameters):
        raise TypeError(f"{command.__name__}: declare backend_options and none of its options")
    params: list[inspect.Parameter] = []
    for p in sig.parameters.values():
        if p.name != "backend_options":
            params.append(p)
            continue
        params += [inspect.Parameter(k, p.kind, default=None, annotation=a) for k, a in BACKEND_OPTIONS.items()]

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> R:
        given = {k: kwargs.pop(k) for k in BACKEND_OPTIONS if k in kwargs}
        return command(*args, backend_options={k: v for k, v in given.items() if v is not None}, **kwargs)

    run.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]  # what typer reads
    run.__annotations__ = {p.name: p.annotation for p in params} | {"return": sig.return_annotation}
    return run


__all__ = [
    "ALL",
    "BACKEND_OPTIONS",
    "AdapterOpt",
    "ApiKeyEnvOpt",
    "BackendOpt",
    "BaseUrlOpt",
    "BatchSizeOpt",
    "DeviceOpt",
    "DtypeOpt",
    "EscalateBackendOpt",
    "GuidedChoiceOpt",
    "MaxRetriesOpt",
    "MinLabelMassOpt",
    "ModelOpt",
    "PresetOpt",
    "TextConfidenceOpt",
    "ThreadsOpt",
    "TimeoutOpt",
    "with_backend_options",
]
