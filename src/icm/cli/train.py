"""`icm train ...`: instruction tuning (MSFT / CSFT, LoRA / full); thin over icm.training.

``icm train CONFIG.yaml [--field value ...]`` is ``icm train run``: every option below is
a field of :class:`icm.training.config.TrainConfig` (same name, dashes for underscores)
and replaces the file's value when given.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from icm.cli.common import console, err_console, print_error, print_json


class _RunByDefault(TyperGroup):
    """``icm train CONFIG ...`` means ``icm train run CONFIG ...``."""

    # typer (0.29) types ctx as its vendored click Context, which has no public name; the ctx it passes is a typer.Context
    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:  # type: ignore[override]
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_RunByDefault,
    help="Instruction-tune a VLM on ICM data (MSFT / CSFT, LoRA / full), merge adapters, launch on many devices.",
    no_args_is_help=True,
)


def _fail(msg: object, code: int = 2) -> typer.Exit:
    print_error(msg)
    return typer.Exit(code)


# Options that are not fields of TrainConfig (the tests check that every other one is).
CLI_ONLY = ("config", "json_", "dry_run")


@app.command("run")
def run(
    config: Path | None = typer.Argument(None, help="Training config (YAML); flags override its fields."),
    model: str | None = typer.Option(None, help="Base model: a hub id or a local checkpoint."),
    processor: str | None = typer.Option(None, help="Processor to load, when not the model's own."),
    strategy: str | None = typer.Option(None, help="msft (ICM + general data, from the base model) or csft (ICM data, continuing a tuned model or adapter)."),
    init_adapter: str | None = typer.Option(None, help="csft: the LoRA adapter to continue training."),
    method: str | None = typer.Option(None, help="lora or full."),
    data: list[str] | None = typer.Option(None, help="ICM data from `icm data export` (hf/parquet folder, llava/sharegpt JSON); repeat or comma-separate."),
    eval_data: list[str] | None = typer.Option(None, help="Held-out data (default: the validation split of --data)."),
    general_data: list[str] | None = typer.Option(None, help="msft: general instruction data mixed in."),
    general_ratio: str | None = typer.Option(None, help="msft: OURS:GENERAL (1:3) or the share of ours (0.25)."),
    image_root: str | None = typer.Option(None, help="Folder relative image paths start from."),
    policy: str | None = typer.Option(None, help="Policy of the moderation questions and the evaluation (default: the data's)."),
    moderation_questions: bool | None = typer.Option(
        None, "--moderation-questions/--no-moderation-questions",
        help="Add the term and attribute questions, worded and rendered as `icm moderate` asks them.",
    ),
    conversations: bool | None = typer.Option(None, "--conversations/--no-conversations", help="Train on the exported conversations."),
    max_length: int | None = typer.Option(None, help="Truncate longer examples (tokens)."),
    lora_r: int | None = typer.Option(None, help="LoRA rank."),
    lora_alpha: int | None = typer.Option(None, help="LoRA alpha."),
    lora_dropout: float | None = typer.Option(None, help="LoRA dropout."),
    target_modules: list[str] | None = typer.Option(None, help="LoRA targets: all-linear or module names (q_proj,v_proj ...)."),
    modules_to_save: list[str] | None = typer.Option(None, help="LoRA: modules trained in full and saved with the adapter (lm_head ...)."),
    train_vision: bool | None = typer.Option(None, "--train-vision/--freeze-vision", help="Train the vision tower too (default: frozen)."),
    train_projector: bool | None = typer.Option(None, "--train-projector/--freeze-projector", help="Train the projector (default: trained)."),
    epochs: float | None = typer.Option(None, help="Epochs over the training examples."),
    max_steps: int | None = typer.Option(None, help="Stop after N optimizer steps (-1: run the epochs)."),
    target_loss: float | None = typer.Option(
        None, help="Stop early once the logged training loss is below this (--max-steps is then the cap)."),
    learning_rate: float | None = typer.Option(None, "--learning-rate", "--lr", help="Peak learning rate."),
    batch_size: int | None = typer.Option(None, help="Examples per device and step."),
    grad_accum: int | None = typer.Option(None, help="Gradient accumulation steps."),
    warmup_ratio: float | None = typer.Option(None, help="Share of the steps spent warming up."),
    weight_decay: float | None = typer.Option(None, help="AdamW weight decay."),
    lr_scheduler: str | None = typer.Option(None, help="cosine, linear, constant ..."),
    group_by_length: bool | None = typer.Option(None, "--group-by-length/--no-group-by-length", help="Batch examples of similar length together."),
    gradient_checkpointing: bool | None = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute activations in the backward pass (less memory).",
    ),
    dtype: str | None = typer.Option(None, help="auto, float32, bfloat16 or float16."),
    seed: int | None = typer.Option(None, help="Seed of everything random."),
    output_dir: str | None = typer.Option(None, "--output-dir", "-o", help="Checkpoints, adapter or model, summary."),
    save_steps: int | None = typer.Option(None, help="Save a checkpoint every N steps."),
    save_total_limit: int | None = typer.Option(None, help="Keep at most N checkpoints."),
    logging_steps: int | None = typer.Option(None, help="Log every N steps."),
    resume: str | None = typer.Option(None, help="latest, or a checkpoint folder."),
    evaluate: bool | None = typer.Option(None, "--evaluate/--no-evaluate", help="Evaluate on the held-out split at the end (loss and ICM metrics)."),
    eval_rules: str | None = typer.Option(None, help="Rule set of the ICM evaluation."),
    eval_max_images: int | None = typer.Option(None, help="Evaluate at most N held-out images."),
    eval_batch_size: int | None = typer.Option(None, help="Images per batch in the evaluation."),
    eval_min_label_mass: float | None = typer.Option(
        None,
        help="Minimum label mass for an answer to count in the evaluation (as icm moderate's --min-label-mass).",
    ),
    num_threads: int | None = typer.Option(None, help="torch CPU threads."),
    dataloader_workers: int | None = typer.Option(None, help="DataLoader worker processes."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and the data counts; train nothing."),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train (the default command): `icm train CONFIG.yaml [--field value ...]`."""
    given = {k: v for k, v in locals().items() if k not in CLI_ONLY}
    from icm.training.config import ConfigError, load_config

    for key in ("data", "eval_data", "general_data", "target_modules", "modules_to_save"):
        if given.get(key) is not None:
            given[key] = [x.strip() for v in given[key] for x in v.split(",") if x.strip()]
    try:
        cfg = load_config(config, given)
    except ConfigError as exc:
        raise _fail(exc) from None
    if dry_run:
        _dry_run(cfg, json_)
        return
    from icm.training.trainer import train

    t0 = time.perf_counter()

    def on_log(d: dict[str, Any]) -> None:
        if json_:
            return
        keys = [k for k in ("loss", "eval_loss", "grad_norm", "learning_rate", "epoch") if k in d]
        parts = " ".join(f"{k} {d[k]:.4g}" if isinstance(d[k], float) else f"{k} {d[k]}" for k in keys)
        if "train_runtime" in d:
            parts = f"done in {d['train_runtime']:.1f}s, mean loss {d.get('train_loss', float('nan')):.4g}"
        err_console.print(f"step {d.get('step')}/{d.get('max_steps')} {parts} [{time.perf_counter() - t0:.0f}s]", highlight=False)

    try:
        res = train(cfg, on_log=on_log)
    except (ConfigError, ValueError, KeyError, OSError, ImportError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise _fail(msg) from None
    if not res.main_process:
        return  # the main process reports for the whole run
    if json_:
        summary = res.as_dict()
        summary.pop("log_history", None)
        print_json(summary)
        return
    _print_result(res)


def _dry_run(cfg: Any, json_: bool) -> None:
    from icm.training.trainer import build_datasets

    try:
        train_ds, eval_ds, held, notes = build_datasets(cfg)
    except (ValueError, KeyError, OSError, ImportError) as exc:
        raise _fail(exc) from None
    counts = {"train": train_ds.counts(), "eval": eval_ds.counts() if eval_ds is not None else {},
              "held_out_images": len({str(e.image_key) for e in held if e.images}), "notes": notes}
    if json_:
        print_json({"config": cfg.model_dump(mode="json"), **counts})
        return
    console.print(cfg.to_yaml(), highlight=False, soft_wrap=True)
    console.print(f"train examples: {counts['train']}; eval examples: {counts['eval']}; "
                  f"held-out images: {counts['held_out_images']}; nothing trained (--dry-run)", highlight=False)


def _print_result(res: Any) -> None:
    t = Table(title=f"icm train -> {escape(res.artefact)}", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    rows = [
        ("strategy / method", f"{res.strategy} / {res.method}"),
        ("examples", ", ".join(f"{k} {v}" for k, v in sorted(res.examples.items()))),
        ("trainable parameters", f"{res.trainable_parameters:,} of {res.total_parameters:,}"),
        ("steps", str(res.steps)), ("processes", str(res.world_size)),
        ("train loss", f"{res.train_loss:.4f}" if res.train_loss is not None else "-"),
        ("eval loss", f"{res.eval_loss:.4f}" if res.eval_loss is not None else "-"),
        ("training seconds", f"{res.train_seconds:.1f}"),
    ]
    if res.resumed_from:
        rows.append(("resumed from", res.resumed_from))
    ev = res.evaluation
    if ev and ev.get("images"):
        rows += [
            ("held-out images", f"{ev['images']} ({ev['policy']}:{ev['rules']})"),
            ("ICM accuracy", f"{ev['icm_accuracy']:.4f}" if ev.get("icm_accuracy") is not None else "-"),
            ("product accuracy", f"{ev['product_accuracy']:.4f}" if ev.get("product_accuracy") is not None else "-"),
            ("attribute accuracy", ", ".join(f"{k} {v:.3f}" for k, v in ev.get("attribute_accuracy", {}).items())),
            ("moderation records", ev["records"]),
        ]
        if ev.get("note"):
            rows.append(("note", ev["note"]))
    for k, v in rows:
        t.add_row(k, escape(str(v)))
    console.print(t)


@app.command()
def merge(
    adapter: Path = typer.Argument(..., help="A LoRA adapter folder (OUTPUT_DIR/adapter)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the merged checkpoint."),
    model: str | None = typer.Option(None, "--model", "-m", help="Base model (default: the one the adapter names)."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Merge a LoRA adapter into its base model and save a plain checkpoint (no peft needed to load it)."""
    from icm.training.merge import merge_adapter

    try:
        res = merge_adapter(adapter, out, base=model, dtype=dtype)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise _fail(exc) from None
    if json_:
        print_json(res.as_dict())
        return
    console.print(f"merged {res.adapter} into {res.base}: {res.parameters:,} parameters -> {res.out}", highlight=False)


@app.command("accelerate-config")
def accelerate_config(
    name: str | None = typer.Argument(None, help="ddp, deepspeed-zero2, deepspeed-zero3, fsdp or cpu-ddp."),
    list_: bool = typer.Option(False, "--list", help="List the shipped configs with their launch commands."),
) -> None:
    """Print the path of a shipped `accelerate` config, for `accelerate launch --config_file`."""
    from icm.training.launch import accelerate_config_names, accelerate_config_path, format_command, launch_command

    if list_ or name is None:
        for n in accelerate_config_names():
            console.print(f"{n}: {format_command(launch_command(n, 'config.yaml'))}", highlight=False, soft_wrap=True)
        return
    try:
        path = accelerate_config_path(name)
    except KeyError as exc:
        raise _fail(exc.args[0]) from None
    sys.stdout.write(f"{path}\n")
