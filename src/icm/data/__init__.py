"""ICM-Instruct data: generation, parsing, quality control, import, export and mixing.

The library form of ``icm data ...``:

* :func:`generate` / :class:`GenerateConfig` (``icm data generate``): images with their
  attribute products -> descriptions, explanations and Q-A pairs from an MLLM and an
  LLM, resumable, cached, quality-filtered;
* :func:`import_icm` (``icm data import-icm``): the released ICM-Instruct text into our
  records;
* :func:`export_records` (``icm data export``): LLaVA, ShareGPT (LLaMA-Factory),
  Qwen-VL, Hugging Face datasets and parquet;
* :func:`mix_datasets` (``icm data mix``): ours mixed with general instruction data;
* :func:`parse_qa_text`, :func:`extract_verdict`, :func:`check_explanation`: the parsers
  and filters on their own.

Records of every stage are pydantic models in :mod:`icm.data.records`.
"""

from __future__ import annotations

from icm.cache import ReplyCache, prompt_hash
from icm.data.export import EXPORT_FORMATS, ExportResult, build_samples, export_records, split_of
from icm.data.generate import (
    GenerateConfig,
    GenerateSummary,
    Generator,
    ItemOutcome,
    generate,
    plan_prompts,
    split_combined_answer,
)
from icm.data.import_icm import ImportResult, ImportStats, import_icm
from icm.data.inputs import InputError, Sample, load_samples
from icm.data.instructions import DEFAULT_POOLS, InstructionPools
from icm.data.llm import ChatError, ChatResult, TextClient
from icm.data.mix import MixResult, mix_datasets
from icm.data.outputs import OutputStore, read_records, read_rejected, repair_jsonl
from icm.data.quality import Verdict, check_description, check_explanation, extract_verdict
from icm.data.records import REASONS, DescriptionRecord, ExplanationRecord, InstructRecord, QAPair, Rejected
from icm.data.tables import QAParse, find_tables, parse_qa_text, split_options

__all__ = [
    "DEFAULT_POOLS", "EXPORT_FORMATS", "REASONS", "ChatError", "ChatResult", "DescriptionRecord", "ExplanationRecord",
    "ExportResult", "GenerateConfig", "GenerateSummary", "Generator", "ImportResult", "ImportStats", "InputError",
    "InstructRecord", "InstructionPools", "ItemOutcome", "MixResult", "OutputStore", "QAPair", "QAParse", "Rejected",
    "ReplyCache", "Sample", "TextClient", "Verdict", "build_samples", "check_description", "check_explanation",
    "export_records", "extract_verdict", "find_tables", "generate", "import_icm", "load_samples", "mix_datasets",
    "parse_qa_text", "plan_prompts", "prompt_hash", "read_records", "read_rejected", "repair_jsonl", "split_combined_answer",
    "split_of", "split_options",
]
