"""`icm train` runs on tiny models built here: MSFT and CSFT, LoRA and full, checkpoints
and resume, merge, a two-process CPU run, and a Qwen2-VL-family model.

The data is the synthetic task (`icm data synth`) through the real `icm data generate`
(scripted teacher on loopback) and `icm data export -f hf`. Runs are a few optimizer
steps: what is checked is what each mode must do (which weights move, what is saved,
what a resumed run continues from), and that the result loads where users load it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("datasets")

from icm.cli.main import app
from icm.policy import load_policy

from tiny_models import test_seed

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny LLaVA and the synthetic task's data: hf export (train/validation), general data."""
    torch.set_num_threads(1)
    from icm.data.generate import GenerateConfig, generate
    from icm.demo.synth import make_synth_dataset
    from icm.demo.teacher import TeacherServer, synth_corpus
    from icm.training.tiny import build_tiny_llava

    root = tmp_path_factory.mktemp("train-runs")
    res = make_synth_dataset(root / "synth", n_train=54, n_test=0, n_general=40)
    with TeacherServer() as t:
        s = generate(GenerateConfig(inputs=[res.train_csv], out=str(root / "instruct"), policy="synth-shapes",
                                    mllm_model=t.model, mllm_base_url=t.base_url, n_yes_no=2, n_choice=1, n_what=1, n_how=1))
    assert s.written == 54
    r = runner.invoke(app, ["data", "export", str(root / "instruct"), "-f", "hf", "-o", str(root / "export"), "--val-ratio", "0.2"])
    assert r.exit_code == 0, r.output
    model = build_tiny_llava(root / "tiny-llava", tokenizer_texts=synth_corpus(), vocab_size=1200, text_hidden=64,
                             vision_hidden=64, vision_feature_layer=-2)
    return {"root": root, "model": model, "export": root / "export", "general": Path(res.general)}


def _config(work, out: Path, **over) -> Path:
    cfg = {
        "model": str(work["model"]), "data": [str(work["export"])], "output_dir": str(out), "batch_size": 4,
        "max_steps": 6, "learning_rate": 2e-3, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "modules_to_save": ["lm_head"], "save_steps": 3, "logging_steps": 1, "num_threads": 1, "seed": test_seed(),
        "warmup_ratio": 0.0,
        # a few steps leave a model that does not answer with the labels yet: these runs check the
        # evaluation's arithmetic, so read whatever label distribution the model has (the default,
        # 0.5, is tested by test_held_out_evaluation_of_a_model_that_does_not_answer_yet_says_so)
        "eval_min_label_mass": 0.0, **over,
    }
    path = out.with_suffix(".yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(args: list[str]) -> dict:
    result = runner.invoke(app, ["train", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _scores(model: str, adapter: str | None, images: list[str]) -> list[float]:
    from PIL import Image

    from icm.moderation.backends.hf import HFBackend

    be = HFBackend(model=model, adapter=adapter, batch_size=8, device="cpu", min_label_mass=0.0)  # any P(Yes), judged or not
    q = load_policy("synth-shapes").term.question
    ims = [Image.open(p).convert("RGB") for p in images]
    return [s.p_yes for s in be.score_yes_no(ims, [q] * len(ims))]


def _images(work, n: int = 6) -> list[str]:
    return sorted(str(p) for p in (work["root"] / "synth" / "train" / "images").glob("*.png"))[:n]


def test_held_out_evaluation_of_a_model_that_does_not_answer_yet_says_so(work, tmp_path):
    """An untrained model's answers are not judged (never read as answers), so the run's
    evaluation has no accuracy to give; it says why instead of failing the run."""
    from types import SimpleNamespace

    from icm.training.config import TrainConfig
    from icm.training.evaluate import evaluate_held_out

    policy = load_policy("synth-shapes")
    held = [SimpleNamespace(images=[p], product=policy.products[0].id, policy="synth-shapes") for p in _images(work, 3)]
    cfg = TrainConfig(model=str(work["model"]), data=[str(work["export"])], output_dir=str(tmp_path), method="full")
    assert cfg.eval_min_label_mass == 0.5
    ev = evaluate_held_out(cfg, str(work["model"]), held, policy=policy)
    assert ev.images == 3 and ev.icm_accuracy is None and ev.not_judged == 3 and ev.errors == 0
    assert ev.note and "no held-out image was judged" in ev.note and ev.metrics == {"coverage": 0.0}
    recs = [json.loads(line) for line in (tmp_path / "eval" / "moderation.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(r["verdict"] != "allow" and r["product"] is None for r in recs)
    # the same model, reading its label distribution whatever its mass, does give a figure
    ev0 = evaluate_held_out(cfg.model_copy(update={"eval_min_label_mass": 0.0}), str(work["model"]), held, policy=policy)
    assert ev0.icm_accuracy is not None and ev0.note is None


# --------------------------------------------------------------------------- LoRA, MSFT


@pytest.fixture(scope="module")
def lora_msft(work):
    out = work["root"] / "lora-msft"
    cfg = _config(work, out, general_data=[str(work["general"])], general_ratio="4:1", max_steps=8, save_steps=4)
    return out, _train([str(cfg)])


def test_lora_msft_mixes_general_data_trains_saves_and_evaluates(work, lora_msft):
    out, res = lora_msft
    ex = res["examples"]
    n_ours = ex["conversation"] + ex["term"] + ex["attribute"]
    assert ex["attribute"] == 3 * ex["term"] == 3 * ex["conversation"]
    assert ex["general"] == min(40, round(n_ours / 4))
    assert res["strategy"] == "msft" and res["method"] == "lora" and res["steps"] == 8
    assert 0 < res["trainable_parameters"] < res["total_parameters"]
    adapter = Path(res["artefact"])
    assert adapter == out / "adapter" and (adapter / "adapter_config.json").is_file()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    # LoRA on the language model only (vision tower frozen), projector and head trained in full
    assert all("language_model" in t for t in cfg["target_modules"])
    assert set(cfg["modules_to_save"]) >= {"lm_head", "model.multi_modal_projector"}
    losses = [h["loss"] for h in res["log_history"]] if "log_history" in res else None
    summary = json.loads((out / "train_summary.json").read_text())
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    # Not a quality gate: from a random head the loss starts near ln(vocab) ~ 7 and the first
    # steps at lr 2e-3 take it down by whole units (e2e: 7.5 -> 4.2 in 25 steps), far more
    # than any seed's or CPU's minibatch noise; the assertion says the weights are updated.
    assert len(losses) == 8 and min(losses[-3:]) < losses[0]
    ev = summary["evaluation"]
    n_val = len({Path(line.split(",")[0]).name for line in (out / "eval" / "labels.csv").read_text().splitlines()[1:]})
    assert ev["images"] == n_val > 0 and ev["icm_accuracy"] is not None and ev["rules"] == "general"
    recs = [json.loads(line) for line in (out / "eval" / "moderation.jsonl").read_text().splitlines()]
    assert len(recs) == n_val and all(r["backend"] == "hf" and "adapter" in r["model"] for r in recs)
    # the eval command reproduces the figure from the files the run wrote
    again = runner.invoke(app, ["eval", "icm", str(out / "eval" / "moderation.jsonl"), "--labels", str(out / "eval" / "labels.csv"),
                                "--policy", "synth-shapes", "--json"])
    assert json.loads(again.stdout)["icm"]["metrics"]["accuracy"] == ev["icm_accuracy"]
    # the adapter changes what the model says
    imgs = _images(work)
    assert _scores(str(work["model"]), str(adapter), imgs) != _scores(str(work["model"]), None, imgs)


def test_merge_writes_a_model_that_scores_like_base_plus_adapter(work, lora_msft, tmp_path):
    _out, res = lora_msft
    merged = tmp_path / "merged"
    r = runner.invoke(app, ["train", "merge", res["artefact"], "--out", str(merged), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["base"] == str(work["model"]) and (merged / "config.json").is_file()
    assert not (merged / "adapter_config.json").exists()
    imgs = _images(work)
    a = _scores(str(merged), None, imgs)
    b = _scores(str(work["model"]), res["artefact"], imgs)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4


# --------------------------------------------------------------------------- CSFT


def test_csft_continues_the_adapter_on_icm_data_only(work, lora_msft):
    _out0, res0 = lora_msft
    out = work["root"] / "csft"
    cfg = _config(work, out, strategy="csft", init_adapter=res0["artefact"], max_steps=4, evaluate=False)
    res = _train([str(cfg)])
    assert res["strategy"] == "csft" and "general" not in res["examples"]
    before, after = _weights(Path(res0["artefact"])), _weights(Path(res["artefact"]))
    assert set(before) == set(after)  # the same adapter (targets, rank, saved modules), continued
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("lora_" in k for k in moved) and any("lm_head" in k for k in moved)
    bad = runner.invoke(app, ["train", str(cfg), "--general-data", str(work["general"])])
    assert bad.exit_code == 2 and "csft" in bad.output


# --------------------------------------------------------------------------- full fine-tuning


def test_full_finetuning_keeps_frozen_parts_and_saves_a_loadable_model(work):
    from transformers import AutoModelForImageTextToText

    out = work["root"] / "full"
    res = _train([str(_config(work, out, method="full", max_steps=4, evaluate=False)), "--freeze-projector"])
    model_dir = Path(res["artefact"])
    assert model_dir == out / "model" and any((model_dir / f).is_file() for f in ("processor_config.json", "preprocessor_config.json"))
    base = AutoModelForImageTextToText.from_pretrained(str(work["model"])).state_dict()
    tuned = AutoModelForImageTextToText.from_pretrained(str(model_dir)).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(not (k.startswith("model.vision_tower") or "multi_modal_projector" in k) for k in changed)
    assert any("language_model" in k for k in changed)
    vision = {k for k in base if "vision_tower" in k}
    assert res["trainable_parameters"] == sum(v.numel() for k, v in tuned.items() if k not in vision and "multi_modal_projector" not in k
                                              and k != "lm_head.weight") + tuned["lm_head.weight"].numel()
    imgs = _images(work, 3)
    assert _scores(str(model_dir), None, imgs) != _scores(str(work["model"]), None, imgs)


# --------------------------------------------------------------------------- accumulation, activation checkpointing


def test_gradient_accumulation_and_checkpointing(work):
    import math

    out = work["root"] / "accum"
    cfg = _config(work, out, max_steps=-1, epochs=1, batch_size=8, grad_accum=2, gradient_checkpointing=True,
                  conversations=False, evaluate=False, save_steps=1000)
    res = _train([str(cfg)])
    n = res["examples"]["term"] + res["examples"]["attribute"]
    assert res["steps"] == math.ceil(math.ceil(n / 8) / 2)  # one optimizer step per two batches
    assert (Path(res["artefact"]) / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- checkpoints and resume


def test_resume_continues_where_the_checkpoint_stopped(work):
    out_a = work["root"] / "resume-a"
    res_a = _train([str(_config(work, out_a, max_steps=6, save_steps=3, evaluate=False))])
    assert (out_a / "checkpoint-3" / "trainer_state.json").is_file() and (out_a / "checkpoint-6").is_dir()
    # a run stopped after step 3, resumed from its checkpoint in another folder
    out_b = work["root"] / "resume-b"
    out_b.mkdir()
    shutil.copytree(out_a / "checkpoint-3", out_b / "checkpoint-3")
    res_b = _train([str(_config(work, out_b, max_steps=6, save_steps=3, evaluate=False)), "--resume", "latest"])
    assert res_b["resumed_from"] == str(out_b / "checkpoint-3") and res_b["steps"] == 6
    history_a = json.loads((out_a / "train_summary.json").read_text())["log_history"]
    history_b = json.loads((out_b / "train_summary.json").read_text())["log_history"]
    assert [h["step"] for h in history_b if "loss" in h] == [1, 2, 3, 4, 5, 6]  # steps 1-3 from the checkpoint's state
    assert [h["loss"] for h in history_b if "loss" in h] == pytest.approx([h["loss"] for h in history_a if "loss" in h], abs=1e-5)
    a, b = _weights(Path(res_a["artefact"])), _weights(Path(res_b["artefact"]))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5  # the same run as without the interruption
    # it really starts from the checkpoint's weights: change them, and the result changes
    from safetensors.torch import save_file

    out_p = work["root"] / "resume-perturbed"
    shutil.copytree(out_a / "checkpoint-3", out_p / "checkpoint-3")
    w = _weights(out_p / "checkpoint-3")
    key = next(k for k in w if "lora_B" in k)
    w[key] = w[key] + 0.05
    save_file(w, str(out_p / "checkpoint-3" / "adapter_model.safetensors"))
    res_p = _train([str(_config(work, out_p, max_steps=6, save_steps=3, evaluate=False)), "--resume", str(out_p / "checkpoint-3")])
    assert res_p["resumed_from"] == str(out_p / "checkpoint-3")
    p = _weights(Path(res_p["artefact"]))
    assert float((p[key] - a[key]).abs().max()) > 1e-3


# --------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_process_cpu_run_with_accelerate(work):
    out = work["root"] / "ddp"
    cfg = _config(work, out, max_steps=4, evaluate=True, eval_max_images=4, general_data=[str(work["general"])],
                  general_ratio="4:1")
    from icm.training.launch import accelerate_config_path

    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate) if accelerate.exists() else "accelerate", "launch", "--config_file",
           str(accelerate_config_path("cpu-ddp")), "--main_process_port", str(29500 + os.getpid() % 1000),
           "-m", "icm.cli.main", "train", str(cfg), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(work["root"]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = proc.stdout.count('"world_size"')
    assert printed == 1, "only the main process reports"
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert res["world_size"] == 2 and res["steps"] == 4
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    # two processes with batch 4 each: 8 examples per optimizer step
    assert state["train_batch_size"] == 4 and state["global_step"] == 4
    assert (out / "checkpoint-4" / "rng_state_1.pth").is_file()  # one RNG state per process
    assert (Path(res["artefact"]) / "adapter_model.safetensors").is_file()
    assert json.loads((out / "train_summary.json").read_text())["evaluation"]["images"] == 4


# --------------------------------------------------------------------------- another model family


@pytest.mark.parametrize("family", ["qwen2vl", "idefics3"])
def test_lora_on_other_model_families(work, tmp_path, family):
    from icm.demo.teacher import synth_corpus
    from icm.training import tiny

    build = {"qwen2vl": tiny.build_tiny_qwen2vl, "idefics3": tiny.build_tiny_idefics3}[family]
    model = build(tmp_path / family, tokenizer_texts=synth_corpus(), vocab_size=1200)
    out = tmp_path / "out"
    res = _train([str(_config(work, out, max_steps=3, eval_max_images=2)), "--model", str(model), "--train-vision"])
    cfg = json.loads((Path(res["artefact"]) / "adapter_config.json").read_text())
    vision, projector = {"qwen2vl": ("model.visual.blocks", "model.visual.merger"),
                         "idefics3": ("model.vision_model", "model.connector")}[family]
    weights = _weights(Path(res["artefact"]))
    lora = {k for k in weights if "lora_A" in k}
    assert any(f"{vision}." in k for k in lora) and any(("language_model" in k or "text_model" in k) for k in lora)  # LoRA on the vision tower too
    assert not any(f"{projector}." in k for k in lora) and projector in cfg["modules_to_save"]  # the projector in full
    assert any(f"{projector}." in k and "lora" not in k for k in weights)
    assert json.loads((out / "train_summary.json").read_text())["evaluation"]["images"] == 2
