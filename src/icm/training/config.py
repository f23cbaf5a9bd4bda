"""The training configuration: one YAML file, every field also a flag of ``icm train``.

:class:`TrainConfig` is the single description of a run. ``icm train CONFIG.yaml`` reads
the file, and every flag given on the command line replaces the field of the same name
(``--learning-rate 1e-4`` replaces ``learning_rate``; list flags replace the whole list).
The mapping is one to one and checked by the tests: a field without a flag, or a flag
without a field, fails them.

Paths in the file are used as written (relative to the working directory).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["ConfigError", "TrainConfig", "load_config"]

Strategy = Literal["msft", "csft"]
Method = Literal["lora", "full"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A training configuration that cannot be used; the message says what to fix."""


class TrainConfig(BaseModel):
    """Everything ``icm train`` takes (see docs/training.md)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # -- what to tune -------------------------------------------------------------------------
    model: str = Field(description="Base model: a hub id or a local checkpoint (AutoModelForImageTextToText)")
    processor: str | None = Field(default=None, description="Processor to load, when not the model's own")
    strategy: Strategy = Field(
        default="msft",
        description="msft: ICM data mixed with general instruction data in one run, from the base model; "
        "csft: ICM data only, continuing from an already tuned model (--model) or adapter (--init-adapter)",
    )
    init_adapter: str | None = Field(default=None, description="csft: the LoRA adapter to continue training")
    method: Method = Field(default="lora", description="lora: train a LoRA adapter; full: train the weights themselves")

    # -- data ---------------------------------------------------------------------------------
    data: list[str] = Field(
        default_factory=list,
        description="ICM data exported by `icm data export` (hf or parquet folder, llava/sharegpt JSON)",
    )
    eval_data: list[str] = Field(
        default_factory=list, description="Held-out data; default: the validation split of --data"
    )
    general_data: list[str] = Field(
        default_factory=list, description="msft: general instruction data (LLaVA/ShareGPT JSON, hf folder) mixed in"
    )
    general_ratio: str = Field(default="1:1", description="msft: OURS:GENERAL samples (1:3), or the share of ours (0.25)")
    image_root: str | None = Field(default=None, description="Folder that relative image paths in the data start from")
    policy: str | None = Field(
        default=None, description="Policy of the moderation questions and the evaluation; default: the data's"
    )
    moderation_questions: bool = Field(
        default=True,
        description="Add, per image of ours, the term's yes/no question and each attribute's lettered question, "
        "worded and rendered exactly as `icm moderate` asks them",
    )
    conversations: bool = Field(default=True, description="Train on the exported conversations (explanations, Q-A)")
    max_length: int | None = Field(default=2048, description="Truncate longer examples at the end (tokens)")

    # -- LoRA / trainable parts ---------------------------------------------------------------
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description="LoRA targets: 'all-linear' or module names (q_proj, v_proj ...), within the trainable parts",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="LoRA: modules trained in full and saved with the adapter (e.g. lm_head)"
    )
    train_vision: bool = Field(default=False, description="Train the vision tower too (LoRA targets or full)")
    train_projector: bool = Field(default=True, description="Train the vision-language projector (in full)")

    # -- optimisation -------------------------------------------------------------------------
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = Field(default=-1, description="Stop after this many optimizer steps (-1: run the epochs)")
    target_loss: float | None = Field(
        default=None, gt=0,
        description="Stop early once a logged training loss (the mean over logging_steps) is below this; "
        "max_steps (or the epochs) is then the cap, and the result says whether the target was reached",
    )
    learning_rate: float = Field(default=2e-4, gt=0)
    batch_size: int = Field(default=4, ge=1, description="Per device")
    grad_accum: int = Field(default=1, ge=1, description="Gradient accumulation steps")
    warmup_ratio: float = Field(default=0.03, ge=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    lr_scheduler: str = Field(default="cosine", description="transformers scheduler name (cosine, linear, constant ...)")
    group_by_length: bool = Field(default=True, description="Batch examples of similar length together")
    gradient_checkpointing: bool = False
    dtype: DType = Field(default="auto", description="auto: bfloat16 on a GPU that has it, else float32")
    seed: int = 0

    # -- output, checkpoints ------------------------------------------------------------------
    output_dir: str = Field(default="icm-train", description="Checkpoints, the adapter (or model) and the summary")
    save_steps: int = Field(default=500, ge=1, description="Save a checkpoint every N optimizer steps")
    save_total_limit: int | None = Field(default=2, description="Keep at most N checkpoints")
    logging_steps: int = Field(default=10, ge=1)
    resume: str | None = Field(default=None, description="'latest' (the last checkpoint in output_dir) or a checkpoint folder")

    # -- evaluation at the end ----------------------------------------------------------------
    evaluate: bool = Field(default=True, description="At the end: eval loss, and ICM metrics on the held-out images")
    eval_rules: str | None = Field(default=None, description="Rule set of the ICM evaluation (default: the policy's)")
    eval_max_images: int | None = Field(default=None, description="Evaluate at most N held-out images")
    eval_batch_size: int = Field(default=8, ge=1)
    eval_min_label_mass: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="As icm moderate's --min-label-mass: an answer counts only when the labels hold this share of the "
        "next-token probability (0 reads any model's label distribution, e.g. after a few smoke-test steps)",
    )

    # -- machine ------------------------------------------------------------------------------
    num_threads: int | None = Field(default=None, description="torch CPU threads (default: torch's choice)")
    dataloader_workers: int = Field(default=0, ge=0)

    @field_validator("data", "eval_data", "general_data", "target_modules", "modules_to_save", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if not self.data:
            raise ValueError("no training data: give data (folders or files exported by `icm data export`)")
        if self.strategy == "csft" and self.general_data:
            raise ValueError("csft trains on ICM data only: general_data is for msft")
        if self.init_adapter and self.strategy != "csft":
            raise ValueError("init_adapter continues a tuned adapter: that is strategy csft")
        if self.init_adapter and self.method != "lora":
            raise ValueError("init_adapter continues a LoRA adapter: use method lora (or merge it and pass --model)")
        if self.resume not in (None, "latest") and not Path(self.resume).is_dir():
            raise ValueError(f"resume: no checkpoint folder {self.resume!r} (or use 'latest')")
        if self.general_data:
            from icm.data.mix import parse_ratio

            parse_ratio(self.general_ratio)
        return self

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return list(cls.model_fields)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """A config from a YAML file (optional) with ``overrides`` (None values are ignored).

    Raises :class:`ConfigError` with every problem (unknown keys included) named.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such config file") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: malformed YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a training config is a YAML mapping of field: value")
        data.update(loaded)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"]) or "config"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = f"unknown field (known: {', '.join(TrainConfig.field_names())})"
            lines.append(f"{loc}: {msg}")
        where = f"{path}: " if path is not None else ""
        raise ConfigError(where + "; ".join(lines)) from None
