"""The backend options of ``icm moderate``, ``icm chat``, ``icm eval run`` and ``icm serve``:
one typer option per :class:`~icm.moderation.spec.BackendSpec` field, defined once.

A command declares ``backend: BackendOpt = "detector"`` (its own default; ``None`` where a
config file fills it in, as in ``icm serve``) and builds the spec with
``BackendSpec.build(backend=backend, ...)``. The help texts are the spec's field
descriptions.
"""

from __future__ import annotations

from typing import Annotated

import typer

from icm.moderation.spec import BackendSpec


def _help(field: str) -> str:
    return BackendSpec.model_fields[field].description or ""


BackendOpt = Annotated[str | None, typer.Option("--backend", "-b", help=_help("backend"))]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help=_help("model"))]
AdapterOpt = Annotated[str | None, typer.Option("--adapter", help=_help("adapter"))]
BaseUrlOpt = Annotated[str | None, typer.Option("--base-url", help=_help("base_url"))]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help=_help("dtype") + " auto, float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help=_help("device"))]
BatchSizeOpt = Annotated[int | None, typer.Option("--batch-size", help="Images per batch (hf: per forward pass).")]
MinLabelMassOpt = Annotated[
    float | None,
    typer.Option(
        "--min-label-mass",
        help="hf/openai: an answer counts only when the model puts at least this probability on the valid labels "
        "(Yes/No or the option labels); below it the question is not judged (refused or off-format) and the image "
        "is never allowed.",
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
        "guided_choice (older vLLM) or regex (SGLang). A server that rejects it is asked without it.",
    ),
]
EscalateBackendOpt = Annotated[str | None, typer.Option("--escalate-backend", help=_help("escalate_backend"))]
ApiKeyEnvOpt = Annotated[str | None, typer.Option("--api-key-env", help=_help("api_key_env"))]
TimeoutOpt = Annotated[float | None, typer.Option("--timeout", help=_help("timeout"))]
MaxRetriesOpt = Annotated[int | None, typer.Option("--max-retries", help=_help("max_retries"))]
PresetOpt = Annotated[str | None, typer.Option("--preset", help=_help("preset"))]

__all__ = [
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
    "TimeoutOpt",
]
