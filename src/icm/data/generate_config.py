"""The settings and the results of ``icm data generate``: :class:`GenerateConfig` (one
field per CLI option), :class:`ItemOutcome` (progress callbacks) and
:class:`GenerateSummary` (the run's totals, written to ``<out>/summary.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from icm.data.quality import ALL_FILTERS, DEFAULT_FILTERS
from icm.openai_http import ServerSettings

__all__ = ["MODES", "Failure", "GenerateConfig", "GenerateSummary", "ItemOutcome", "Mode"]

Mode = Literal["combined", "separate"]
MODES: tuple[Mode, ...] = ("combined", "separate")


@dataclass
class GenerateConfig:
    """Everything ``icm data generate`` takes; the CLI maps one option onto each field."""

    inputs: list[str] = field(default_factory=list)
    """CSV (image,product) or JSONL files, or folders with one sub-folder per product."""
    out: str = "icm-instruct"
    """Output folder: records.jsonl, rejected.jsonl, summary.json (and cache.sqlite)."""
    policy: str = "icm-sexy"
    mllm_model: str | None = None
    mllm_base_url: str | None = None
    mllm_api_key: str | None = None
    llm_model: str | None = None
    """The text LLM for Q-A generation; default: the MLLM."""
    llm_base_url: str | None = None
    """Default: the MLLM's server."""
    llm_api_key: str | None = None
    mode: Mode = "combined"
    qa: bool = True
    n_yes_no: int = 4
    n_choice: int = 5
    n_what: int = 3
    n_how: int = 3
    concurrency: int = 8
    timeout: float = 120.0
    max_retries: int = 3
    backoff: float = 0.5
    max_tokens: int = 1024
    qa_max_tokens: int = 1024
    temperature: float = 0.0
    seed: int | None = None
    max_image_side: int | None = 1024
    cache: str | None = None
    """SQLite response cache; default ``<out>/cache.sqlite``."""
    filters: list[str] = field(default_factory=lambda: list(DEFAULT_FILTERS))
    min_qa: int = 1
    """Fewest usable Q-A pairs for an image to be kept."""
    limit: int | None = None
    retry_rejected: bool = False
    """Forget earlier whole-image rejections and try those images again (pair it with a
    new --seed or --temperature, else the cache answers the same)."""
    dry_run: bool = False

    def validate(self, *, need_model: bool = True) -> None:
        if not self.inputs:
            raise ValueError("no inputs: give CSV/JSONL files or folders with one sub-folder per product")
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'combined' or 'separate', got {self.mode!r}")
        unknown = sorted(set(self.filters) - set(ALL_FILTERS))
        if unknown:
            raise ValueError(f"unknown filters {unknown} (known: {', '.join(ALL_FILTERS)})")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if min(self.n_yes_no, self.n_choice, self.n_what, self.n_how) < 0:
            raise ValueError("question counts must be >= 0")
        if self.qa and self.n_yes_no + self.n_choice + self.n_what + self.n_how == 0:
            raise ValueError("all question counts are 0: use --no-qa to skip the Q-A stage")
        if need_model and not self.dry_run and not self.mllm_model:
            raise ValueError("the MLLM's model name is needed (--mllm-model), or use --dry-run")

    @property
    def cache_path(self) -> Path:
        return Path(self.cache) if self.cache else Path(self.out) / "cache.sqlite"

    def mllm_server(self) -> ServerSettings:
        """The MLLM's server (image stages); base URL and key default to the environment."""
        return ServerSettings.from_env(
            base_url=self.mllm_base_url, api_key=self.mllm_api_key, model=self.mllm_model,
            max_concurrency=self.concurrency, timeout=self.timeout, max_retries=self.max_retries, backoff_base=self.backoff,
        )

    def llm_server(self) -> ServerSettings:
        """The text LLM's server (Q-A stage): by default the MLLM's server, model and key."""
        return ServerSettings.from_env(
            base_url=self.llm_base_url or self.mllm_base_url, api_key=self.llm_api_key or self.mllm_api_key,
            model=self.llm_model or self.mllm_model, max_concurrency=self.concurrency, timeout=self.timeout,
            max_retries=self.max_retries, backoff_base=self.backoff,
        )

    def public(self) -> dict[str, Any]:
        """The config without API keys (for summaries and provenance)."""
        d = asdict(self)
        d.pop("mllm_api_key", None)
        d.pop("llm_api_key", None)
        return d


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ItemOutcome:
    """What happened to one input, reported as it happens (progress callbacks)."""

    status: Literal["written", "rejected", "skipped", "duplicate", "failed", "input_error"]
    image: str
    id: str | None = None
    stage: str | None = None
    reason: str | None = None
    detail: str | None = None


class Failure(BaseModel):
    image: str
    id: str | None = None
    stage: str
    error: str


class GenerateSummary(BaseModel):
    """The run's totals (also written to ``<out>/summary.json``)."""

    inputs: int = 0
    written: int = 0
    rejected: int = 0
    rejected_rows: int = 0
    rejected_by_reason: dict[str, int] = Field(default_factory=dict)
    skipped: int = Field(default=0, description="Images already done by an earlier run")
    duplicates: int = 0
    failed: int = 0
    failures: list[Failure] = Field(default_factory=list)
    input_errors: list[dict[str, str]] = Field(default_factory=list)
    requests: int = Field(default=0, description="HTTP requests sent, retries included")
    retries: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    records_total: int = Field(default=0, description="Records in records.jsonl after the run")
    repaired_bytes: int = Field(default=0, description="Bytes of a half-written last line cut off at start")
    out: str = ""
    config: dict[str, Any] = Field(default_factory=dict, description="The run's settings (API keys left out)")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.input_errors
