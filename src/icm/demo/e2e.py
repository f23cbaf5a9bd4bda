"""The whole loop on a CPU (``icm demo e2e``, ``bench/e2e.py``): data, tuning, moderation,
evaluation, and a rule-set switch without retraining.

Every stage calls the library function behind an ``icm`` command, and says the command
line that does the same, so a stage can be rerun by hand:

1. :func:`~icm.demo.synth.make_synth_dataset` (``icm data synth``): training and
   held-out test figures;
2. a tiny LLaVA built locally (:mod:`icm.training.tiny`) with a tokenizer trained here
   on the task's texts;
3. :func:`~icm.data.generate.generate` (``icm data generate``) against the scripted
   teacher on loopback (:class:`~icm.demo.teacher.TeacherServer`, OpenAI protocol);
4. :func:`~icm.data.export.export_records` (``icm data export -f hf``);
5. :func:`~icm.training.trainer.train` (``icm train``): LoRA on the language model, the
   projector and the output head trained in full (a randomly initialised model's head must
   learn the answer words), the vision tower frozen;
6. :func:`~icm.moderation.job.run_job` (``icm moderate --backend hf --adapter``) on the
   held-out images, under rule set A;
7. :func:`~icm.evaluation.icm_metrics.evaluate_icm` (``icm eval icm``) with the test
   labels: the ICM accuracy; the attribute-product accuracy (most likely product = drawn
   product) from the same records;
8. :func:`~icm.policy.diff.diff_rule_sets` (``icm policy diff A B``) and moderation again
   under rule set B with the *same* loaded model and adapter: the decision (violate /
   allow of the most likely product) must change for exactly the images whose product B
   relabels, and the evaluation under B scores it.

Stage times are measured around each call; torch's thread count is set explicitly and
reported.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from icm.demo.synth import SYNTH_POLICY

__all__ = ["E2EConfig", "E2EResult", "report_lines", "run_e2e", "train_yaml"]


@dataclasses.dataclass
class E2EConfig:
    workdir: str = "icm-e2e"
    train_images: int = 1080
    test_images: int = 270
    general_examples: int = 1000
    """Text-only general instructions written by ``icm data synth --general`` (MSFT mixing)."""
    general_ratio: str = "6:1"
    image_size: int = 64
    seed: int = 0
    threads: int = 2
    """torch CPU threads (set explicitly: the measured speed depends on it)."""
    rules: str = "general"
    relabel_to: str = "teen"
    # the tiny model
    text_hidden: int = 64
    vision_hidden: int = 64
    vocab_size: int = 1200
    # training (see `train_yaml` for the rest)
    max_steps: int = 1500
    target_loss: float | None = None
    """Stop training once the logged training loss (mean over 25 steps) is below this;
    ``max_steps`` is then the cap, and reaching it first fails the run. None: train
    ``max_steps`` steps (what a fixed step count gives differs between CPUs)."""
    batch_size: int = 16
    learning_rate: float = 1e-3
    lora_r: int = 16
    qa: tuple[int, int, int, int] = (3, 2, 1, 1)
    """Q-A pairs per image asked of the teacher: yes/no, choice, what, how."""
    min_accuracy: float | None = 0.95
    """Fail (exit 1) below this ICM accuracy; None: report only."""


@dataclasses.dataclass
class E2EResult:
    workdir: str
    threads: int
    stages: dict[str, float] = dataclasses.field(default_factory=dict)
    commands: dict[str, str] = dataclasses.field(default_factory=dict)
    icm_accuracy: float | None = None
    icm_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    product_accuracy: float | None = None
    attribute_accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    relabelled_products: list[str] = dataclasses.field(default_factory=list)
    images: int = 0
    images_relabelled: int = 0
    decisions_changed: int = 0
    relabel_exact: bool | None = None
    verdicts_changed: int = 0
    verdict_only_changes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Images whose allow/review/block band moved while their decision did not (P(violation)
    crossed a threshold because some probability sits on relabelled products)."""
    held_out_during_training: dict[str, Any] = dataclasses.field(default_factory=dict)
    icm_accuracy_after: float | None = None
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    total_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.relabel_exact) and self.train.get("reached_target_loss") is not False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_yaml(c: E2EConfig, model: Path, export: Path, out: Path, general: Path | None = None) -> dict[str, Any]:
    """The training config of the run (written to WORKDIR/train.yaml)."""
    return {
        "model": str(model),
        "strategy": "msft",
        "method": "lora",
        "data": [str(export)],
        "general_data": [str(general)] if general else [],
        "general_ratio": c.general_ratio,
        "policy": SYNTH_POLICY,
        "moderation_questions": True,
        "conversations": True,
        "lora_r": c.lora_r,
        "lora_alpha": 2 * c.lora_r,
        "lora_dropout": 0.0,
        "target_modules": ["all-linear"],
        "modules_to_save": ["lm_head"],
        "train_vision": False,
        "train_projector": True,
        "max_steps": c.max_steps,
        "target_loss": c.target_loss,
        "batch_size": c.batch_size,
        "learning_rate": c.learning_rate,
        "warmup_ratio": 0.03,
        "lr_scheduler": "linear",
        "output_dir": str(out),
        "save_steps": max(1, c.max_steps // 2),
        "save_total_limit": 1,
        "logging_steps": 25 if c.target_loss is not None else max(1, c.max_steps // 10),
        "evaluate": True,
        "num_threads": c.threads,
        "seed": c.seed,
    }


def _icm_report(records: Path, labels: Path, rules: str) -> Any:
    """What ``icm eval icm RECORDS --labels LABELS --policy synth-shapes --rules RULES`` reports."""
    from icm.evaluation.icm_metrics import evaluate_icm
    from icm.evaluation.labels import LabelResolver, read_labels
    from icm.evaluation.results import read_results
    from icm.policy import load_policy

    policy = load_policy(SYNTH_POLICY)
    resolver = LabelResolver(policy, rules, labels=read_labels(labels))
    return evaluate_icm(read_results(records, term=policy.term.id), resolver, name=records.stem)


def run_e2e(c: E2EConfig, say: Callable[[str], None] = print) -> E2EResult:
    """Run the loop (see the module docstring) in ``c.workdir``."""
    import importlib

    try:  # what the loop needs beyond the base install, named before any stage runs
        for module in ("torch", "transformers", "tokenizers", "accelerate", "peft"):
            importlib.import_module(module)
    except ImportError as err:
        raise RuntimeError(f"icm demo e2e trains a tiny VLM and needs the [train] extra ({err}): pip install 'icm-assistant[train]'") from None
    import torch
    import yaml

    from icm.data.export import export_records
    from icm.data.generate import GenerateConfig, generate
    from icm.data.outputs import read_records as read_instruct_records
    from icm.demo.synth import make_synth_dataset
    from icm.demo.teacher import TeacherServer, synth_corpus
    from icm.moderation.engine import Moderator
    from icm.moderation.job import ModerateConfig, build_moderator, run_job
    from icm.policy import load_policy
    from icm.policy.diff import diff_rule_sets
    from icm.training.config import load_config
    from icm.training.evaluate import product_accuracy
    from icm.training.tiny import build_tiny_llava
    from icm.training.trainer import train

    torch.set_num_threads(c.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(c.workdir)
    work.mkdir(parents=True, exist_ok=True)
    res = E2EResult(workdir=str(work), threads=torch.get_num_threads())
    say(f"torch threads: {res.threads} (set with torch.set_num_threads({c.threads}))")
    t_all = time.perf_counter()

    @contextlib.contextmanager
    def stage(name: str, *command: str) -> Iterator[None]:
        """Time a stage; ``command``: the ``icm`` command line that does the same by hand."""
        if command:
            line = "icm " + " ".join(shlex.quote(a) for a in command)
            res.commands[name] = line
            say(f"$ {line}")
        t0 = time.perf_counter()
        yield
        res.stages[name] = round(time.perf_counter() - t0, 2)
        say(f"[{name}] {res.stages[name]:.1f}s")

    synth_dir, instruct, export = work / "synth", work / "instruct", work / "export"
    model_dir, out = work / "tiny-llava", work / "train"
    with stage("synth", "data", "synth", str(synth_dir), "--train", str(c.train_images), "--test", str(c.test_images),
               "--general", str(c.general_examples), "--size", str(c.image_size), "--seed", str(c.seed)):
        make_synth_dataset(synth_dir, n_train=c.train_images, n_test=c.test_images, size=c.image_size, seed=c.seed,
                           n_general=c.general_examples)
    with stage("tiny model"):
        if not (model_dir / "config.json").exists():
            build_tiny_llava(model_dir, tokenizer_texts=synth_corpus(), vocab_size=c.vocab_size,
                             text_hidden=c.text_hidden, vision_hidden=c.vision_hidden, vision_feature_layer=-2,
                             seed=c.seed)
        say(f"built {model_dir} (tiny LLaVA, tokenizer trained here on the task's texts)")
    with TeacherServer(SYNTH_POLICY) as teacher:
        n = c.qa
        with stage("generate", "data", "generate", str(synth_dir / "train" / "inputs.csv"), "--out", str(instruct),
                   "--policy", SYNTH_POLICY, "--mllm-model", teacher.model, "--mllm-base-url", teacher.base_url,
                   "--yes-no", str(n[0]), "--choice", str(n[1]), "--what", str(n[2]), "--how", str(n[3])):
            gen = generate(GenerateConfig(
                inputs=[str(synth_dir / "train" / "inputs.csv")], out=str(instruct), policy=SYNTH_POLICY,
                mllm_model=teacher.model, mllm_base_url=teacher.base_url,
                n_yes_no=n[0], n_choice=n[1], n_what=n[2], n_how=n[3],
            ))
            if not gen.ok:
                raise RuntimeError(f"data generation failed for {gen.failed} images: "
                                   + "; ".join(f"{f.image}: {f.error}" for f in gen.failures[:3]))
            say(f"records {gen.records_total}, rejected {gen.rejected}, failed {gen.failed}, requests {gen.requests}")
    with stage("export", "data", "export", str(instruct), "--format", "hf", "--out", str(export), "--val-ratio", "0.05",
               "--seed", str(c.seed)):
        export_records(read_instruct_records(instruct), "hf", export, val_ratio=0.05, seed=c.seed)
    cfg_path = work / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(
        train_yaml(c, model_dir, export, out, synth_dir / "general.json" if c.general_examples else None), sort_keys=False), encoding="utf-8")
    with stage("train", "train", str(cfg_path)):
        trained = train(load_config(cfg_path)).as_dict()
        res.train = {k: v for k, v in trained.items() if k in (
            "steps", "train_loss", "eval_loss", "train_seconds", "examples", "trainable_parameters", "total_parameters",
            "target_loss", "reached_target_loss", "last_loss")}
        ev = trained.get("evaluation") or {}
        res.held_out_during_training = {k: ev.get(k) for k in ("images", "icm_accuracy", "product_accuracy")}
        say(f"steps {res.train['steps']}, train loss {res.train['train_loss']:.4f}, examples {res.train['examples']}, "
            f"trainable {res.train['trainable_parameters']:,} of {res.train['total_parameters']:,} parameters")
    adapter = out / "adapter"
    test_images, labels = synth_dir / "test" / "images", synth_dir / "test" / "labels.csv"
    before, after = work / f"moderate-{c.rules}.jsonl", work / f"moderate-{c.relabel_to}.jsonl"
    moderate = ["moderate", str(test_images), "--backend", "hf", "--model", str(model_dir), "--adapter", str(adapter),
                "--policy", SYNTH_POLICY, "--batch-size", "16"]
    job = ModerateConfig.from_options(inputs=[str(test_images)], backend="hf", model=str(model_dir), adapter=str(adapter),
                                      policy=SYNTH_POLICY, batch_size=16, rules=c.rules, out=str(before))
    with stage("moderate", *moderate, "--rules", c.rules, "--out", str(before)):
        moderator = build_moderator(job)
        records_a = run_job(job, moderator=moderator).records
    evaluate = ["eval", "icm", "--labels", str(labels), "--policy", SYNTH_POLICY]
    with stage("eval", *evaluate[:2], str(before), *evaluate[2:], "--rules", c.rules):
        rep = _icm_report(before, labels, c.rules)
        res.icm_metrics = dict(rep.metrics)
        res.icm_accuracy = rep.metrics["accuracy"]
        policy = load_policy(SYNTH_POLICY)
        with open(labels, newline="", encoding="utf-8") as fh:
            truth = {Path(row["image"]).name: row["product"] for row in csv.DictReader(fh)}
        res.product_accuracy, res.attribute_accuracy = product_accuracy(policy, records_a, truth)
        res.images = len(records_a)
    with stage("relabel", "policy", "diff", f"{SYNTH_POLICY}:{c.rules}", f"{SYNTH_POLICY}:{c.relabel_to}"):
        res.relabelled_products = sorted(ch.product for ch in diff_rule_sets(policy, c.rules, policy, c.relabel_to).changes)
        say("$ icm " + " ".join(shlex.quote(a) for a in (*moderate, "--rules", c.relabel_to, "--out", str(after))))
        relabel_job = job.model_copy(update={"rules": c.relabel_to, "out": str(after)})
        same_model = Moderator(moderator.backend, policy=moderator.policy, rules=c.relabel_to)  # the model loaded once
        records_b = run_job(relabel_job, moderator=same_model).records
        by_path = {r.path: r for r in records_b}
        relabelled = set(res.relabelled_products)
        exact = True
        for a in records_a:
            b = by_path.get(a.path)
            if b is None or not a.ok or not b.ok:
                exact = False
                continue
            changed = a.label != b.label
            res.decisions_changed += changed
            res.verdicts_changed += a.verdict != b.verdict
            if a.verdict != b.verdict and not changed:
                res.verdict_only_changes.append({
                    "image": Path(a.path).name, "product": a.product, "verdict": f"{a.verdict} -> {b.verdict}",
                    "p_violation": f"{a.p_violation:.3f} -> {b.p_violation:.3f}"})
            in_set = a.product in relabelled
            res.images_relabelled += in_set
            if changed != in_set or a.product != b.product:
                exact = False
        res.relabel_exact = exact
        say("$ icm " + " ".join(shlex.quote(a) for a in (*evaluate[:2], str(after), *evaluate[2:], "--rules", c.relabel_to)))
        res.icm_accuracy_after = _icm_report(after, labels, c.relabel_to).metrics["accuracy"]
    res.total_seconds = round(time.perf_counter() - t_all, 2)
    (work / "e2e.json").write_text(json.dumps(res.as_dict(), indent=2) + "\n", encoding="utf-8")
    return res


def report_lines(c: E2EConfig, r: E2EResult) -> list[str]:
    """The summary printed at the end (the last line is ``ICM accuracy: 0.xxxx``)."""
    lines = ["", "stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r.stages.items())
             + f"; total {r.total_seconds:.1f} with {r.threads} torch threads"]
    ex = r.train.get("examples", {})
    lines.append(f"training: {r.train.get('steps')} steps on " + ", ".join(f"{v} {k}" for k, v in sorted(ex.items()))
                 + f" examples; validation split during icm train: {r.held_out_during_training}")
    if r.train.get("target_loss") is not None:
        lines.append(f"target training loss {r.train['target_loss']}: "
                     + ("reached" if r.train.get("reached_target_loss") else f"NOT reached within the cap of {c.max_steps} steps")
                     + f" (last logged loss {r.train.get('last_loss')}, after {r.train.get('steps')} steps)")
    lines.append(f"held-out test images: {r.images}; rules {SYNTH_POLICY}:{c.rules}")
    if r.product_accuracy is not None:
        lines.append(f"attribute-product accuracy: {r.product_accuracy:.4f} ("
                     + ", ".join(f"{k} {v:.3f}" for k, v in r.attribute_accuracy.items()) + ")")
    lines.append(f"relabel {c.rules} -> {c.relabel_to}: {len(r.relabelled_products)} products relabelled "
                 f"({', '.join(r.relabelled_products)}); {r.images_relabelled} images predicted as one of them; "
                 f"decisions changed: {r.decisions_changed}; exactly those: {'yes' if r.relabel_exact else 'NO'}; "
                 f"no retraining")
    lines.append(f"verdicts (allow/review/block) changed: {r.verdicts_changed}, of which "
                 f"{len(r.verdict_only_changes)} without a decision change (P(violation) crossed a threshold): "
                 + (", ".join(f"{x['image']} {x['product']} {x['verdict']} (P {x['p_violation']})"
                              for x in r.verdict_only_changes[:5]) or "none"))
    if r.icm_accuracy_after is not None:
        lines.append(f"ICM accuracy under {c.relabel_to}: {r.icm_accuracy_after:.4f}")
    lines.append(f"ICM accuracy: {r.icm_accuracy:.4f}" if r.icm_accuracy is not None else "ICM accuracy: n/a")
    return lines
