"""Exports a trainer accepts (LLaVA, ShareGPT + dataset_info.json, Qwen-VL, HF datasets,
parquet), the split by image, the instruction pools, and `icm data mix`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from icm.data import InstructionPools, build_samples, export_records, mix_datasets, split_of
from icm.data.mix import parse_ratio
from icm.data.records import DescriptionRecord, ExplanationRecord, InstructRecord, QAPair


def make_records(tmp_path: Path, n: int = 30) -> list[InstructRecord]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    out = []
    for i in range(n):
        img = images / f"{i % 20:02d}.png"  # ten images appear twice, under two products
        if not img.exists():
            Image.new("RGB", (16, 12), (i * 9 % 256, 40, 90)).save(img)
        positive = i % 3 != 0
        product = "upper_chest" if positive else "upper_normal"
        if i >= 20:
            product = "kiss" if positive else "whole_normal"
        flags = ["contradiction"] if i == 7 else []
        out.append(InstructRecord(
            id=f"{product}-{i:016x}", image=str(img), image_sha256=f"{i % 20:064x}", policy="icm-sexy", term="sexy",
            product=product, positive=positive,
            explicit=DescriptionRecord(kind="explicit", text=f"A woman in a red coat, image {i}."),
            implicit=DescriptionRecord(kind="implicit", text="A calm, casual mood."),
            explanation=ExplanationRecord(text=f"The image is {'' if positive else 'not '}sexy because of reason {i}.",
                                          verdict=positive, expected=positive, flags=flags),
            qa=[
                QAPair(kind="yes_no", question="Is she smiling?", answer="Yes"),
                QAPair(kind="choice", question="What is she wearing?", answer="B", choices=["A hat", "A coat", "A dress", "Jeans"], answer_index=1),
                QAPair(kind="what", question="What is behind her?", answer="A brick wall."),
            ],
        ))
    return out


def test_split_is_deterministic_and_by_image(tmp_path):
    recs = make_records(tmp_path)
    splits = [split_of(r, 0.3, seed=1) for r in recs]
    assert splits == [split_of(r, 0.3, seed=1) for r in recs]
    by_image: dict[str, set[str]] = {}
    for r, s in zip(recs, splits, strict=True):
        by_image.setdefault(r.split_key, set()).add(s)
    assert all(len(v) == 1 for v in by_image.values()), "an image landed in both splits"
    assert set(splits) == {"train", "validation"}
    assert {split_of(r, 0.0) for r in recs} == {"train"}
    # the share over many images is close to the asked ratio
    many = [InstructRecord(id=str(i), image=f"{i}.jpg", policy="p", term="t", product="x", positive=True) for i in range(4000)]
    share = sum(split_of(r, 0.1) == "validation" for r in many) / len(many)
    assert 0.08 < share < 0.12


def test_instruction_pools_vary_are_deterministic_and_extend_from_a_file(tmp_path):
    recs = make_records(tmp_path)
    a = build_samples(recs, val_ratio=0)
    b = build_samples(recs, val_ratio=0)
    assert [s.turns for s in a] == [s.turns for s in b]
    explain = {q for s in a for q, ans in s.turns if ans == s.record.explanation.text}
    assert len(explain) >= 4, explain  # several paraphrases in use
    assert all("sexy" in e for e in explain) and not any("{" in e for e in explain)
    other = build_samples(recs, val_ratio=0, pools=InstructionPools(seed=5))
    assert [s.turns for s in other] != [s.turns for s in a]
    f = tmp_path / "pools.yaml"
    f.write_text("explain:\n  - 'Tell me why this is or is not {term}.'\nterms:\n  sexy:\n    term: ['Is it racy?']\n")
    pools = InstructionPools.from_file(f)
    assert "Tell me why this is or is not {term}." in pools.pool("explain")
    assert "Is it racy?" in pools.pool("term", "sexy") and "Is it racy?" not in pools.pool("term", "gambling")
    replaced = InstructionPools.from_file(f, replace=True)
    assert replaced.pool("explain") == ["Tell me why this is or is not {term}."]


def test_turns_follow_the_records(tmp_path):
    recs = make_records(tmp_path)
    samples = {s.id: s for s in build_samples(recs, val_ratio=0)}
    s = samples[recs[1].id]
    (q0, a0), (_q1, a1), (_q2, a2), (_q3, a3), (q4, a4), (q5, a5), (_q6, a6) = s.turns
    assert "sexy" in q0.lower() and a0 == "Yes"
    assert a1 == recs[1].explanation.text
    assert a2 == recs[1].explicit.text and a3 == recs[1].implicit.text
    assert q4.startswith("Is she smiling?\n") and a4 == "Yes"
    assert q5.startswith("What is she wearing?\nA. A hat\nB. A coat\nC. A dress\nD. Jeans\n") and a5 == "B"
    assert a6 == "A brick wall."
    # a flagged explanation (a contradiction) is not trained on, unless asked
    assert recs[7].explanation.text not in [a for _, a in samples[recs[7].id].turns]
    kept = {x.id: x for x in build_samples(recs, val_ratio=0, exclude_flags=())}
    assert recs[7].explanation.text in [a for _, a in kept[recs[7].id].turns]
    single = build_samples(recs[:2], val_ratio=0, conversation="single", tasks=["term", "qa"])
    assert [len(x.turns) for x in single] == [1] * 8 and single[0].id.endswith("-0")


def _check_llava(items: list[dict], image_root: Path) -> None:
    for it in items:
        assert set(it) == {"id", "image", "conversations"}
        assert (image_root / it["image"]).is_file()
        conv = it["conversations"]
        assert len(conv) % 2 == 0 and conv
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in conv) == 1
        assert all(isinstance(t["value"], str) and t["value"] for t in conv)


def test_llava_sharegpt_and_qwen_vl_files(tmp_path):
    recs = make_records(tmp_path)
    root = tmp_path / "images"
    res = export_records(recs, "llava", tmp_path / "llava", val_ratio=0.3, image_root=str(root))
    train = json.loads((tmp_path / "llava" / "llava_train.json").read_text())
    val = json.loads((tmp_path / "llava" / "llava_validation.json").read_text())
    _check_llava(train + val, root)
    assert len(train) + len(val) == len(recs) and res.samples == {"train": len(train), "validation": len(val)}
    assert all(not Path(x["image"]).is_absolute() for x in train)

    export_records(recs, "sharegpt", tmp_path / "sg", val_ratio=0.3)
    info = json.loads((tmp_path / "sg" / "dataset_info.json").read_text())
    assert set(info) == {"icm_train", "icm_validation"}
    for entry in info.values():
        assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "messages", "images": "images"}
        assert entry["tags"] == {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
        data = json.loads((tmp_path / "sg" / entry["file_name"]).read_text())
        for ex in data:
            roles = [m["role"] for m in ex["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2)
            # LLaMA-Factory checks that <image> tokens and images match in number
            assert sum(m["content"].count("<image>") for m in ex["messages"]) == len(ex["images"]) == 1
            assert Path(ex["images"][0]).is_file()

    export_records(recs, "qwen-vl", tmp_path / "qw", val_ratio=0)
    data = json.loads((tmp_path / "qw" / "qwen_vl_train.json").read_text())
    assert not (tmp_path / "qw" / "qwen_vl_validation.json").exists()
    for ex in data:
        conv = ex["conversations"]
        assert [t["from"] for t in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert conv[0]["value"].startswith(f"Picture 1: <img>{recs[0].image[:0]}") and "</img>\n" in conv[0]["value"]
        img = conv[0]["value"].split("<img>", 1)[1].split("</img>", 1)[0]
        assert Path(img).is_file()


def test_hf_datasets_load_back_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the hf export needs the train extra (datasets)")
    recs = make_records(tmp_path)
    export_records(recs, "hf", tmp_path / "hf", val_ratio=0.3, seed=3)
    dd = datasets.load_from_disk(str(tmp_path / "hf"))
    assert set(dd) == {"train", "validation"} and dd["train"].num_rows + dd["validation"].num_rows == len(recs)
    row = dd["train"][0]
    assert row["messages"][0]["role"] == "user"
    assert row["messages"][0]["content"][0] == {"type": "image", "text": None, "index": 0}
    assert row["messages"][1]["content"][0]["type"] == "text" and Path(row["images"][0]).is_file()
    ids = set(dd["train"]["id"]) | set(dd["validation"]["id"])
    assert ids == {r.id for r in recs}
    export_records(recs, "parquet", tmp_path / "pq", val_ratio=0.3, seed=3)
    pq = datasets.load_dataset("parquet", data_files={s: str(tmp_path / "pq" / f"{s}.parquet") for s in ("train", "validation")})
    assert pq["train"].num_rows == dd["train"].num_rows and pq["train"]["id"] == dd["train"]["id"]
    export_records(recs[:3], "hf", tmp_path / "emb", val_ratio=0, embed_images=True)
    emb = datasets.load_from_disk(str(tmp_path / "emb"))["train"]
    assert isinstance(emb.features["images"].feature, datasets.Image)
    assert emb[0]["images"][0].size == (16, 12)


def test_export_cli(tmp_path):
    recs = make_records(tmp_path, n=6)
    src = tmp_path / "run"
    src.mkdir()
    (src / "records.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in recs))
    done = subprocess.run(
        [sys.executable, "-m", "icm.cli.main", "data", "export", str(src), "-f", "llava", "-o", str(tmp_path / "x"),
         "--val-ratio", "0", "--tasks", "term,qa", "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout)
    assert res["samples"] == {"train": 6} and res["turns"] == 6 * 4
    bad = subprocess.run([sys.executable, "-m", "icm.cli.main", "data", "export", str(src), "-f", "webdataset", "-o",
                          str(tmp_path / "y")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown format" in bad.stderr


def test_mix_at_a_ratio_converting_layouts(tmp_path):
    recs = make_records(tmp_path, n=20)
    export_records(recs, "llava", tmp_path / "ours", val_ratio=0)
    ours = tmp_path / "ours" / "llava_train.json"
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({
        "messages": [{"role": "user", "content": f"<image>Describe picture {i}."}, {"role": "assistant", "content": "A cat."}],
        "images": [f"coco/{i}.jpg"], "id": str(i),
    }) + "\n" for i in range(100)))
    res = mix_datasets(ours, general, tmp_path / "mix.json", ratio="1:3", seed=7)
    mixed = json.loads((tmp_path / "mix.json").read_text())
    assert res.ours == 20 and res.general == 60 and res.total == len(mixed) == 80 and res.layout == "llava"
    assert all("conversations" in m for m in mixed)
    general_items = [m for m in mixed if m["image"].startswith("coco/")]
    assert len(general_items) == 60
    assert all(m["conversations"][0]["value"].startswith("<image>\n") for m in general_items)
    assert Counter(m["conversations"][0]["from"] for m in mixed) == Counter({"human": 80})
    again = mix_datasets(ours, general, tmp_path / "mix2.json", ratio="1:3", seed=7)
    assert json.loads((tmp_path / "mix2.json").read_text()) == mixed and again.total == 80
    small = mix_datasets(ours, general, tmp_path / "mix3.json", ratio=0.1)  # ours is 10%: 180 wanted, 100 there
    assert small.general == 100 and small.general_available == 100
    assert parse_ratio("1:1") == 1.0 and parse_ratio(0.25) == 3.0 and parse_ratio("2:1") == 0.5
    for bad in ("0:1", "a:b", "1.5", 0):
        with pytest.raises(ValueError):
            parse_ratio(bad)
