"""``icm train merge``: fold a LoRA adapter into its base model and save a plain checkpoint.

The merged folder loads like any checkpoint (``icm moderate --backend hf --model MERGED``,
vLLM, ``AutoModelForImageTextToText``), without peft. The base model is the one the
adapter names (``base_model_name_or_path`` in ``adapter_config.json``) unless another is
given; the base model's processor is saved beside the weights.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["MergeResult", "adapter_base", "merge_adapter"]


@dataclass
class MergeResult:
    adapter: str
    base: str
    out: str
    parameters: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def adapter_base(adapter: str | Path) -> str | None:
    """The base model an adapter was trained on, from its ``adapter_config.json``."""
    cfg = Path(adapter) / "adapter_config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{adapter}: no adapter_config.json (not a LoRA adapter folder)")
    return json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")


def merge_adapter(adapter: str | Path, out: str | Path, *, base: str | None = None, dtype: str = "auto") -> MergeResult:
    """Merge ``adapter`` into ``base`` (default: the adapter's own base) and save to ``out``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from icm.moderation.backends.hf import load_processor

    base = base or adapter_base(adapter)
    if not base:
        raise ValueError(f"{adapter}: the adapter does not name its base model; pass --model")
    table = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {', '.join(table)}")
    local: dict[str, Any] = {"local_files_only": True} if Path(base).is_dir() else {}  # a local folder never asks the hub
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=table[dtype], **local)
    with warnings.catch_warnings():  # peft calls a deprecated transformers alias
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        merged = PeftModel.from_pretrained(model, str(adapter), local_files_only=True).merge_and_unload()
    out = Path(out)
    merged.save_pretrained(str(out))
    processor, _ = load_processor(base, **local)
    processor.save_pretrained(str(out))
    return MergeResult(adapter=str(adapter), base=str(base), out=str(out), parameters=sum(p.numel() for p in merged.parameters()))
