"""The response cache and the kill-safe JSONL outputs."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest

from icm.cache import ReplyCache, prompt_hash, request_key, stage_key
from icm.data.inputs import load_samples
from icm.data.outputs import OutputStore, read_records, read_rejected, repair_jsonl
from icm.data.records import ExplanationRecord, InstructRecord, Rejected
from icm.policy import load_policy


def record(i: int) -> InstructRecord:
    return InstructRecord(
        id=f"upper_chest-{i:016x}", image=f"/img/{i}.jpg", image_sha256=f"{i:064x}", policy="icm-sexy", term="sexy",
        product="upper_chest", positive=True, explanation=ExplanationRecord(text="The image is sexy because ...", verdict=True),
    )


def test_cache_keys_by_image_stage_prompt_and_model(tmp_path):
    path = tmp_path / "c.sqlite"
    ph = prompt_hash([{"role": "user", "content": "describe"}], {"temperature": 0})
    key = stage_key("img", "explicit", ph)
    with ReplyCache(path) as c:
        assert c.get("m", key) is None
        c.put("m", key, "a woman", stage="explicit", prompt_tokens=10, completion_tokens=3)
        hit = c.get("m", key)
        assert hit is not None and hit.text == "a woman" and hit.prompt_tokens == 10 and hit.stage == "explicit"
        for model, other in (("m", stage_key("img2", "explicit", ph)), ("m", stage_key("img", "implicit", ph)), ("m2", key)):
            assert c.get(model, other) is None
        assert c.hits == 1 and c.misses == 4
    # other params, another prompt: another key; the entry survives reopening
    assert prompt_hash([{"role": "user", "content": "describe"}], {"temperature": 0.7}) != ph
    with ReplyCache(path) as c:
        assert c.get("m", key).text == "a woman"
        assert len(c) == 1 and c.stage_counts() == {"explicit": 1}


def test_cache_reads_the_files_of_the_two_caches_it_replaces(tmp_path):
    """A data-generation cache (table responses) and a judge cache (table replies without
    stage or tokens), as earlier versions wrote them, still answer: no reply is paid twice."""
    import sqlite3

    data, judge = tmp_path / "data.sqlite", tmp_path / "judge.sqlite"
    with sqlite3.connect(data) as db:
        db.execute("CREATE TABLE responses (image_sha TEXT NOT NULL, stage TEXT NOT NULL, prompt_sha TEXT NOT NULL, "
                   "model TEXT NOT NULL, response TEXT NOT NULL, prompt_tokens INTEGER NOT NULL DEFAULT 0, "
                   "completion_tokens INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, "
                   "PRIMARY KEY (image_sha, stage, prompt_sha, model))")
        db.execute("INSERT INTO responses VALUES ('img', 'qa', 'ph', 'llm', '| Q | A |', 12, 5, 1.0)")
    body = {"model": "judge-m", "messages": [{"role": "user", "content": "score"}], "temperature": 0.0}
    with sqlite3.connect(judge) as db:
        db.execute("CREATE TABLE replies (model TEXT NOT NULL, key TEXT NOT NULL, reply TEXT NOT NULL, "
                   "created REAL NOT NULL, PRIMARY KEY (model, key))")
        db.execute("INSERT INTO replies VALUES ('judge-m', ?, '{\"accuracy\": 80}', 1.0)", (request_key(body),))
    with ReplyCache(data) as c:
        hit = c.get("llm", stage_key("img", "qa", "ph"))
        assert hit is not None and hit.text == "| Q | A |" and (hit.prompt_tokens, hit.completion_tokens) == (12, 5)
        assert c.stage_counts() == {"qa": 1}
    with ReplyCache(data) as c:  # migrated once
        assert len(c) == 1
    with ReplyCache(judge) as c:
        assert c.get("judge-m", request_key(body)).text == '{"accuracy": 80}'
        c.put("judge-m", "k2", "{}", stage="judge", prompt_tokens=3)
        assert c.stage_counts() == {"": 1, "judge": 1}


def _write_and_die(path: str, conn) -> None:  # runs in a child process
    with ReplyCache(path) as c:
        for i in range(50):
            c.put("m", stage_key(f"img{i}", "combined", "p"), f"text {i}", stage="combined")
        conn.send("written")
        os.kill(os.getpid(), signal.SIGKILL)


def test_cache_entries_survive_a_sigkill(tmp_path):
    path = str(tmp_path / "c.sqlite")
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_write_and_die, args=(path, child))
    p.start()
    assert parent.recv() == "written"
    p.join(10)
    assert p.exitcode == -signal.SIGKILL
    with ReplyCache(path) as c:
        assert len(c) == 50 and c.get("m", stage_key("img49", "combined", "p")).text == "text 49"


def test_repair_cuts_only_a_half_written_last_line(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    assert repair_jsonl(f) == len('{"a": 3, "b"')
    assert f.read_text() == '{"a": 1}\n{"a": 2}\n'
    assert repair_jsonl(f) == 0
    f.write_text('{"a": 1')
    assert repair_jsonl(f) == 7 and f.read_text() == ""
    assert repair_jsonl(tmp_path / "missing.jsonl") == 0


def test_store_writes_each_record_and_rejection_once_across_reopenings(tmp_path):
    with OutputStore(tmp_path) as s:
        assert s.write_record(record(1)) and not s.write_record(record(1))
        row = Rejected(key="upper_chest-2:qa:4", id="upper_chest-2", image="x", stage="qa", reason="no_answer", item=False)
        assert s.write_rejected(row) and not s.write_rejected(row)
        s.write_rejected(Rejected(key="upper_chest-3:combined", id="upper_chest-3", image="y", stage="combined", reason="refusal"))
    with open(tmp_path / "records.jsonl", "a") as fh:
        fh.write(record(2).model_dump_json()[:40])  # killed mid-write
    with OutputStore(tmp_path) as s:
        assert s.repaired_bytes == 40
        assert s.is_done(record(1).id) and s.is_done("upper_chest-3") and not s.is_done("upper_chest-2")
        assert not s.write_rejected(Rejected(key="upper_chest-2:qa:4", id="upper_chest-2", image="x", stage="qa", reason="no_answer", item=False))
        assert s.write_record(record(2))
    assert [r.id for r in read_records(tmp_path)] == [record(1).id, record(2).id]
    assert len(read_rejected(tmp_path)) == 2
    with OutputStore(tmp_path, retry_rejected=True) as s:  # whole-item rejections forgotten, rows kept
        assert not s.is_done("upper_chest-3")
    assert [r.key for r in read_rejected(tmp_path)] == ["upper_chest-2:qa:4"]


def test_store_refuses_a_corrupt_file_in_the_middle(tmp_path):
    (tmp_path / "records.jsonl").write_text("not json\n" + record(1).model_dump_json() + "\n")
    with pytest.raises(ValueError, match=r"records\.jsonl:1"):
        OutputStore(tmp_path)


def test_inputs_csv_jsonl_and_folders(tmp_path):
    from PIL import Image

    policy = load_policy("icm-sexy")
    for name in ("upper_bust", "whole_normal", "not_a_product"):
        (tmp_path / "f" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "f" / name / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    (tmp_path / "f" / "stray.png").write_bytes((tmp_path / "loose.png").read_bytes())
    (tmp_path / "l.csv").write_text("Image,Category\nloose.png,bite_finger\nmissing.png,upper_bust\nloose.png,martian\n")
    (tmp_path / "l.jsonl").write_text('{"image": "loose.png", "product": "kiss"}\nnot json\n')
    (tmp_path / "l.json").write_text('[{"path": "loose.png", "label": "wet"}]')
    inputs = [str(tmp_path / "f"), str(tmp_path / "l.csv"), str(tmp_path / "l.jsonl"), str(tmp_path / "l.json"), "nope"]
    samples, errors = load_samples(inputs, policy)
    assert [(s.product.id, s.path.name) for s in samples] == [
        ("upper_chest", "a.png"), ("whole_normal", "a.png"), ("finger_in_mouth", "loose.png"), ("kiss", "loose.png"),
        ("wet_clothes", "loose.png")]
    msgs = [e.error for e in errors]
    assert len(errors) == 6
    assert any("not_a_product" in m for m in msgs) and any("directly in the input folder" in m for m in msgs)
    assert any("no such image file" in m for m in msgs) and any("martian" in m for m in msgs)
    assert any("not a JSON object" in m for m in msgs) and any("no such file or folder" in m for m in msgs)
    assert any(e.origin.endswith("l.csv:3") for e in errors)
