"""``icm train``: transformers' Trainer with PEFT, on data from ``icm data export``.

What a run does (:func:`train`):

1. loads the base model (``AutoModelForImageTextToText``) and its processor by hub id or
   path (Qwen-VL-style processors without torchvision through the hf backend's loader);
2. reads the examples (:mod:`icm.training.datasets`): the exported conversations, the
   moderation questions in the exact wording and rendering ``icm moderate`` scores, and
   for MSFT general instruction data mixed in at a ratio;
3. makes the trainable parts: a LoRA adapter on the language model's linear layers
   (``target_modules``; the vision tower's too with ``train_vision``; the projector and
   any ``modules_to_save`` trained in full), continuing an adapter for CSFT
   (``init_adapter``), or full fine-tuning with the vision tower and projector frozen
   unless asked;
4. trains with :class:`transformers.Trainer` (gradient accumulation, checkpointing,
   checkpoints every ``save_steps``, ``resume``), under ``accelerate launch`` on many
   devices (DDP, DeepSpeed, FSDP: see :mod:`icm.training.accelerate_configs`) or one;
5. saves ``output_dir/adapter`` (LoRA) or ``output_dir/model`` (full, with the
   processor), then evaluates on the held-out split: the loss, and ICM metrics from
   moderating the held-out images with the saved artefact
   (:mod:`icm.training.evaluate`); writes ``output_dir/train_summary.json``.

The training loop is transformers'; this module only prepares its inputs.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from icm.training.config import TrainConfig

__all__ = ["ModelParts", "TrainResult", "build_datasets", "model_parts", "prepare_model", "train"]

log = logging.getLogger(__name__)

VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder", "vision")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector", "merger", "projector", "visual_projection")
INSTALL_HINT = "pip install 'icm-assistant[train]'"


@dataclass
class TrainResult:
    output_dir: str
    artefact: str
    """``output_dir/adapter`` (LoRA) or ``output_dir/model`` (full)."""
    method: str
    strategy: str
    examples: dict[str, int] = field(default_factory=dict)
    eval_examples: int = 0
    trainable_parameters: int = 0
    total_parameters: int = 0
    steps: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    train_seconds: float = 0.0
    resumed_from: str | None = None
    world_size: int = 1
    main_process: bool = True
    """False in the other processes of a multi-process run (they print and write nothing)."""
    evaluation: dict[str, Any] | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    target_loss: float | None = None
    reached_target_loss: bool | None = None
    """Whether a logged training loss went below ``target_loss`` before the cap (None: no target)."""
    last_loss: float | None = None
    """The last logged training loss (the mean over the last ``logging_steps``)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _local(name: str | Path) -> dict[str, Any]:
    """``local_files_only`` for a checkpoint that is a local folder: a path never asks the hub."""
    return {"local_files_only": True} if Path(name).is_dir() else {}


def _require() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"icm train needs torch, transformers and peft ({err}): {INSTALL_HINT}") from err
    return torch, transformers


# --------------------------------------------------------------------------- model parts


class ModelParts(TypedDict):
    """:func:`model_parts`: module names by part, and the part of every linear layer."""

    vision: list[str]
    projector: list[str]
    head: list[str]
    linear: dict[str, str]


def model_parts(model: Any) -> ModelParts:
    """Module names of the vision tower, the projector, the output head and the rest.

    ``vision`` and ``projector`` are roots (their sub-modules belong to them; a projector
    inside the vision tower, like Qwen2-VL's merger, counts as the projector);
    ``linear`` maps every ``nn.Linear`` to its part.
    """
    import torch

    names = [n for n, _ in model.named_modules() if n]
    vision_roots = _roots(names, VISION_NAMES)
    projector_roots = _roots(names, PROJECTOR_NAMES)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    linear: dict[str, str] = {}
    for n, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if n == head_name:
            linear[n] = "head"
        elif _under(n, projector_roots):
            linear[n] = "projector"
        elif _under(n, vision_roots):
            linear[n] = "vision"
        else:
            linear[n] = "language"
    return {"vision": vision_roots, "projector": projector_roots, "head": [head_name] if head_name else [],
            "linear": linear}


def _roots(names: list[str], wanted: tuple[str, ...]) -> list[str]:
    hits = [n for n in names if n.rsplit(".", 1)[-1] in wanted]
    return [n for n in hits if not any(n != h and n.startswith(h + ".") for h in hits)]


def _under(name: str, roots: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def lora_targets(model: Any, config: TrainConfig) -> list[str]:
    """Full names of the linear layers the adapter goes on (see the module docstring)."""
    parts = model_parts(model)
    allowed = {"language"} | ({"vision"} if config.train_vision else set())
    names = [n for n, part in parts["linear"].items() if part in allowed]
    wanted = config.target_modules
    if wanted != ["all-linear"]:
        names = [n for n in names if any(n == w or n.endswith("." + w) for w in wanted)]
    if not names:
        raise ValueError(
            f"no linear layer matches target_modules {wanted} in the trainable parts "
            f"({'language model and vision tower' if config.train_vision else 'language model'})"
        )
    return names


def prepare_model(model: Any, config: TrainConfig) -> Any:
    """LoRA (new, or the CSFT adapter) or full fine-tuning with the frozen parts frozen."""
    parts = model_parts(model)
    if config.method == "full":
        frozen = ([] if config.train_vision else parts["vision"]) + ([] if config.train_projector else parts["projector"])
        for name, p in model.named_parameters():
            p.requires_grad = not _under(name, frozen)
        if config.train_vision and not config.train_projector:
            for name, p in model.named_parameters():  # the projector may sit inside the vision tower
                if _under(name, parts["projector"]):
                    p.requires_grad = False
        return model
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError as err:  # pragma: no cover
        raise ImportError(f"LoRA needs peft ({err}): {INSTALL_HINT}") from err
    with warnings.catch_warnings():  # peft calls a deprecated transformers alias
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if config.init_adapter:
            return PeftModel.from_pretrained(model, config.init_adapter, is_trainable=True, **_local(config.init_adapter))
        save = list(config.modules_to_save)
        if config.train_projector:
            save += [r for r in parts["projector"] if r not in save]
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=lora_targets(model, config),
            modules_to_save=save or None,
        )
        return get_peft_model(model, lora)


# --------------------------------------------------------------------------- data


def build_datasets(config: TrainConfig, policy: Any = None) -> tuple[Any, Any, list[Any], dict[str, Any]]:
    """The train and held-out datasets, the held-out examples of ours, and notes."""
    from icm.training.datasets import TrainDataset, load_examples, mix_general, moderation_examples

    ours = load_examples(config.data, image_root=config.image_root)
    if config.eval_data:
        held = [ex for split in load_examples(config.eval_data, image_root=config.image_root).values() for ex in split]
    else:
        held = ours["validation"]
    train_conv = ours["train"]
    if not train_conv:
        raise ValueError(f"no training examples in {', '.join(config.data)} (a train split is needed)")
    notes: dict[str, Any] = {}
    train: list[Any] = list(train_conv) if config.conversations else []
    evals: list[Any] = list(held) if config.conversations else []
    if config.moderation_questions:
        mq, skipped = moderation_examples(train_conv, policy)
        mq_eval, _ = moderation_examples(held, policy)
        train += mq
        evals += mq_eval
        if skipped:
            notes["moderation_questions_skipped_images"] = skipped
            log.warning("%d training images have no known product or policy: no moderation questions for them", skipped)
    if not train:
        raise ValueError("nothing to train on: conversations are off and no moderation questions could be made")
    if config.strategy == "msft" and not config.general_data:
        notes["msft_without_general_data"] = "no general_data: this run is plain SFT on ICM data"
    if config.init_adapter:
        notes["init_adapter"] = f"{config.init_adapter}: its rank, alpha and targets are kept (lora_* settings unused)"
    if config.general_data:
        general = [ex for split in load_examples(config.general_data, kind="general", image_root=config.image_root).values()
                   for ex in split]
        mixed = mix_general(train, general, config.general_ratio, seed=config.seed)
        notes["general_available"] = len(general)
        train += mixed
    return (TrainDataset(train, seed=config.seed, shuffle=True), TrainDataset(evals) if evals else None, held, notes)


# --------------------------------------------------------------------------- the run


def _dtype(torch: Any, name: str) -> tuple[Any, bool, bool]:
    """(load dtype, bf16 flag, fp16 flag) for TrainingArguments."""
    cuda = torch.cuda.is_available()
    if name == "auto":
        name = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    on_gpu = cuda
    return table[name], name == "bfloat16" and on_gpu, name == "float16" and on_gpu


def _checkpointing_args(transformers: Any, on: bool) -> dict[str, Any]:
    """Activation (gradient) checkpointing under the argument name this transformers uses."""
    from dataclasses import fields

    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    out: dict[str, Any] = {key: on}
    if on:
        out[f"{key}_kwargs"] = {"use_reentrant": False}
    return out


def _last_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


class _Progress:
    """A transformers callback forwarding log lines to a function (the CLI prints them)."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        from transformers import TrainerCallback

        class CB(TrainerCallback):
            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
                if state.is_world_process_zero and logs:
                    fn({"step": state.global_step, "max_steps": state.max_steps, **logs})

        self.callback = CB()


def _stop_at_loss(target: float) -> Any:
    """A transformers callback that stops training once a logged loss is below ``target``.

    The logged loss is the mean over ``logging_steps`` steps (across processes): a step
    count alone trains a different model on each CPU, a loss target the same quality.
    """
    from transformers import TrainerCallback

    class StopAtLoss(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and isinstance(logs.get("loss"), (int, float)) and logs["loss"] < target:
                control.should_training_stop = True

    return StopAtLoss()


def _trainer_class() -> type:
    """transformers' Trainer, batching examples of similar length together when asked
    (lengths come from the rendered text: a long conversation is not padded alongside
    short moderation questions)."""
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class ICMTrainer(Trainer):
        group_by_length = True

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            ds = train_dataset if train_dataset is not None else self.train_dataset
            lengths = getattr(ds, "lengths", None)
            if self.group_by_length and lengths is not None:
                return LengthGroupedSampler(
                    self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=lengths()
                )
            return super()._get_train_sampler(train_dataset)

    return ICMTrainer


def train(config: TrainConfig, *, on_log: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Run the training a config describes (see the module docstring)."""
    torch, transformers = _require()
    from transformers import AutoModelForImageTextToText, TrainingArguments

    from icm.moderation.backends.hf import load_processor
    from icm.policy import load_policy
    from icm.training.collator import ChatCollator, find_templater

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    transformers.set_seed(config.seed)
    policy = load_policy(config.policy) if config.policy else None
    out = Path(config.output_dir)

    processor, _ = load_processor(config.processor or config.model, **_local(config.processor or config.model))
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_ds, eval_ds, held, notes = build_datasets(config, policy)
    templater = find_templater(processor)
    train_ds.prepare(templater)
    if eval_ds is not None:
        eval_ds.prepare(templater)

    load_dtype, bf16, fp16 = _dtype(torch, config.dtype)
    model = AutoModelForImageTextToText.from_pretrained(config.model, dtype=load_dtype, **_local(config.model))
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    model = prepare_model(model, config)
    if config.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise ValueError("nothing is trainable: check method, train_vision, train_projector and target_modules")

    resume: str | None = None
    if config.resume == "latest":
        resume = _last_checkpoint(config.output_dir)
        if resume is None:
            log.warning("resume=latest: no checkpoint in %s, starting from scratch", config.output_dir)
    elif config.resume:
        resume = config.resume

    # A multi-process launch on a machine without a GPU trains on the CPU over gloo.
    cpu_distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=min(config.warmup_ratio, 0.999) if config.warmup_ratio < 1 else 0.999,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        bf16=bf16,
        fp16=fp16,
        **_checkpointing_args(transformers, config.gradient_checkpointing),
        remove_unused_columns=False,
        dataloader_num_workers=config.dataloader_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        # text-only examples (general data) leave the vision tower and projector unused in a batch
        ddp_find_unused_parameters=any(not ex.images for ex in train_ds.examples),
        use_cpu=cpu_distributed,
        ddp_backend="gloo" if cpu_distributed else None,
        report_to="none",
        disable_tqdm=on_log is not None,
        eval_strategy="no",
    )
    collator = ChatCollator(processor, max_length=config.max_length)
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=collator,
        callbacks=([_Progress(on_log).callback] if on_log else [])
        + ([_stop_at_loss(config.target_loss)] if config.target_loss is not None else []),
    )
    if on_log is not None:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.group_by_length = config.group_by_length
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    eval_loss = None
    if config.evaluate and eval_ds is not None and len(eval_ds):
        metrics = trainer.evaluate(eval_dataset=eval_ds)
        eval_loss = float(metrics["eval_loss"]) if "eval_loss" in metrics else None

    artefact = out / ("adapter" if config.method == "lora" else "model")
    trainer.save_model(str(artefact))
    if config.method == "full" and trainer.is_world_process_zero():
        processor.save_pretrained(str(artefact))
    history = [h for h in trainer.state.log_history]
    is_main = trainer.is_world_process_zero()
    world = trainer.args.world_size
    steps = trainer.state.global_step
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    res = TrainResult(
        output_dir=str(out), artefact=str(artefact), method=config.method, strategy=config.strategy,
        examples=train_ds.counts(), eval_examples=len(eval_ds) if eval_ds is not None else 0,
        trainable_parameters=trainable, total_parameters=total, steps=steps,
        train_loss=float(result.training_loss) if result.training_loss is not None and math.isfinite(result.training_loss) else None,
        eval_loss=eval_loss, train_seconds=round(seconds, 3), resumed_from=resume, world_size=world,
        log_history=history, main_process=is_main,
    )
    losses = [float(h["loss"]) for h in history if isinstance(h.get("loss"), (int, float))]
    res.last_loss = losses[-1] if losses else None
    if config.target_loss is not None:
        res.target_loss = config.target_loss
        res.reached_target_loss = any(x < config.target_loss for x in losses)
        if not res.reached_target_loss and is_main:
            log.warning("training stopped at its cap (%d steps) before the target loss %s: last logged loss %s",
                        steps, config.target_loss, res.last_loss)
    if not is_main:
        return res
    if config.evaluate and held:
        from icm.training.evaluate import evaluate_held_out

        res.evaluation = evaluate_held_out(config, res.artefact, held, policy=policy).as_dict()
    summary = {"config": config.model_dump(mode="json"), "notes": notes, **res.as_dict()}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return res
