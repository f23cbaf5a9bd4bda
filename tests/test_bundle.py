"""Bundles (issue 18): every member policy on each image, one record per (image, policy).

A bundle's records must be the records each member policy gives alone: on the detector
(which asks member by member), on the hf backend (one merged ask: every policy's questions
scored from each image's one prefix cache) and on the openai backend (every policy's
questions in one concurrent pass). Synthetic drawings and the safe sample photos only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation import BundleModerator, Moderator, moderate, moderate_bundle, overview, overviews
from icm.moderation.backends.base import Answer, Backend, Choice, Failed, Query, YesNoScore
from icm.moderation.bundle import parse_bundle_ref
from icm.moderation.job import read_records
from icm.moderation.record import ModerationRecord, TermScore
from icm.policy.bundle import load_bundle

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "examples" / "images").glob("*.jpg"))
MEMBERS = ["icm-sexy", "gambling", "horrifying"]  # all three have a rule set named "children"


@pytest.fixture()
def bundle_file(tmp_path: Path) -> Path:
    path = tmp_path / "trio.yaml"
    path.write_text("name: trio\ndescription: three policies\npolicies: [icm-sexy, gambling, horrifying]\n")
    return path


def drawing(path: Path, seed: int) -> Path:
    """A synthetic drawing: a coloured disc and a bar on a plain background."""
    im = Image.new("RGB", (96, 72), ((40 * seed) % 256, 200, 120))
    d = ImageDraw.Draw(im)
    d.ellipse((10 + seed, 10, 50 + seed, 50), fill=(200, 30 + 20 * seed, 60))
    d.rectangle((60, 20, 90, 30), fill=(20, 20, 200))
    im.save(path)
    return path


def animated(path: Path) -> Path:
    """A two-frame GIF: two views of one file."""
    frames = [Image.new("RGB", (40, 40), c) for c in ((220, 30, 30), (30, 30, 220))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def core(r: ModerationRecord) -> dict[str, Any]:
    """What a record decides (not its timings)."""
    return {
        "path": r.path, "policy": r.policy, "policy_digest": r.policy_digest, "rules": r.rules, "verdict": r.verdict,
        "product": r.product, "basis": r.basis, "frame": r.frame, "error": r.error, "unanswered": r.unanswered,
        "flagged_categories": r.flagged_categories,
    }


def assert_same(a: ModerationRecord, b: ModerationRecord, tol: float = 1e-5) -> None:
    assert core(a) == core(b)
    assert (a.term.p_yes if a.term else None) == pytest.approx(b.term.p_yes if b.term else None, abs=tol)
    assert a.attributes.keys() == b.attributes.keys()
    for k in a.attributes:
        assert a.attributes[k] == pytest.approx(b.attributes[k], abs=tol)
    assert a.p_violation == pytest.approx(b.p_violation, abs=tol)
    assert a.category_scores.keys() == b.category_scores.keys()
    for k in a.category_scores:
        assert a.category_scores[k] == pytest.approx(b.category_scores[k], abs=tol)


def alone(backend: Backend, paths: Sequence[str], rules: str | None = "children") -> list[list[ModerationRecord]]:
    """Per member policy, its records when it runs by itself."""
    return [Moderator(backend, policy=p, rules=rules).moderate_paths(list(paths)) for p in MEMBERS]


# --------------------------------------------------------------------------- bundles by name


def test_bundle_refs(bundle_file: Path) -> None:
    assert parse_bundle_ref("icm-sexy") is None and parse_bundle_ref("icm-sexy:children") is None
    b, rules = parse_bundle_ref(f"{bundle_file}:children") or (None, None)
    assert b is not None and b.policies == MEMBERS and rules == "children"
    assert parse_bundle_ref(f"{bundle_file}:children", "teen") == (b, "teen")  # an explicit rule set wins
    std = load_bundle("icm-standard")
    assert std is not None and parse_bundle_ref("icm-standard:teen") == (std, "teen")


def test_a_member_without_the_rule_set_is_named(bundle_file: Path) -> None:
    with pytest.raises(KeyError, match=r"licensed-market.*missing in icm-sexy"):
        BundleModerator(_Scripted(), bundle=str(bundle_file), rules="licensed-market")


# --------------------------------------------------------------------------- a scripted backend


class _Scripted(Backend):
    """Answers from the question text; records every ask (its query keys)."""

    name = "scripted"
    merges_policies = True
    capabilities = frozenset({"score_yes_no", "choose"})

    def __init__(self, *, fail_merged: bool = False, fail_key: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_merged = fail_merged
        self.fail_key = fail_key

    def ask(self, images: Sequence[Image.Image], queries: Sequence[Query]) -> list[dict[str, Answer]]:
        self.calls.append([q.key for q in queries])
        if self.fail_merged and any("|" in q.key for q in queries):
            raise RuntimeError("merged ask broke")
        out: list[dict[str, Answer]] = []
        for im in images:
            red = im.getpixel((0, 0))[0] / 255  # type: ignore[index]
            slot: dict[str, Answer] = {}
            for q in queries:
                if self.fail_key is not None and q.key.endswith(self.fail_key):
                    slot[q.key] = Failed("HTTP 503 (scripted)")
                elif q.kind == "yes_no":
                    slot[q.key] = YesNoScore(min(0.99, max(0.01, red * (len(q.question) % 7) / 6)))
                else:
                    n = len(q.options)
                    w = [1.0 + ((len(q.question) + i) % 3) * red for i in range(n)]
                    slot[q.key] = Choice([x / sum(w) for x in w])
            out.append(slot)
        return out


def test_a_merging_backend_is_asked_once_for_all_members(tmp_path: Path, bundle_file: Path) -> None:
    paths = [str(drawing(tmp_path / f"d{i}.png", i)) for i in range(3)] + [str(animated(tmp_path / "a.gif"))]
    be = _Scripted()
    mod = BundleModerator(be, bundle=str(bundle_file), rules="children")
    got = mod.moderate_paths(paths)
    assert len(be.calls) == 1  # one ask: every member's queries, every view of every image
    assert len(be.calls[0]) == sum(len(m.queries) for m in mod.members) == 12
    assert len(set(be.calls[0])) == 12  # the keys are made unique per member
    ref = alone(_Scripted(), paths)
    assert len(got) == len(paths)
    for i, per_image in enumerate(got):
        assert [r.policy for r in per_image] == MEMBERS
        for j, r in enumerate(per_image):
            assert_same(r, ref[j][i])
    assert got[-1][0].frame_count == 2 and got[-1][0].frame_scores  # the GIF's two views were judged
    for per_image in got:  # the model time is split among the members, not charged to each
        assert all(r.timings.model_ms >= 0 for r in per_image)


def test_a_failing_merged_ask_falls_back_to_each_policy(tmp_path: Path, bundle_file: Path) -> None:
    paths = [str(drawing(tmp_path / f"d{i}.png", i)) for i in range(2)]
    be = _Scripted(fail_merged=True)
    got = BundleModerator(be, bundle=str(bundle_file), rules="children").moderate_paths(paths)
    assert len(be.calls) == 1 + len(MEMBERS)  # the merged ask, then one per member
    ref = alone(_Scripted(), paths)
    for i, per_image in enumerate(got):
        for j, r in enumerate(per_image):
            assert r.ok
            assert_same(r, ref[j][i])


def test_a_failed_query_is_an_error_of_its_member_only(tmp_path: Path, bundle_file: Path) -> None:
    paths = [str(drawing(tmp_path / "d.png", 1))]
    be = _Scripted(fail_key="attr:promotion")  # a gambling attribute
    (records,) = BundleModerator(be, bundle=str(bundle_file), rules="children").moderate_paths(paths)
    assert {r.policy: r.ok for r in records} == {"icm-sexy": True, "gambling": False, "horrifying": True}
    assert "HTTP 503" in (records[1].error or "")
    o = overview(records)
    assert o.verdict is None and not o.ok and set(o.errors) == {"gambling"}


def test_unreadable_files_are_an_error_record_per_member(tmp_path: Path, bundle_file: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    (records,) = BundleModerator(_Scripted(), bundle=str(bundle_file)).moderate_paths([str(bad)])
    assert [r.policy for r in records] == MEMBERS and not any(r.ok for r in records)
    assert [r.rules for r in records] == ["icm-default", "gambling-default", "horrifying-default"]  # each default


# --------------------------------------------------------------------------- overview


def _rec(policy: str, verdict: str, scores: dict[str, dict[str, float]], flagged: dict[str, list[str]]) -> ModerationRecord:
    return ModerationRecord(
        path="x.png", policy=policy, rules="r", backend="b", model="m", verdict=verdict,  # type: ignore[arg-type]
        term=TermScore(term="t", question="q", p_yes=0.5), category_scores=scores, flagged_categories=flagged,
    )


def test_overview_takes_the_worst_verdict_and_merges_categories() -> None:
    a = _rec("sexual", "allow", {"openai": {"sexual": 0.1, "sexual/minors": 0.0}}, {"openai": []})
    b = _rec("violence", "block", {"openai": {"violence": 0.9, "violence/graphic": 0.4}, "llavaguard": {"O2": 0.9}},
             {"openai": ["violence/graphic", "violence"], "llavaguard": ["O2"]})
    c = _rec("gore", "review", {"openai": {"violence": 0.5, "violence/graphic": 0.6}}, {"openai": ["violence/graphic"]})
    o = overview([a, b, c])
    assert o.verdict == "block" and o.ok
    assert o.verdicts == {"sexual": "allow", "violence": "block", "gore": "review"}
    assert o.category_scores["openai"] == {"sexual": 0.1, "sexual/minors": 0.0, "violence": 0.9, "violence/graphic": 0.6}
    assert o.flagged_categories == {"openai": ["violence", "violence/graphic"], "llavaguard": ["O2"]}  # scheme order
    assert overview([a, c]).verdict == "review"
    assert [x.path for x in overviews([a, b, c])] == ["x.png"]


# --------------------------------------------------------------------------- the detector


@pytest.fixture(scope="module")
def detector() -> Any:
    from icm.moderation.backends.detector import DetectorBackend

    be = DetectorBackend()
    yield be
    be.close()


def test_detector_bundle_asks_once_and_matches_each_policy(detector: Any, tmp_path: Path, bundle_file: Path) -> None:
    assert detector.merges_policies  # one ask for every member; each judged from its own policy (issue 23)
    paths = [str(p) for p in PHOTOS] + [str(drawing(tmp_path / "d.png", 2))]
    ref = alone(detector, paths)
    got = BundleModerator(detector, bundle=str(bundle_file), rules="children").moderate_paths(paths)
    for i, per_image in enumerate(got):
        assert [r.policy for r in per_image] == MEMBERS
        for j, r in enumerate(per_image):
            assert r.ok, r.error
            assert_same(r, ref[j][i])
    # the library: moderate() with a bundle name gives the flat list, per image in member order
    flat = moderate(paths[:2], policy=f"{bundle_file}:children", backend=detector)
    assert [(Path(r.path).name, r.policy) for r in flat] == [(Path(p).name, m) for p in paths[:2] for m in MEMBERS]
    assert [core(r) for r in flat] == [core(r) for per in got[:2] for r in per]
    assert len(moderate_bundle(paths[:1], bundle=bundle_file, backend=detector)) == 3


def test_cli_writes_a_line_per_image_and_policy_and_resumes(tmp_path: Path, bundle_file: Path) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        drawing(imgs / f"d{i}.png", i)
    out = tmp_path / "out.jsonl"
    args = ["moderate", str(imgs), "--policy", f"{bundle_file}:children", "--out", str(out), "--allow-unjudged"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records, bad = read_records(out)
    assert bad == 0 and len(records) == 6
    assert sorted((Path(r.path).name, r.policy) for r in records) == sorted(
        (f"d{i}.png", m) for i in range(2) for m in MEMBERS
    )
    assert all(r.rules == "children" for r in records)
    worst = {o.path: o.verdict for o in overviews(records)}
    assert "bundle trio (3 policies), rules children" in result.output
    for v in set(worst.values()):
        assert f"{v}: " in result.output  # images counted by worst verdict
    # --resume: every (image, policy) is done, nothing runs again, the file keeps its six lines
    before = out.read_text()
    result = CliRunner().invoke(app, [*args, "--resume", "--json"])
    assert result.exit_code == 0, result.output
    assert out.read_text() == before
    printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 6
    # one member's record missing: that image runs again (all its members), the other is skipped
    def dropped(line: str) -> bool:
        r = json.loads(line)
        return Path(r["path"]).name == "d1.png" and r["policy"] == "gambling"

    kept = [line for line in before.splitlines() if not dropped(line)]
    assert len(kept) == 5
    out.write_text("\n".join(kept) + "\n")
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert "skipped (already in" in result.output
    records, _ = read_records(out)
    assert len(records) == 5 + 3 and sum(Path(r.path).name == "d1.png" for r in records) == 5


def test_cli_refuses_a_bundle_on_ray(bundle_file: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["moderate", str(tmp_path), "--policy", str(bundle_file), "--engine", "ray"])
    assert result.exit_code == 2 and "local engine" in result.output


# --------------------------------------------------------------------------- hf: one image prefix for every policy


def test_hf_bundle_scores_every_policy_from_one_prefix_per_image(tiny_llava_path: Path, tmp_path: Path, bundle_file: Path) -> None:
    from icm.moderation.backends.hf import HFBackend

    backend = HFBackend(model=str(tiny_llava_path), device="cpu", dtype="float32", batch_size=8, min_label_mass=0.0)
    paths = [str(drawing(tmp_path / f"d{i}.png", i)) for i in range(3)] + [str(animated(tmp_path / "a.gif"))]
    n_views = 3 + 2
    prefix_images: list[int] = []
    suffix_calls: list[int] = []
    real_encode, real_cached = backend._encode, backend._cached_logprobs

    def encode(images: Sequence[Image.Image], texts: Sequence[str]) -> Any:
        prefix_images.extend(id(im) for im in images)
        return real_encode(images, texts)

    def cached(images: Any, items: Any, rendered: Any, plan: Any) -> Any:
        suffix_calls.append(len(items))
        return real_cached(images, items, rendered, plan)

    backend._encode = encode  # type: ignore[method-assign]
    backend._cached_logprobs = cached  # type: ignore[method-assign]

    ref = alone(backend, paths)
    assert len(prefix_images) == len(MEMBERS) * n_views  # alone: each policy encodes every view again
    assert len(suffix_calls) == len(MEMBERS)

    prefix_images.clear()
    suffix_calls.clear()
    mod = BundleModerator(backend, bundle=str(bundle_file), rules="children")
    assert mod.merges
    got = mod.moderate_paths(paths)
    assert backend.prefix_cache  # the shared-prefix path ran, not the padded fallback
    assert len(prefix_images) == len(set(prefix_images)) == n_views  # each view's prefix once, for all policies
    assert suffix_calls == [n_views * sum(len(m.queries) for m in mod.members)]  # every question, one pass
    for i, per_image in enumerate(got):
        assert [r.policy for r in per_image] == MEMBERS
        for j, r in enumerate(per_image):
            assert r.ok, r.error
            assert r.term is not None and r.term.source == "logits"
            assert_same(r, ref[j][i], tol=1e-4)
    backend.close()


# --------------------------------------------------------------------------- openai: one concurrent pass


def test_openai_bundle_sends_every_policy_in_one_concurrent_pass(tmp_path: Path, bundle_file: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from icm.moderation.backends.openai_compat import OpenAIBackend

    from fake_openai import Reply, fake_openai_server, vllm_logprobs_body

    with fake_openai_server() as (fake, url):
        fake.default = Reply(json=vllm_logprobs_body([("Yes", -0.1), ("No", -2.4)]), delay=0.5)
        backend = OpenAIBackend(model="m", base_url=url, api_key="sk-test", timeout=30.0, max_retries=0, max_concurrency=64)
        try:
            mod = BundleModerator(backend, bundle=str(bundle_file), rules="children")
            per_policy = [len(m.queries) for m in mod.members]
            paths = [str(drawing(tmp_path / f"d{i}.png", i)) for i in range(2)]
            got = mod.moderate_paths(paths)
        finally:
            backend.close()
    assert len(fake.requests) == 2 * sum(per_policy)
    assert fake.max_inflight == 2 * sum(per_policy)  # all of them in flight together
    assert fake.max_inflight > 2 * max(per_policy)  # more than one policy's worth: not policy by policy
    assert [[r.policy for r in per] for per in got] == [MEMBERS, MEMBERS]
    assert all(r.ok for per in got for r in per)


# --------------------------------------------------------------------------- icm-standard


def test_icm_standard_runs_every_taxonomy_policy_in_one_ask(tmp_path: Path) -> None:
    std = load_bundle("icm-standard")
    assert std is not None
    from icm.policy import builtin_policy_names

    assert set(std.policies) <= set(builtin_policy_names())
    be = _Scripted()
    mod = BundleModerator(be, bundle="icm-standard:teen")
    assert [m.policy.name for m in mod.members] == std.policies and {m.rule_set.name for m in mod.members} == {"teen"}
    paths = [str(drawing(tmp_path / f"d{i}.png", i)) for i in range(2)]
    got = mod.moderate_paths(paths)
    assert len(be.calls) == 1 and len(be.calls[0]) == sum(len(m.queries) for m in mod.members)
    for per_image in got:
        assert [r.policy for r in per_image] == std.policies and all(r.ok for r in per_image)
        o = overview(per_image)
        assert o.verdict is not None and "openai" in o.category_scores
        # a merged category is the largest member score
        for cat, p in o.category_scores["openai"].items():
            assert p == max(r.category_scores.get("openai", {}).get(cat, 0.0) for r in per_image)


def test_icm_standard_on_the_detector_leaves_out_what_it_cannot_judge_and_says_so(tmp_path: Path) -> None:
    """Offline, `gore` has no evidence at all: the bundle runs without it and names it (and its
    categories) instead of refusing the whole run; --allow-unjudged keeps it (review)."""
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["moderate", str(PHOTOS[0]), "--policy", "icm-standard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "left out of the bundle" in result.output and "'gore'" in result.output and "violence/graphic" in result.output
    records, _ = read_records(out)
    std = load_bundle("icm-standard")
    assert std is not None
    assert [r.policy for r in records] == [p for p in std.policies if p != "gore"]
    assert all(r.ok for r in records)
    by = {r.policy: r for r in records}
    assert by["sexual"].verdict == "allow" and by["sexual"].flagged_categories["openai"] == []
    out2 = tmp_path / "out2.jsonl"
    result = CliRunner().invoke(app, ["moderate", str(PHOTOS[0]), "--policy", "icm-standard", "--out", str(out2), "--allow-unjudged"])
    assert result.exit_code == 0, result.output
    records, _ = read_records(out2)
    assert "gore" in {r.policy for r in records} and next(r for r in records if r.policy == "gore").verdict == "review"


def test_icm_standard_summary_names_every_source_that_ran(tmp_path: Path) -> None:
    """On the detector each member policy runs its own sources (each record names them); the run's summary line
    names them all, in member order, not only the first member's."""
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["moderate", *map(str, PHOTOS), "--policy", "icm-standard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records, _ = read_records(out)
    ran = dict.fromkeys(s for r in records for s in str(r.model).split("+"))
    if len(ran) == len(str(records[0].model).split("+")):
        pytest.skip(f"every member ran the first one's sources here ({records[0].model}): nothing to tell apart")
    text = " ".join(result.output.split())
    assert f"backend detector ({'+'.join(ran)})" in text, text[-400:]
