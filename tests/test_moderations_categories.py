"""`POST /v1/moderations`'s 13 openai categories: bundles, what the backend cannot judge,
a VLM backend, and the official SDKs (Python, and npm `openai` run with node) reading them.

The servers run for real on loopback (tests/serve_helpers.py's `live_server`). The
policies here are copies of the built-in gambling policy with a taxonomy of their own, so
the tests do not depend on how the built-in taxonomy policies map their products.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import yaml
from fastapi import Request

from icm.moderation.engine import Moderator
from icm.moderation.evidence.plan import Coverage
from icm.policy import load_policy
from icm.serve import ServeConfig, create_app
from icm.serve.config import OPENAI_MODEL_NAMES

from fake_openai import MODEL, FakeOpenAIServer, fake_openai_server, vllm_logprobs_body
from serve_helpers import ColourBackend, live_server, png

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
NODE_CLIENT = Path(__file__).resolve().parent / "openai_node_client.cjs"
KEY = "alice:" + "s3cret-key-for-tests-0123"
TOKEN = KEY.split(":", 1)[1]
GAMBLING = ["casino_table", "slot_machine", "sports_betting", "lottery", "online_gambling"]


def data_url(data: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64," + base64.b64encode(data).decode()


def part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=TOKEN, max_retries=0)


def gambling_copy(folder: Path, name: str, taxonomy: list[dict]) -> Path:
    """The built-in gambling policy named ``name``, with ``taxonomy`` as its category map."""
    data = yaml.safe_load(load_policy("gambling").model_dump_json(exclude_none=True))
    data["name"] = name
    data["taxonomy"] = taxonomy
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A bundle of icm-sexy (openai `sexual`) and two gambling copies that both feed `illicit`."""
    casino = gambling_copy(tmp_path, "test-casino", [
        {"scheme": "openai", "category": "illicit", "when": {"activity": GAMBLING}},
        {"scheme": "openai", "category": "illicit/violent", "when": {"activity": ["casino_table"]}},
    ])
    lottery = gambling_copy(tmp_path, "test-lottery", [{"scheme": "openai", "category": "illicit", "when": {"activity": ["lottery"]}}])
    path = tmp_path / "test-standard.yaml"
    path.write_text(yaml.safe_dump({
        "name": "test-standard", "default_rules": "children", "policies": ["icm-sexy", str(casino), str(lottery)],
    }), encoding="utf-8")
    return path


def make_app(tmp_path: Path, moderator: Moderator | None = None, **kw):
    kw.setdefault("db", str(tmp_path / "d.sqlite"))
    return create_app(ServeConfig(api_keys=[KEY], **kw), moderator=moderator)


class BlindBackend(ColourBackend):
    """ColourBackend with the offline detector's ``coverage``: it cannot judge the policies
    named in ``blind`` (nothing of them reaches 'clear')."""

    name = "blind"

    def __init__(self, blind: set[str]) -> None:
        super().__init__()
        self.blind = blind

    def coverage(self, policy):
        reach = "none" if policy.name in self.blind else "clear"
        return {t: Coverage(t, reach, [] if reach == "none" else ["colour"]) for t in ["term", *(a.id for a in policy.attributes)]}


def test_openai_model_names_are_the_icm_standard_bundle():
    aliases = ServeConfig().model_aliases
    assert set(OPENAI_MODEL_NAMES) <= set(aliases) and "text-moderation-stable" in aliases
    assert {aliases[n] for n in OPENAI_MODEL_NAMES} == {"icm-standard"}


def test_a_bundle_alias_merges_its_policies_categories(tmp_path, monkeypatch, bundle):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    app = make_app(tmp_path, Moderator(ColourBackend(), policy="icm-sexy"),
                   model_aliases={"omni-moderation-latest": str(bundle), "text-moderation-stable": str(bundle)})
    with live_server(app) as base:
        sdk = client(base)
        red, blue = data_url(png((255, 0, 0))), data_url(png((0, 0, 255)))
        resp = sdk.moderations.create(model="omni-moderation-latest", input=[red, blue])
        # the server's rule set (icm-default) is not in every member: the bundle's default
        assert resp.model == "test-standard:children"
        flagged, clean = resp.results
        assert flagged.flagged and flagged.categories.sexual is True and flagged.categories.illicit is True
        assert flagged.categories.illicit_violent is True and flagged.categories.violence is False
        for cat in ("sexual", "illicit", "illicit_violent"):
            assert getattr(flagged.category_applied_input_types, cat) == ["image"]
        for cat in ("violence", "violence_graphic", "self_harm", "harassment", "sexual_minors"):
            assert getattr(flagged.category_applied_input_types, cat) == []
            assert getattr(flagged.category_scores, cat) == 0.0
        # `illicit` is fed by two policies: its score is the largest of their records'
        records = [d["record"] for d in flagged.model_extra["icm"]["decisions"]]
        assert {r["policy"] for r in records} == {"icm-sexy", "test-casino", "test-lottery"}
        illicit = [r["category_scores"]["openai"]["illicit"] for r in records if r["policy"] != "icm-sexy"]
        assert flagged.category_scores.illicit == pytest.approx(max(illicit))
        assert not clean.flagged and clean.category_applied_input_types.illicit == ["image"]
        assert clean.model_extra["icm"]["not_judged"] == {}
        # the bundle by its name, with a rule set every member has; text-moderation-stable is an alias too
        assert sdk.moderations.create(model="test-standard:children", input=blue).model == "test-standard:children"
        assert sdk.moderations.create(model="text-moderation-stable", input=blue).model == "test-standard:children"
        with pytest.raises(openai.BadRequestError, match="rule set 'icm-default' is missing in test-casino") as missing:
            sdk.moderations.create(model="test-standard:icm-default", input=blue)
        assert missing.value.param == "model"


def test_a_bundle_that_cannot_load_is_a_400_naming_why(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"name": "broken", "policies": ["icm-sexy", "no-such-policy"]}), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="icm.serve"):
        app = make_app(tmp_path, Moderator(ColourBackend(), policy="icm-sexy"), model_aliases={"omni-moderation-latest": str(broken)})
    assert "bundle 'broken' cannot load" in caplog.text
    with live_server(app) as base:
        with pytest.raises(openai.BadRequestError, match="no built-in policy 'no-such-policy'") as info:
            client(base).moderations.create(model="omni-moderation-latest", input=data_url(png((0, 0, 255))))
        assert info.value.code == "model_unavailable"
        # no model: the server's default policy, as before
        assert client(base).moderations.create(input=data_url(png((0, 0, 255)))).model == "icm-sexy:icm-default"


@pytest.mark.parametrize("unjudged", ["pass", "flag"])
def test_categories_the_backend_cannot_judge(tmp_path, monkeypatch, caplog, bundle, unjudged):
    """A policy the backend cannot judge here leaves its categories' applied input types
    empty, says why in `icm` and in the start-up log; --unjudged flag fails closed."""
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    backend = BlindBackend({"test-casino"})
    with caplog.at_level(logging.WARNING, logger="icm.serve"):
        app = make_app(tmp_path, Moderator(backend, policy="icm-sexy"), model_aliases={"omni-moderation-latest": str(bundle)},
                       unjudged=unjudged)
    logged = [r.getMessage() for r in caplog.records if "test-casino" in r.getMessage()]
    assert logged and "illicit, illicit/violent are not judged" in logged[0]
    with live_server(app) as base:
        sdk = client(base)
        (r,) = sdk.moderations.create(model="omni-moderation-latest", input=[part(data_url(png((0, 0, 255))))]).results
        # illicit is also fed by test-lottery, which is judged; illicit/violent only by test-casino
        assert r.category_applied_input_types.illicit == ["image"]
        assert r.category_applied_input_types.illicit_violent == []
        assert r.category_applied_input_types.sexual == ["image"]
        why = r.model_extra["icm"]["not_judged"]
        assert set(why) == {"illicit/violent"} and "cannot judge policy 'test-casino'" in why["illicit/violent"]
        assert r.model_extra["icm"]["unjudged_mode"] == unjudged
        assert r.categories.illicit_violent is (unjudged == "flag")
        assert r.categories.illicit is False and r.categories.sexual is False
        assert r.flagged is (unjudged == "flag")


class SaneVLM:
    """An OpenAI-compatible VLM that answers sanely: No to every yes/no question, and the
    option that says nothing is there (none, normal, real life...) to every choice."""

    NOTHING = re.compile(r"^(none|no\b|nothing|normal|not\b|neither|real life|ordinary|everyday)", re.I)

    def __init__(self, fake: FakeOpenAIServer) -> None:
        self.fake = fake
        self.answered = 0

        async def chat(request: Request):
            from fastapi.responses import JSONResponse

            body = await request.json()
            text = "\n".join(p.get("text", "") for m in body["messages"] if isinstance(m.get("content"), list)
                             for p in m["content"] if p.get("type") == "text")
            options = re.findall(r"^([A-Z])\. (.*)$", text, re.M)
            self.answered += 1
            if not options:
                return JSONResponse(vllm_logprobs_body([("No", -0.02), ("Yes", -4.5)]))
            pick = next((letter for letter, label in options if self.NOTHING.match(label)), options[-1][0])
            other = next(letter for letter, _ in options if letter != pick)
            return JSONResponse(vllm_logprobs_body([(pick, -0.03), (other, -4.0)]))

        fake.app.router.routes = [r for r in fake.app.router.routes if getattr(r, "path", "") != "/v1/chat/completions"]
        fake.app.post("/v1/chat/completions")(chat)


def test_a_vlm_backend_judges_every_mapped_category(tmp_path, monkeypatch, bundle):
    """The openai backend against a loopback VLM that answers sanely: every category a
    policy of the model maps is judged on the image, and the sample photos are not flagged."""
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    photos = sorted(EXAMPLES.glob("*.jpg"))
    with fake_openai_server() as (fake, url):
        vlm = SaneVLM(fake)
        app = make_app(tmp_path, backend="openai", model=MODEL, base_url=url, max_retries=0,
                       model_aliases={"omni-moderation-latest": str(bundle)})
        with live_server(app) as base:
            resp = client(base).moderations.create(
                model="omni-moderation-latest", input=[part(data_url(p.read_bytes(), "image/jpeg")) for p in photos]
            )
    assert vlm.answered > 0
    (r,) = resp.results
    assert r.flagged is False, r.model_extra["icm"]["verdicts"]
    applied = r.category_applied_input_types.model_dump(by_alias=True)
    assert {c for c, types in applied.items() if types} == {"sexual", "illicit", "illicit/violent"}
    assert all(types in ([], ["image"]) for types in applied.values())
    assert r.model_extra["icm"]["not_judged"] == {}
    assert not any(r.categories.model_dump(by_alias=True).values())


def test_a_vlm_backend_judges_the_whole_taxonomy_as_omni_moderation(tmp_path, monkeypatch):
    """`omni-moderation-latest` is the built-in icm-standard bundle: with a VLM that answers
    sanely, OpenAI's six image categories and every other category a taxonomy policy maps are
    judged (["image"]), the sample photos are not flagged, and each member policy is a decision."""
    from icm.policy.bundle import load_bundle

    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    photos = sorted(EXAMPLES.glob("*.jpg"))
    std = load_bundle("icm-standard")
    assert std is not None
    mapped = {c for name in std.policies for c in load_policy(name).standard_categories.get("openai", {})}
    assert {"sexual", "self-harm", "self-harm/intent", "self-harm/instructions", "violence", "violence/graphic"} <= mapped
    with fake_openai_server() as (fake, url):
        SaneVLM(fake)
        app = make_app(tmp_path, backend="openai", model=MODEL, base_url=url, max_retries=0)
        with live_server(app) as base:
            resp = client(base).moderations.create(
                model="omni-moderation-latest", input=[part(data_url(p.read_bytes(), "image/jpeg")) for p in photos]
            )
    assert resp.model.startswith("icm-standard")
    (r,) = resp.results
    assert r.flagged is False, r.model_extra["icm"]["verdicts"]
    applied = r.category_applied_input_types.model_dump(by_alias=True)
    assert {c for c, types in applied.items() if types == ["image"]} == mapped
    assert r.category_applied_input_types.violence_graphic == ["image"] and r.category_applied_input_types.self_harm_intent == ["image"]
    assert r.model_extra["icm"]["not_judged"] == {}
    assert {k.split(":")[0] for k in r.model_extra["icm"]["verdicts"]} == set(std.policies)
    assert len(r.model_extra["icm"]["decisions"]) == len(photos) * len(std.policies)


# --------------------------------------------------------------------------- the npm SDK


def node_openai() -> tuple[str, str]:
    """(node, NODE_PATH holding the npm `openai` package), or skip saying what is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the npm openai SDK test needs node; .ci/run installs it with apt-get)")
    candidates = [os.environ.get("ICM_NODE_OPENAI_PATH", ""), str(Path(__file__).resolve().parents[1] / ".node" / "node_modules")]
    for c in candidates:
        if c and (Path(c) / "openai" / "package.json").is_file():
            return node, c
    # not in tests/allowed_skips.txt: CI, which has node, installs the package (.ci/run), so this skip fails CI
    pytest.skip(
        "the npm openai package is not installed: run `npm install --prefix .node openai@6` in the checkout "
        "(or set ICM_NODE_OPENAI_PATH to a node_modules folder holding it)"
    )


def test_the_npm_openai_sdk_reads_the_categories(tmp_path, monkeypatch):
    """The official Node SDK (npm `openai`, run with node) against the loopback server: one
    result for two images, every category typed, errors as the SDK's BadRequestError."""
    node, node_path = node_openai()
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    app = make_app(tmp_path, Moderator(ColourBackend(), policy="icm-sexy"))
    with live_server(app) as base:
        env = {**os.environ, "NODE_PATH": node_path, "ICM_BASE_URL": f"{base}/v1", "ICM_API_KEY": TOKEN,
               "ICM_RED": data_url(png((255, 0, 0))), "ICM_BLUE": data_url(png((0, 0, 255)))}
        done = subprocess.run([node, str(NODE_CLIENT)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["sdk_version"].startswith("6.")
    assert out["results"] == 1 and out["flagged"] is True
    assert out["sexual"] is True and out["sexual_applied"] == ["image"] and out["self_harm_applied"] == []
    assert out["violence_graphic"] is False and out["violence_graphic_score"] == 0
    assert set(out["types"]) == {"boolean number object"}, out["types"]
    assert out["n_categories"] == 13
    assert out["strings"] == 2
    assert out["text_error"] == {"status": 400, "type": "invalid_request_error", "code": "text_not_supported",
                                 "is_bad_request": True}
    assert out["bad_image_error"]["status"] == 400 and out["bad_image_error"]["type"] == "invalid_request_error"
    assert out["bad_image_error"]["param"] == "input[0]"


def test_the_unjudged_flag_reaches_the_config(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import icm.serve.app as serve_app
    from icm.cli.main import app as cli

    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    started: list[ServeConfig] = []
    monkeypatch.setattr(serve_app, "serve", lambda cfg: started.append(cfg))
    db = str(tmp_path / "x.sqlite")
    assert CliRunner().invoke(cli, ["serve", "--db", db]).exit_code == 0
    assert CliRunner().invoke(cli, ["serve", "--db", db, "--unjudged", "flag"]).exit_code == 0
    assert [c.unjudged for c in started] == ["pass", "flag"]
    r = CliRunner().invoke(cli, ["serve", "--db", db, "--unjudged", "maybe"])
    assert r.exit_code == 2 and "unjudged" in r.output


def test_a_request_larger_than_the_queue_is_a_400_not_a_503_forever(tmp_path, monkeypatch):
    """32 images under the 12-policy bundle are 384 judgements; with room for fewer, the request
    can never be queued whole, so it is refused as too large, not as busy (a retry cannot help)."""
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    app = make_app(tmp_path, max_queue=20)
    url = data_url(png((10, 200, 30)))
    with live_server(app) as base:
        with pytest.raises(openai.BadRequestError) as info:
            client(base).moderations.create(model="omni-moderation-latest", input=[part(url)] * 2)
        assert info.value.code == "too_many_inputs" and "24 judgements" in str(info.value)
        ok = client(base).moderations.create(model="icm-sexy", input=[part(url)] * 2)
        assert len(ok.results) == 1
