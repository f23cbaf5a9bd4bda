"""`icm train` configuration, the synthetic task, the data readers and the collator.

No training here (see test_train_runs.py): the config maps one to one onto the CLI; the
synthetic figures can be read back from their pixels (after the JPEG the OpenAI backend
sends); the scripted teacher's answers pass `icm data generate`'s parsers and filters;
the synth-shapes rule sets relabel exactly the products their rules say; and a training
example for the term or an attribute question is tokenised exactly as the hf backend
tokenises what it scores, so its logits at the answer position *are* the backend's scores.
"""

from __future__ import annotations

import base64
import csv
import inspect
import io
import json
import random
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from icm.cli.main import app
from icm.demo.synth import ACTIONS, EXPOSURES, REGIONS, Figure, draw_figure, make_synth_dataset, random_figure, read_figure
from icm.demo.teacher import TeacherServer, teacher_reply
from icm.policy import load_policy
from icm.policy.prompts_format import moderation_choice_prompt, option_labels, yes_no_prompt
from icm.training.config import ConfigError, TrainConfig, load_config

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- config <-> CLI


def test_every_config_field_is_a_flag_and_every_flag_a_field():
    from icm.cli.train import CLI_ONLY, run

    params = set(inspect.signature(run).parameters) - set(CLI_ONLY)
    assert params == set(TrainConfig.model_fields), (
        f"fields without a flag: {set(TrainConfig.model_fields) - params}; flags without a field: {params - set(TrainConfig.model_fields)}"
    )


def test_yaml_then_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": "m", "data": ["d1"], "learning_rate": 0.1, "lora_r": 4, "train_vision": True}))
    c = load_config(cfg, {"learning_rate": 0.5, "lora_r": None, "data": ["a", "b"], "train_vision": False})
    assert (c.learning_rate, c.lora_r, c.data, c.train_vision) == (0.5, 4, ["a", "b"], False)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": "m", "data": ["d"], "learnig_rate": 1}, "learnig_rate: unknown field"),
        ({"model": "m"}, "no training data"),
        ({"model": "m", "data": ["d"], "strategy": "csft", "general_data": ["g"]}, "csft trains on ICM data only"),
        ({"model": "m", "data": ["d"], "init_adapter": "a"}, "that is strategy csft"),
        ({"model": "m", "data": ["d"], "strategy": "csft", "init_adapter": "a", "method": "full"}, "use method lora"),
        ({"model": "m", "data": ["d"], "general_data": ["g"], "general_ratio": "x"}, "ratio 'x'"),
        ({"model": "m", "data": ["d"], "resume": "/no/such/checkpoint"}, "no checkpoint folder"),
        ({"model": "m", "data": ["d"], "method": "qlora"}, "method"),
    ],
)
def test_bad_configs_say_what_is_wrong(tmp_path, data, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)
    result = runner.invoke(app, ["train", str(cfg)])
    assert result.exit_code == 2 and message.split(":")[0] in result.output


def test_accelerate_configs_are_shipped_and_valid():
    from icm.training.launch import accelerate_config_names, accelerate_config_path

    names = accelerate_config_names()
    assert {"ddp", "deepspeed-zero2", "deepspeed-zero3", "fsdp", "cpu-ddp"} <= set(names)
    kinds = {}
    for n in names:
        result = runner.invoke(app, ["train", "accelerate-config", n])
        assert result.exit_code == 0
        path = Path(result.output.strip())
        assert path == accelerate_config_path(n) and path.is_file()
        kinds[n] = yaml.safe_load(path.read_text())
    assert kinds["deepspeed-zero2"]["deepspeed_config"]["zero_stage"] == 2
    assert kinds["deepspeed-zero3"]["deepspeed_config"]["zero_stage"] == 3
    assert kinds["fsdp"]["distributed_type"] == "FSDP"
    assert kinds["cpu-ddp"]["num_processes"] == 2 and kinds["cpu-ddp"]["mixed_precision"] == "no"
    bad = runner.invoke(app, ["train", "accelerate-config", "zero9"])
    assert bad.exit_code == 2 and "shipped" in bad.output


# --------------------------------------------------------------------------- the synthetic task


def test_figures_read_back_from_their_pixels_after_jpeg():
    from icm.moderation.backends.openai_compat import encode_image

    rng = random.Random(3)
    for i in range(300):
        f = random_figure(rng)
        for size in (32, 64, 96):
            url = encode_image(draw_figure(f, size=size, seed=i))
            back = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            assert read_figure(back) == f, (i, size, f)
    assert read_figure(Image.new("RGB", (64, 64), (128, 128, 128))) is None


def test_figures_differ_from_image_to_image():
    f = Figure("upper", "bare", "touch")
    a, b = draw_figure(f, seed=1), draw_figure(f, seed=2)
    assert a.tobytes() != b.tobytes() and draw_figure(f, seed=1).tobytes() == a.tobytes()


def test_synth_policy_relabels_exactly_what_its_rules_say():
    policy = load_policy("synth-shapes")
    assert len(policy.products) == len(REGIONS) * len(EXPOSURES) * len(ACTIONS)
    for p in policy.products:
        a = p.assignment
        assert p.positive == (a["exposure"] != "covered")
        general = policy.labels("general")[p.id].violates
        teen = policy.labels("teen")[p.id].violates
        adult = policy.labels("adult")[p.id].violates
        assert general == (a["exposure"] == "bare" or (a["exposure"] == "partial" and a["action"] == "touch"))
        assert teen == (a["exposure"] != "covered")
        assert adult == (a["exposure"] == "bare" and a["action"] == "touch")
    result = runner.invoke(app, ["policy", "diff", "synth-shapes:general", "synth-shapes:teen", "--json"])
    changed = {c["product"] for c in json.loads(result.output)["changes"]}
    expected = {p.id for p in policy.products if p.assignment["exposure"] == "partial" and p.assignment["action"] != "touch"}
    assert changed == expected and len(changed) == 6
    files = [str(REPO / "src/icm/policies/synth-shapes.yaml")]
    assert runner.invoke(app, ["policy", "validate", "--strict", *files]).exit_code == 0


def test_teacher_answers_what_the_image_shows():
    policy = load_policy("synth-shapes")
    from icm.moderation.backends.openai_compat import encode_image
    from icm.policy.prompts import stage_prompts

    for pid in ("upper_bare_touch", "whole_covered_still", "lower_partial_wave"):
        f = Figure.of_product(policy, pid)
        url = encode_image(draw_figure(f, seed=pid))
        wrong_hint = stage_prompts(policy, "whole_covered_wave").combined  # the teacher reads pixels, not the hint

        def ask(text: str, url: str = url) -> str:
            msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]
            return teacher_reply(policy, msgs).text

        combined = ask(wrong_hint)
        assert combined.startswith("1. Explicit content:")
        assert ("The image is revealing" in combined) == f.positive
        yes = ask(yes_no_prompt(policy.term.question))
        assert yes == ("Yes" if f.positive else "No")
        for attr in policy.attributes:
            letter = ask(moderation_choice_prompt(attr.question, [v.option_text for v in attr.values]))
            assert option_labels(len(attr.values))[attr.value_ids.index(f.assignment[attr.id])] == letter


def test_icm_data_synth_generate_runs_the_real_pipeline(tmp_path):
    out = tmp_path / "synth"
    result = runner.invoke(app, ["data", "synth", str(out), "--train", "27", "--test", "9", "--general", "8",
                                 "--generate", "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.output)
    assert rep["generate"]["written"] == 27 and rep["generate"]["rejected"] == 0 and rep["generate"]["failed"] == 0
    rows = list(csv.DictReader(open(out / "train" / "inputs.csv")))
    assert sorted(r["product"] for r in rows) == sorted(p.id for p in load_policy("synth-shapes").products)
    records = [json.loads(line) for line in open(out / "instruct" / "records.jsonl")]
    policy = load_policy("synth-shapes")
    for r in records:
        assert r["explanation"]["verdict"] == policy.product(r["product"]).positive
        kinds = {q["kind"] for q in r["qa"]}
        assert {"yes_no", "choice", "what", "how"} <= kinds
        term_q = next(q for q in r["qa"] if q["question"] == policy.term.question)
        assert term_q["answer"] == ("Yes" if r["positive"] else "No")
    test_rows = list(csv.DictReader(open(out / "test" / "labels.csv")))
    assert len(test_rows) == 9 and all((out / "test" / t["image"]).is_file() for t in test_rows)
    general = json.loads((out / "general.json").read_text())
    assert len(general) == 8 and general[0]["conversations"][1]["value"]


def test_teacher_answers_each_stage_of_the_separate_mode(tmp_path):
    from icm.data.generate import GenerateConfig, generate

    res = make_synth_dataset(tmp_path / "s", n_train=6, n_test=0)
    with TeacherServer() as t:
        summary = generate(GenerateConfig(inputs=[res.train_csv], out=str(tmp_path / "out"), policy="synth-shapes",
                                          mode="separate", mllm_model=t.model, mllm_base_url=t.base_url))
        assert t.requests == 6 * 4  # explicit, implicit, explanation, Q-A
    assert summary.written == 6 and summary.rejected == 0
    for line in open(tmp_path / "out" / "records.jsonl"):
        r = json.loads(line)
        assert r["explicit"]["text"].startswith("The image shows a simple figure")
        assert r["implicit"]["text"].startswith("The picture feels")
        assert r["explanation"]["verdict"] == r["positive"]


def test_teacher_server_is_bounded_and_speaks_openai():
    import httpx

    with TeacherServer(max_body=1000) as t:
        models = httpx.get(f"{t.base_url}/models").json()
        assert models["data"][0]["id"] == t.model
        too_big = httpx.post(f"{t.base_url}/chat/completions", json={"messages": [{"role": "user", "content": "x" * 2000}]})
        assert too_big.status_code == 413
        bad = httpx.post(f"{t.base_url}/chat/completions", content=b"not json", headers={"Content-Type": "application/json"})
        assert bad.status_code == 400
    with pytest.raises(ValueError, match="loopback"):
        TeacherServer(host="0.0.0.0")
    served = runner.invoke(app, ["data", "synth", "unused", "--serve", "--idle-timeout", "0.5"])
    assert served.exit_code == 0 and "scripted teacher on http://127.0.0.1:" in served.output


# --------------------------------------------------------------------------- data and collator on tiny models

@pytest.fixture(scope="module")
def synth_export(tmp_path_factory):
    """27 figures -> icm data generate (scripted teacher) -> icm data export -f hf / llava."""
    pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("synth-export")
    res = make_synth_dataset(root / "synth", n_train=27, n_test=0)
    from icm.data.generate import GenerateConfig, generate

    with TeacherServer() as t:
        summary = generate(GenerateConfig(inputs=[res.train_csv], out=str(root / "instruct"), policy="synth-shapes",
                                          mllm_model=t.model, mllm_base_url=t.base_url, n_yes_no=2, n_choice=1, n_what=1, n_how=1))
    assert summary.written == 27
    for fmt in ("hf", "llava", "sharegpt", "parquet"):
        r = runner.invoke(app, ["data", "export", str(root / "instruct"), "-f", fmt, "-o", str(root / fmt), "--val-ratio", "0.2"])
        assert r.exit_code == 0, r.output
    return root


def test_exports_read_back_with_moderation_questions(synth_export):
    from icm.training.datasets import load_examples, moderation_examples

    policy = load_policy("synth-shapes")
    hf_ex = load_examples([synth_export / "hf"])
    llava_ex = load_examples([synth_export / "llava"])
    assert len(hf_ex["train"]) + len(hf_ex["validation"]) == 27
    assert len(llava_ex["train"]) == len(hf_ex["train"]) and len(llava_ex["validation"]) == len(hf_ex["validation"])
    # every layout gives the same conversations (the JSON exports have no product column)
    for fmt in ("llava", "sharegpt", "parquet"):
        other = load_examples([synth_export / fmt])
        for split in ("train", "validation"):
            assert [e.messages for e in other[split]] == [e.messages for e in hf_ex[split]], (fmt, split)
            assert [e.images for e in other[split]] == [e.images for e in hf_ex[split]], (fmt, split)
    assert [e.product for e in load_examples([synth_export / "parquet"])["train"]] == [e.product for e in hf_ex["train"]]
    first = hf_ex["train"][0]
    assert first.messages[0]["content"][0] == {"type": "image"} and Path(first.images[0]).is_file()
    mq, skipped = moderation_examples(hf_ex["train"])
    assert skipped == 0 and len(mq) == 4 * len(hf_ex["train"])
    by_image = {}
    for ex in mq:
        by_image.setdefault(ex.image_key, []).append(ex)
    for exs in by_image.values():
        product = policy.product(exs[0].product)
        asked = {ex.messages[0]["content"][1]["text"]: ex.messages[1]["content"][0]["text"] for ex in exs}
        assert asked[yes_no_prompt(policy.term.question)] == ("Yes" if product.positive else "No")
        for attr in policy.attributes:
            prompt = moderation_choice_prompt(attr.question, [v.option_text for v in attr.values])
            assert asked[prompt] == option_labels(len(attr.values))[attr.value_ids.index(product.assignment[attr.id])]
    _, skipped = moderation_examples(llava_ex["train"])
    assert skipped == len(llava_ex["train"])  # no product: no moderation questions, counted


def test_reviewed_decisions_train_as_they_are_exported(synth_export, tmp_path):
    """`icm data export-reviews` JSONL (messages with typed parts, images, product, policy) is
    training data as it is: its conversation, plus the single-turn moderation questions."""
    from icm.serve.export import conversation
    from icm.training.datasets import load_examples, moderation_examples

    policy = load_policy("synth-shapes")
    image = str(next((synth_export / "synth" / "train" / "images").glob("*.png")))
    turns = conversation(policy, "teen", product="lower_bare_wave", explanation="The figure is bare.", verdict="block")
    messages = []
    for i, (q, a) in enumerate(turns):
        user = [{"type": "image"}] if i == 0 else []
        messages += [{"role": "user", "content": [*user, {"type": "text", "text": q}]},
                     {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    f = tmp_path / "reviews.jsonl"
    f.write_text(json.dumps({"id": "review-1", "images": [image], "messages": messages, "policy": "synth-shapes",
                             "product": "lower_bare_wave"}) + "\n")
    ex = load_examples([f])["train"]
    assert len(ex) == 1 and ex[0].messages == messages and ex[0].images == [image]
    mq, skipped = moderation_examples(ex)
    # lower, bare, wave are options 2, 3 and 2: labelled C, D, C (the labels skip A, I and O: B, C, D, ...)
    assert skipped == 0 and [m.messages[1]["content"][0]["text"] for m in mq] == ["Yes", "C", "D", "C"]


def test_general_data_is_mixed_at_the_ratio(synth_export, tmp_path):
    from icm.training.datasets import Example, load_examples, mix_general

    gen = tmp_path / "general.json"
    gen.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
                               for i in range(50)]))
    general = load_examples([gen], kind="general")["train"]
    assert len(general) == 50 and not general[0].images
    ours = [Example(messages=[], kind="term") for _ in range(20)]
    assert len(mix_general(ours, general, "1:2", seed=1)) == 40
    assert len(mix_general(ours, general, "0.5", seed=1)) == 20
    assert len(mix_general(ours, general, "1:5", seed=1)) == 50  # all there is
    a = [e.messages for e in mix_general(ours, load_examples([gen])["train"], "1:1", seed=3)]
    b = [e.messages for e in mix_general(ours, load_examples([gen])["train"], "1:1", seed=3)]
    assert a == b


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch

    torch.set_num_threads(1)
    from icm.demo.teacher import synth_corpus
    from icm.training.tiny import build_tiny_idefics3, build_tiny_llava, build_tiny_qwen2vl

    root = tmp_path_factory.mktemp("tiny")
    texts = synth_corpus()
    return {
        "llava": build_tiny_llava(root / "llava", tokenizer_texts=texts, vocab_size=1200),
        "qwen2vl": build_tiny_qwen2vl(root / "qwen", tokenizer_texts=texts, vocab_size=1200),
        "idefics3": build_tiny_idefics3(root / "idefics3", tokenizer_texts=texts, vocab_size=1200),
    }


@pytest.mark.parametrize("family", ["llava", "qwen2vl", "idefics3"])
def test_training_prompt_is_what_the_backend_scores(tiny_models, synth_export, family):
    """Logits of the training batch at the answer position == the hf backend's scores."""
    import torch

    from icm.moderation.backends.hf import HFBackend, grouped_probs, resolve_answer_token_ids
    from icm.training.collator import ChatCollator
    from icm.training.datasets import TrainDataset, load_examples, moderation_examples

    backend = HFBackend(model=str(tiny_models[family]), batch_size=4, device="cpu", min_label_mass=0.0)  # untrained: compare raw scores
    policy = load_policy("synth-shapes")
    mq, _ = moderation_examples(load_examples([synth_export / "hf"])["train"][:3])
    ds = TrainDataset(mq)
    collator = ChatCollator(backend.processor)
    ds.prepare(collator.templater)
    items = [ds[i] for i in range(len(ds))]
    batch = collator(items)
    with torch.no_grad():
        logits = backend.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    tok = backend.tokenizer
    for row, item in enumerate(items):
        labels = batch["labels"][row]
        answer_at = int((labels != -100).nonzero()[0])
        prompt_ids = batch["input_ids"][row, :answer_at].tolist()
        # the labelled tokens are the answer and the template's end of turn, nothing else
        answer = item["messages"][1]["content"][0]["text"]
        assert tok.decode(labels[labels != -100].tolist()).strip().startswith(answer)
        image = Image.open(item["images"][0]).convert("RGB")
        rendered = backend._render_user(item["messages"][0]["content"][1]["text"])
        enc = backend._encode([image], [rendered])
        assert enc["input_ids"][0].tolist() == prompt_ids, "training prompt tokens differ from the backend's"
        lp = torch.log_softmax(logits[row, answer_at - 1].float(), -1)[None]
        if item["kind"] == "term":
            probs, _ = grouped_probs(lp, [resolve_answer_token_ids(tok, "Yes"), resolve_answer_token_ids(tok, "No")])
            expected = backend.score_yes_no([image], [policy.term.question])[0].p_yes
            assert abs(float(probs[0, 0]) - expected) < 1e-4
        else:
            attr = next(a for a in policy.attributes if item["messages"][0]["content"][1]["text"].startswith(a.question))
            options = [v.option_text for v in attr.values]
            groups = [resolve_answer_token_ids(tok, label) for label in option_labels(len(options))]
            probs, _ = grouped_probs(lp, groups)
            expected = backend.choose([image], attr.question, options)[0].probs
            assert max(abs(float(p) - e) for p, e in zip(probs[0], expected, strict=True)) < 1e-4


def test_conversations_label_only_the_replies(tiny_models, synth_export):
    from icm.moderation.backends.hf import load_processor
    from icm.training.collator import ChatCollator, render_segments
    from icm.training.datasets import load_examples

    processor, _ = load_processor(str(tiny_models["llava"]))
    collator = ChatCollator(processor)
    ex = load_examples([synth_export / "hf"])["train"][0]
    segments = render_segments(collator.templater, ex.messages)
    replies = [m["content"][0]["text"] for m in ex.messages if m["role"] == "assistant"]
    assert [s.text.strip().removesuffix("</s>").strip() for s in segments if s.assistant] == replies
    assert "".join(s.text for s in segments) == collator.templater.apply_chat_template(ex.messages, tokenize=False)
    enc = collator.encode({"messages": ex.messages, "images": ex.images})
    tok = processor.tokenizer
    labelled_ids = [t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != -100]
    assert labelled_ids == [t for s in segments if s.assistant for t in tok(s.text, add_special_tokens=False)["input_ids"]]
    labelled = tok.decode(labelled_ids)
    assert all(r in labelled for r in replies) and labelled.count("</s>") == len(replies)
    unlabelled = tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab == -100])
    for m in ex.messages:
        if m["role"] == "user":
            assert m["content"][-1]["text"] in unlabelled
    short = ChatCollator(processor, max_length=40)
    with pytest.raises(ValueError, match="max_length"):
        short.encode({"messages": ex.messages, "images": ex.images})


def test_dry_run_counts_the_data(tiny_models, synth_export, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_models["llava"]), "data": [str(synth_export / "hf")],
                                   "output_dir": str(tmp_path / "out")}))
    result = runner.invoke(app, ["train", str(cfg), "--dry-run", "--json", "--no-conversations"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.output)
    n_train = len(json.loads((synth_export / "llava" / "llava_train.json").read_text()))
    assert rep["config"]["conversations"] is False
    assert rep["train"] == {"term": n_train, "attribute": 3 * n_train}
    assert rep["held_out_images"] == 27 - n_train
