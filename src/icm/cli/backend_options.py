"""The backend options of ``icm moderate``, ``icm chat``, ``icm eval run`` and ``icm serve``:
one typer option per :class:`~icm.moderation.spec.BackendSpec` field, defined once.

A command declares ``backend: BackendOpt = "detector"`` (its own default; ``None`` where a
config file fills it in, as in ``icm serve``) and builds the spec with
``BackendSpec.build(backend=backend, ...)``. The help texts are the spec's field
descriptions.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from icm.moderation.spec import BackendSpec


def _help(field: str) -> str:
    return BackendSpec.model_fields[field].description or ""


BackendOpt = Annotated[Optional[str], typer.Option("--backend", "-b", help=_help("backend"))]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help=_help("model"))]
AdapterOpt = Annotated[Optional[str], typer.Option("--adapter", help=_help("adapter"))]
BaseUrlOpt = Annotated[Optional[str], typer.Option("--base-url", help=_help("base_url"))]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help=_help("dtype") + " auto, float32, bfloat16 or float16.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help=_help("device"))]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Images per batch (hf: per forward pass).")]
MinLabelMassOpt = Annotated[
    Optional[float],
    typer.Option(
        "--min-label-mass",
        help="hf/openai: an answer counts only when the model puts at least this probability on the valid labels "
        "(Yes/No or the option labels); below it the question is not judged (refused or off-format) and the image "
        "is never allowed.",
    ),
]
GuidedChoiceOpt = Annotated[
    Optional[str],
    typer.Option(
        "--guided-choice",
        help="openai: ask the server to constrain answers to the labels: off, structured_outputs (vLLM >= 0.10), "
        "guided_choice (older vLLM) or regex (SGLang). A server that rejects it is asked without it.",
    ),
]
EscalateBackendOpt = Annotated[Optional[str], typer.Option("--escalate-backend", help=_help("escalate_backend"))]
ApiKeyEnvOpt = Annotated[Optional[str], typer.Option("--api-key-env", help=_help("api_key_env"))]
TimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", help=_help("timeout"))]
MaxRetriesOpt = Annotated[Optional[int], typer.Option("--max-retries", help=_help("max_retries"))]

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
    "TimeoutOpt",
]
